"""A job's future, the worker that ran it, and what a job's result frame means.

``ClusterFuture`` is a concurrent.futures.Future that knows its job id, the
worker that ran it and what the job printed; its executor completes it from
the reader thread.  ``JobHooks`` is how an executor inside a running job
ties the futures it makes to that job.
"""
from __future__ import annotations

import concurrent.futures
import json
import time
from typing import TYPE_CHECKING, NamedTuple

from cw.errors import Unplaceable, WorkerLost
from cw.wire.frames import Status

if TYPE_CHECKING:
    from cw.client.executor import ClusterExecutor


class WorkerInfo(NamedTuple):
    """The worker that ran a job."""
    host: str
    pid: int

    @classmethod
    def from_label(cls, label: bytes) -> WorkerInfo:
        host, _, pid = label.decode("utf-8", "replace").rpartition(":")
        return cls(host, int(pid) if pid.isdigit() else -1)


class WorkerDescription(NamedTuple):
    """A connected worker, as ``ClusterExecutor.workers()`` lists it.  Pass it
    (or its ``id``) in ``workers=[...]`` to run a job on that worker."""
    id: int
    host: str
    pid: int
    node: str | None
    resources: dict
    state: str
    jobs_done: int

    @property
    def info(self) -> WorkerInfo:
        return WorkerInfo(self.host, self.pid)

    def __hash__(self) -> int:      # resources is a dict: hash by the worker's id
        return hash(self.id)


class JobHooks:
    """How an executor inside a running job ties the jobs it submits to that
    job.  A worker process gives one to the executor ``get_executor()``
    returns in its jobs (see cw.worker.session.NestedJobHooks); elsewhere
    there is none.  Each method's default does nothing."""

    def prepare(self, fn, args: tuple, kwargs: dict, priority: int) -> tuple:
        """The call and priority to submit instead of ``fn(*args, **kwargs)``
        at ``priority``: returns (fn, args, kwargs, priority)."""
        return fn, args, kwargs, priority

    def context_change(self) -> dict | None:
        """The working directory and path to send before the next job
        ({"cwd", "path"}) when they changed since the last one, else None."""
        return None

    def adopt(self, future: ClusterFuture) -> None:
        """A future this executor made: a child of the running job."""

    def wait(self, future: ClusterFuture, timeout: float | None) -> None:
        """Called when the running job waits on ``future``, before the
        waiting itself; returns when the future is done or after
        ``timeout`` seconds (a worker runs other jobs meanwhile)."""


class ClusterFuture(concurrent.futures.Future):
    """A future for one job; ``worker`` names the worker that ran it;
    ``notice`` says why it waits, if the master said so."""

    def __init__(self, executor: ClusterExecutor, jobid: int):
        super().__init__()
        self.jobid = jobid
        self.worker: WorkerInfo | None = None
        self.notice: str | None = None
        self.submitted_at = time.time()
        self.finished_at: float | None = None
        self._output = ""
        self._executor = executor
        self._waits_for: tuple = ()

    @property
    def waits_for(self) -> tuple:
        """The futures, passed to this job as arguments, that it waits for (until it is done)."""
        return self._waits_for if not self.done() else ()

    def __reduce__(self):
        """Passed to a job of its executor, a future travels as its job's outcome (cw.client.refs)."""
        from cw.client.refs import reduce_future
        return reduce_future(self)

    def __await__(self):
        """``await future``: the job's result on the running event loop (see cw.client.aio)."""
        from cw.client.aio import await_future
        return (yield from await_future(self))

    def output(self, timeout=None) -> str:
        """What the job printed (stdout, stderr, logging records), once it is
        done; "" when nothing.  Bounded: see settings.MAX_JOB_OUTPUT."""
        concurrent.futures.wait([self], timeout)
        if not self.done():
            raise TimeoutError(f"job {self.jobid} is not done after {timeout} s")
        return self._output

    @property
    def state(self) -> str:
        """"queued", "waiting" (for futures it takes, see waits_for), "running", "done", "failed" or
        "cancelled".  For a job not done yet this asks the master (a round trip)."""
        if self.cancelled():
            return "cancelled"
        if self.done():
            return "failed" if self.exception() is not None else "done"
        from cw.client.refs import job_state
        return job_state(self)

    def result(self, timeout=None):
        return super().result(self._help(timeout))

    def exception(self, timeout=None):
        return super().exception(self._help(timeout))

    def _help(self, timeout):
        """Inside a job, waiting lends the worker (see JobHooks.wait); returns the time left."""
        hooks = self._executor._hooks
        if hooks is None or self.done():
            return timeout
        start = time.monotonic()
        hooks.wait(self, timeout)
        return None if timeout is None else max(0.0, timeout - (time.monotonic() - start))

    def cancel(self) -> bool:
        # Unlike a thread pool, a cw job can be withdrawn until its result is
        # here: the master drops it from its queue, or the result is ignored.
        with self._condition:
            was_pending = self._state == "PENDING"
        if not super().cancel():
            return False
        if was_pending:
            # CANCELLED -> CANCELLED_AND_NOTIFIED, or wait() and as_completed()
            # would never count this future as done.
            self.set_running_or_notify_cancel()
            self._executor._withdraw(self.jobid)
        return True


def job_outcome(jobid: int, status: int, worker: WorkerInfo, payload) -> tuple[bool, object]:
    """(ok, result or exception) of a RESULT frame: the master's verdicts
    (unplaceable, lost with its workers) as errors that say what to do,
    else the job's pickled outcome."""
    if status == Status.UNPLACEABLE:
        info = json.loads(bytes(payload))
        return False, Unplaceable(
            f"job {jobid} could not run: {info['reason']}, and no worker that could joined within "
            f"{info['waited']:g} s; start workers with what it needs (python -m cw.worker --resources ...), "
            "ask for less, or raise the master's --unplaceable-timeout")
    if status == Status.LOST:
        info = json.loads(bytes(payload))
        return False, WorkerLost(
            f"job {jobid} was lost with its worker {info['attempts']} time(s) (last on "
            f"{worker.host} pid {worker.pid}; all: {', '.join(info['workers'])}); "
            "it may crash its worker (out of memory, segfault, os._exit): run it locally to see",
            jobid, info["attempts"], info["workers"])
    if status >= Status.DEPENDENCY:
        from cw.client.refs import dependency_outcome  # it did not run: a future or Ref it takes failed
        return dependency_outcome(jobid, status, payload)
    from cw.wire.payload import load_outcome  # (loads cloudpickle: only once a result is here)
    return load_outcome(status, payload)
