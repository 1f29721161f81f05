"""Job timeouts on a worker: one thread for all of a session's jobs.

A ``threading.Timer`` per job would cost a thread's start and end per job,
more than a small job costs its worker (see docs/performance.rst, "Jobs
with a timeout").  Only the jobs running now have a live
deadline (a runner runs one at a time), so the watcher keeps them in a dict
and looks for the earliest when it wakes; a job that ends in time only
takes its entry out.  The watcher sleeps until the earliest deadline it
knows of, and is woken early only by a job whose deadline comes sooner.
"""
from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable


class Deadlines:
    """Calls ``expired(gid)`` on its own thread once a watched job runs past
    its time.  ``watch`` gives a token; ``cancel(token)`` when the job ends
    (an expiry already under way may still call: the caller checks that the
    job still runs, as it would with a timer)."""

    def __init__(self, expired: Callable[[int], object]):
        self._expired = expired
        self._cond = threading.Condition(threading.Lock())
        self._live: dict[int, tuple[float, int]] = {}    # token -> (when, gid)
        self._tokens = itertools.count()
        self._wake_at = float("inf")      # when the watcher means to look next
        self._thread: threading.Thread | None = None
        self._stopped = False

    def watch(self, gid: int, seconds: float) -> int:
        when = time.monotonic() + seconds
        token = next(self._tokens)
        with self._cond:
            self._live[token] = (when, gid)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="cw-deadlines", daemon=True)
                self._thread.start()
            elif when < self._wake_at:
                self._cond.notify()
        return token

    def cancel(self, token: int) -> None:
        with self._cond:
            self._live.pop(token, None)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def _run(self) -> None:
        cond, live = self._cond, self._live
        while True:
            with cond:
                while True:
                    if self._stopped:
                        return
                    now = time.monotonic()
                    due = [token for token, (when, _) in live.items() if when <= now]
                    if due:
                        break
                    self._wake_at = min((when for when, _ in live.values()), default=float("inf"))
                    cond.wait(None if self._wake_at == float("inf") else self._wake_at - now)
                self._wake_at = now
                expired = [live.pop(token)[1] for token in due]
            for gid in expired:
                self._expired(gid)
