"""Puts a worker process in a job's surroundings: its client's working
directory and ``sys.path`` (in front of the worker's own, where those exist
here), the environment variables the master set for it (JOB_ENV), and
thread pools sized to it (cw.worker.threads).

Several jobs of one process may be under way at once (one runs, others wait
on their children), so a job that goes on after waiting enters its
surroundings again: another job may have changed them meanwhile.
"""
from __future__ import annotations

import os
import sys

from cw.worker import threads

#: Variables the master sets per job (JOB_ENV); a job without them gets the worker's own.
MANAGED_ENV = ("CUDA_VISIBLE_DEVICES", "CW_JOB_CPUS", "CW_JOB_MEM", "CW_JOB_THREADS")


class JobEnviron(dict):
    """The managed variables as a job sees them, and its thread count (None:
    the libraries' own)."""

    __slots__ = ("threads",)

    def __init__(self, variables: dict, thread_count: int | None):
        super().__init__(variables)
        self.threads = thread_count


class ContextSwitcher:
    """Switches this process between jobs' surroundings, doing nothing when
    the job's are those already in place (most jobs: the same as the last)."""

    def __init__(self, thread_policy=threads.CPUS):
        self.base_path = list(sys.path)
        self.thread_policy = thread_policy
        self.pools = threads.ThreadPools()
        count = threads.default_count(thread_policy)
        self.base_env = JobEnviron({name: os.environ.get(name) for name in MANAGED_ENV + threads.THREAD_VARS},
                                   count)
        self.base_env.update(threads.thread_environ(count))
        _set_environ(self.base_env)       # (the supervisor set them already, before any import)
        self.context: dict | None = None    # the client context in place now (compared by identity)
        self.env = self.base_env            # what the managed variables are set to now
        self.entered = False

    def job_environ(self, env: dict | None) -> JobEnviron:
        """The managed variables as a job with JOB_ENV ``env`` must see them."""
        if not env:
            return self.base_env
        count = threads.job_count(self.thread_policy, env)
        target = JobEnviron(self.base_env, count)
        target.update(env)
        target.update(threads.thread_environ(count))
        return target

    def enter(self, context: dict | None, env: JobEnviron) -> None:
        """Takes on a client's ``context`` (as a job carries it, or None) and a
        job's environment (from ``job_environ``)."""
        if context is not self.context or not self.entered:
            self._enter_context(context or {})
            self.context = context
            self.entered = True
        if env is not self.env:
            _set_environ(env)
            self.env = env
        self.pools.apply(env.threads)

    def _enter_context(self, context: dict) -> None:
        cwd = context.get("cwd")
        if isinstance(cwd, str) and os.path.isdir(cwd):
            os.chdir(cwd)
        client_path = [p for p in context.get("path", ()) if isinstance(p, str) and p and os.path.exists(p)]
        seen: set = set()
        sys.path[:] = [p for p in client_path + self.base_path if not (p in seen or seen.add(p))]


def _set_environ(env: dict) -> None:
    """Sets (or, for None values, removes) environment variables."""
    for name, value in env.items():
        if not isinstance(name, str):
            continue
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = str(value)
