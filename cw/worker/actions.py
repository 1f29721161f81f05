"""What the worker's core (cw.worker.core) tells its shell to do.

Each event of a ``WorkerCore`` returns a list of these.  Runners are the
shell's threads, named by the ints the core gives them; an action naming a
runner is that runner's next task.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from cw.worker.core import Job


class Spawn(NamedTuple):
    """Start a thread for a new runner; it is free until a task names it."""
    runner: int


class Read(NamedTuple):
    """The runner takes the reading role."""
    runner: int


class Run(NamedTuple):
    """The runner runs the job (it has started; arm its timeout, if any)."""
    runner: int
    job: Job


class Resume(NamedTuple):
    """The job that waited on its children goes on, on its own runner."""
    runner: int
    gid: int


class Flush(NamedTuple):
    """The runner sends the outbox (and waits until its job's outcome is
    on the wire if it views memory the next job could change), then calls ``sent``."""
    runner: int
    gid: int


class Idle(NamedTuple):
    """The runner waits for its next task."""
    runner: int


class Stop(NamedTuple):
    """The runner's thread ends."""
    runner: int


class Pong(NamedTuple):
    """Answer a PING now, unordered with other frames: a PONG must not wait
    behind a backlog of outcomes (their bytes show the master we live)."""


class Exit(NamedTuple):
    """Send what the outbox holds, then end the process.  ``reason`` is an
    ExitChannel reason (REPLACE or STOPPED); ``why`` is for the log."""
    reason: str
    why: str


class End(NamedTuple):
    """The session is over: drained (the process exits) or not (the
    connection was lost: connect again)."""
    drained: bool
