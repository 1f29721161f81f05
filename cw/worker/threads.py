"""The thread pools of a job's numerical libraries (BLAS, OpenMP) sized to
the CPUs it was given: one by default, four for ``resources={"cpu": 4}``.

Left alone, each worker process's numpy starts one BLAS thread per core, and
N workers on N cores fight over them (5 to 30 times slower eigvals jobs, see
issue 12).  Two means together cover every case:

- environment variables (``THREAD_VARS``), set before a worker process
  imports anything (the supervisor starts it with them) and, while a job
  runs, to the job's count, so a library a job imports first starts sized
  to it;
- threadpoolctl, for libraries already loaded when a job starts.  Raising
  OpenBLAS above its load-time count works (checked with OpenBLAS 0.3.31: it
  starts the extra threads and uses them), while the count it reads from the
  variables at load time is capped to the cores it sees: a 4-CPU job that
  loads numpy first gets min(4, cores) until the next job resizes it.

A worker's ``--job-threads`` says how many a job gets: ``cpus`` (default),
a fixed number, or ``off`` (libraries and variables left as they are); a
job's ``threads=`` option overrides it (it reaches the worker as
``CW_JOB_THREADS``).
"""
from __future__ import annotations

import logging
import sys
import threading

log = logging.getLogger("cw.worker")

#: Variables the usual numerical libraries read at load time for their thread count.
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
               "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
#: The worker options: as many threads as the job's CPUs, or none of cw's business.
CPUS, OFF = "cpus", "off"
MAX_THREADS = 4096


def parse_policy(text) -> str | int:
    """A worker's ``--job-threads``: ``"cpus"``, ``"off"`` or a whole number >= 1."""
    value = str(text).strip().lower()
    if value in (CPUS, OFF):
        return value
    if value.isdigit() and 1 <= int(value) <= MAX_THREADS:
        return int(value)
    raise ValueError(f"--job-threads {text!r} is not valid: write 'cpus' (as many threads as each job's CPUs, "
                     f"the default), a number of threads from 1 to {MAX_THREADS}, or 'off' (leave the "
                     "libraries' own thread counts and variables alone)")


def default_count(policy) -> int | None:
    """The thread count of a job that asks for nothing (None: leave libraries alone)."""
    return None if policy == OFF else 1 if policy == CPUS else policy


def thread_environ(count: int | None) -> dict:
    """The variables that give libraries loaded from now on ``count`` threads ({} for None)."""
    return {} if count is None else dict.fromkeys(THREAD_VARS, str(count))


def worker_environ(environ, policy) -> dict:
    """The environment a worker process starts with (the supervisor's, with
    the thread variables of a job that asks for nothing)."""
    return {**environ, **thread_environ(default_count(policy))}


def job_count(policy, env: dict) -> int | None:
    """A job's thread count, from its JOB_ENV (values are strings the master
    wrote): its ``threads=`` option, else a fixed ``--job-threads``, else its
    CPUs (whole ones, at least 1); None under ``off`` with no option."""
    asked = env.get("CW_JOB_THREADS")
    if asked:
        try:
            return max(1, int(asked))
        except ValueError:
            log.warning("ignoring CW_JOB_THREADS=%r from the master: not a whole number", asked)
    if policy == OFF or isinstance(policy, int):
        return default_count(policy)
    try:
        return max(1, int(float(env.get("CW_JOB_CPUS") or 1)))
    except ValueError:
        return 1


class ThreadPools:
    """Sets the loaded libraries' thread pools to a job's count.  Scanning
    the loaded libraries costs about a millisecond, far more than a no-op job,
    so it scans only when modules were imported since the last scan (a new
    library may have come with them), and sets the pools only when the count
    changes.  OpenMP keeps its count per thread, so a runner thread that did
    not set the current count sets it again (``state`` names what was set:
    a new object at each change, compared by identity)."""

    def __init__(self):
        self.controller = None        # threadpoolctl's view of the loaded libraries, None before the first scan
        self.modules = -1             # len(sys.modules) at that scan
        self.count: int | None = None   # what the pools are set to (None: the libraries' own counts)
        self.state = object()
        self.local = threading.local()
        self.originals: dict = {}     # library path -> its own count, as first found (given back for None)
        self.broken = False           # threadpoolctl missing or failing: variables only

    def apply(self, count: int | None) -> None:
        """The pools as a job of ``count`` threads needs them, on this thread."""
        if len(sys.modules) == self.modules and count == self.count and \
                getattr(self.local, "state", None) is self.state:
            return
        if self.broken or (count is None and self.controller is None):
            return                    # nothing was ever changed: nothing to give back
        try:
            self._apply(count)
        except Exception as exc:      # a library's controller failing must not fail jobs
            self.broken = True
            log.warning("cannot size the jobs' BLAS/OpenMP thread pools with threadpoolctl (%s: %s); "
                        "only the variables (OMP_NUM_THREADS and others) limit them from now on",
                        type(exc).__name__, exc)

    def _apply(self, count: int | None) -> None:
        if len(sys.modules) != self.modules:
            from threadpoolctl import ThreadpoolController
            self.controller = ThreadpoolController()
            for lib in self.controller.lib_controllers:
                self.originals.setdefault(lib.filepath, lib.num_threads)
            self.modules = len(sys.modules)
            self.state = object()     # new libraries: every thread sets its count again
        _release_openblas()
        for lib in self.controller.lib_controllers:
            lib.set_num_threads(self.originals[lib.filepath] if count is None else count)
        _release_openblas()
        if count != self.count:
            self.count = count
            self.state = object()
        self.local.state = self.state


def _release_openblas() -> None:
    """threadpoolctl (3.8) lets only one thread set a pthreads OpenBLAS's
    count, the first that did, while it lives; the others' calls are silently
    ignored.  A worker's jobs run on several threads in turn (one at a time),
    so the worker hands that control back around each setting: to itself
    before (a job's thread may have kept it), to the job's own
    ``threadpool_limits`` after."""
    from threadpoolctl import OpenBLASController
    clear = getattr(OpenBLASController, "clear_controlling_thread", None)
    if clear is not None:
        clear(force=True)
