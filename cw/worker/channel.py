"""The channel between a supervisor and its worker processes.

The supervisor never reads meaning into a worker's exit status: a job can end
its process with any status (``os._exit(3)``) or signal.  A worker that exits
on purpose says why on its exit channel (a pipe) first; any other end is a
crash.  The other way, a lifeline pipe tells workers that their supervisor
died: they exit with it.
"""
from __future__ import annotations

import os

from cw import cliargs

# Exit statuses, for people reading logs; the supervisor reads the exit channel instead.
EXIT_NO_MASTER = 3   # gave up reaching a master: do not restart
EXIT_CONFIG = 4      # wrong secret or unreadable secret file: restarting cannot help
EXIT_REPLACE = 5     # its job timed out or was aborted: start a fresh process at once
EXIT_NOW = 6         # a second SIGTERM: stopped mid-job


class ExitChannel:
    """The worker's end of the pipe on which it tells its supervisor why it
    exits.  A reason is one short line, written just before the exit; a
    process that ends without writing one crashed (or a job ended it).
    Before any reason, ``ready`` says it reached a master once: a process
    that dies before that is crash-looping (restarted with a growing delay),
    one that dies after it was most likely ended by a job (restarted at once)."""

    READY = "ready"            # connected to a master (not an exit)
    DRAINED = "drained"        # finished on request: do not restart
    NO_MASTER = "no-master"    # gave up reaching a master: do not restart
    CONFIG = "config"          # the secret is wrong or unreadable: stop every worker
    REPLACE = "replace"        # stopped a timed-out or cancelled job on purpose: start another at once
    STOPPED = "stopped"        # a second SIGTERM: stop now, do not restart
    REASONS = (DRAINED, NO_MASTER, CONFIG, REPLACE, STOPPED)

    def __init__(self, fd: int | None):
        self.fd = fd
        self.ready_said = False
        if fd is not None:
            os.set_inheritable(fd, False)   # a job's child processes must not speak for this worker

    def say(self, reason: str) -> None:
        if self.fd is None:
            return
        try:
            os.write(self.fd, reason.encode() + b"\n")
        except OSError:
            pass   # the supervisor is gone: nobody to tell

    def say_ready(self) -> None:
        if not self.ready_said:
            self.ready_said = True
            self.say(self.READY)

    @classmethod
    def read(cls, fd: int) -> tuple[str | None, bool]:
        """The supervisor's side, after the worker exited: (its reason, or
        None when it gave none, which is a crash; whether it was ready).
        Never blocks: a job's forked child could still hold the write end."""
        os.set_blocking(fd, False)
        try:
            data = os.read(fd, 256)
        except OSError:        # BlockingIOError included: nothing was written
            data = b""
        words = data.decode("ascii", "replace").split()
        reason = words[-1] if words and words[-1] in cls.REASONS else None
        return reason, cls.READY in words


#: This process's exit channel (a worker under a supervisor opens it at start).
exit_channel = ExitChannel(None)


def open_exit_channel(fd: int | None) -> None:
    global exit_channel
    exit_channel = ExitChannel(fd)


def exit_now(reason: str, status: int) -> None:
    """Ends this worker process at once, having said why."""
    exit_channel.say(reason)
    os._exit(status)


def watch_lifeline(fd: int) -> None:
    """Exits this worker when its supervisor dies (the pipe's write end closes)."""
    cliargs.watch_for_end(fd, lambda: os._exit(0))
