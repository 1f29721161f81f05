"""Jobs that submit jobs: ``cw.get_executor()`` inside a job gives an
executor whose jobs are children of the running job (see NestedJobHooks)."""
from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from cw.client.executor import JobHooks

if TYPE_CHECKING:
    from cw.worker.session import Session

#: Depth in its tree of the job running now (0: submitted by a client, not a job).
_depth = 0


def _nested_call(depth: int, fn, args, kwargs):
    """Runs a job submitted by a job, knowing how deep it is in its tree."""
    global _depth
    outer, _depth = _depth, depth
    try:
        return fn(*args, **kwargs)
    finally:
        _depth = outer


class NestedJobHooks(JobHooks):
    """Ties the jobs a running job submits (``cw.get_executor()`` inside a
    job) to it: they are its children.  A child gets priority one above its
    parent's depth unless given one, so the deepest jobs go first: the tree
    is explored depth first, as work-stealing schedulers do, and the jobs
    waiting at once stay about as many as the tree is deep.  The running
    job's context (cwd, sys.path) is sent along when it changed, and waiting
    on a child lends this worker (Session.help_while)."""

    def __init__(self, session: Session):
        self.session = session
        self.sent_context = (os.getcwd(), tuple(sys.path))

    def prepare(self, fn, args, kwargs, priority):
        depth = _depth + 1
        return _nested_call, (depth, fn, args, kwargs), {}, priority or depth

    def context_change(self):
        context = (os.getcwd(), tuple(sys.path))
        if context == self.sent_context:
            return None
        self.sent_context = context
        return {"cwd": context[0], "path": context[1]}

    def adopt(self, future) -> None:
        self.session.track_child(future)

    def wait(self, future, timeout) -> None:
        self.session.help_while(future, timeout)


def enable_nested_jobs(host: str, port: int, session: Session) -> None:
    """Lets jobs of this process submit jobs (``cw.get_executor()``) and lend
    this worker while they wait for them; ``host`` may say ``tls://HOST:PORT``."""
    from cw.client.executor import ClusterExecutor, set_executor_factory
    set_executor_factory(lambda: ClusterExecutor(host, port, job_hooks=NestedJobHooks(session)))
