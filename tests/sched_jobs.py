"""Job functions for tests/test_scheduling.py.  Workers import this module by
name (the client sends its sys.path along, and the tests' directory is on it)."""
from __future__ import annotations

import os
import time

from jobs import wait_for

import cw


def record(path, text):
    """Appends ``text`` as a line of ``path`` (one write, so lines never mix)."""
    with open(path, "a") as f:
        f.write(text + "\n")
    return text


def write_whole(path, text):
    """Writes ``text`` to ``path`` so that it appears whole: a test that waits
    for ``path`` to exist must never read it empty (seen once in CI)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def mark_and_wait(marker, release, value=None):
    """Creates ``marker`` holding the worker's pid (the test sees the job
    started), then waits for ``release``."""
    write_whole(marker, str(os.getpid()))
    wait_for(release)
    return value


def gpu_env(marker=None, release=None):
    """The job's CUDA_VISIBLE_DEVICES (None when unset); with ``marker`` and
    ``release``, first says it started and waits (so that two run at once)."""
    if marker is not None:
        mark_and_wait(marker, release)
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def job_env():
    """What the master told the job it was given."""
    return {name: os.environ.get(name) for name in ("CUDA_VISIBLE_DEVICES", "CW_JOB_CPUS", "CW_JOB_MEM")}


def exclusive(lock, hold=0.05, name=None):
    """Fails if another job holding ``lock`` runs at the same time: takes the
    lock file with O_CREAT|O_EXCL, keeps it ``hold`` seconds, removes it."""
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        raise AssertionError(f"{name or 'a job'} started while another job held {lock}") from None
    try:
        os.write(fd, str(os.getpid()).encode())
        time.sleep(hold)      # a window in which an overlapping job would be caught
    finally:
        os.close(fd)
        os.unlink(lock)
    return name


def meet(mine, other, timeout=30.0):
    """Creates ``mine``, then waits for ``other``: two of these complete only
    if both run at the same time."""
    open(mine, "w").close()
    wait_for(other, timeout)
    return os.getpid()


def pid_after(marker, release):
    """Waits for ``release`` after ``marker``, then gives the worker's pid."""
    mark_and_wait(marker, release)
    return os.getpid()


# --- nested jobs ------------------------------------------------------------------

def fib(n):
    """Recursive Fibonacci, every call but the leaves a job of its own that
    waits for its two children."""
    if n < 2:
        return n
    ex = cw.get_executor()
    a = ex.submit(fib, n - 1)
    b = ex.submit(fib, n - 2)
    return a.result() + b.result()


def chain(n):
    """A job that submits a job that submits a job ... ``n`` deep, each waiting
    for the one below: returns ``n``."""
    if n == 0:
        return 0
    return cw.get_executor().submit(chain, n - 1).result() + 1


def parent_that_fails(child_marker, release):
    """Starts a child that blocks, waits until it runs (without waiting on its
    future, so nothing is lent), then fails."""
    cw.get_executor().submit(mark_and_wait, child_marker, release, "child finished")
    wait_for(child_marker)
    raise RuntimeError("the parent fails")


def parent_that_fails_at_once(child_log, release, tag=None):
    """Submits a child (tagged ``tag``) and fails at once."""
    cw.get_executor().submit(child_that_logs, child_log, release, tag=tag)
    raise RuntimeError("the parent fails at once")


def child_that_logs(log, release):
    record(log, f"started {os.getpid()}")
    wait_for(release)
    record(log, "finished")
    return "child finished"


def parent_that_hangs(pid_file, child_log, release, never):
    """Records its worker's pid, submits a child, then waits (without lending)
    for a file that never comes: the test kills this worker."""
    cw.get_executor().submit(child_that_logs, child_log, release)
    write_whole(pid_file, str(os.getpid()))      # the child was submitted before it appears
    wait_for(never, 120)
    return "parent finished"


def squares_below(n):
    """A job that maps over its own children and waits through map's results."""
    return list(cw.get_executor().map(square, range(n)))


def square(x):
    return x * x



def parent_env_and_child_env():
    """This job's CW_JOB_* and those of a plain child run while it waits (perhaps in this very process)."""
    return job_env(), cw.get_executor().submit(job_env).result()
