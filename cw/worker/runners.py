"""A worker's runner threads (see cw.worker.session): their mailboxes, and
the reading put off to a standby runner while a job runs.

Reading is a role, not a thread: a job that reaches an idle worker runs on
the thread that read it, and the core gives the reading to a free runner.
That runner does not wake for it: the reading is put off to its thread (the
standby), which looks every STANDBY_TICK and starts reading only once a job
ran through a whole tick (so PING, ABORT and REVOKE are read during long
jobs, a few milliseconds late at most).  A job that ends sooner takes the
reading back on its own thread, which trades runner ids with the standby.
A stream of short jobs thus runs on one thread with no wake-up between
them, as a process pool's worker does: on a small VM a wake-up costs as
much as a no-op job.
"""
from __future__ import annotations

import threading

from cw.worker.actions import Read

_new = tuple.__new__

#: Seconds between two looks of the standby: a job still running after one
#: to two of them has the standby read for it.
STANDBY_TICK = 0.01
#: Ticks with nothing put off to it after which the standby waits without a timeout.
PARK_TICKS = 100


class Runner:
    """A runner thread's mailbox: the core names runners by id; a task for
    one is put here and the runner nudged (each thread waits on its own
    signal, so no other thread wakes for it).  ``id`` is the runner this thread
    plays now (see DeferredReading.take).  While the thread runs a job,
    ``job``, ``env`` and ``children`` (the futures it submitted) are its.

    The signal is a lock held while no nudge is pending: nudging releases
    it, waiting acquires it (and so clears the nudge).  A standby waits on
    it STANDBY_TICK at a time for as long as jobs stream, so a wait must be
    cheap: one call into C, where an Event's takes a Condition and a new
    lock per wait."""

    __slots__ = ("children", "env", "id", "idle_ticks", "job", "seen", "signal", "task", "ticking")

    def __init__(self, runner_id: int):
        self.id = runner_id
        self.signal = threading.Lock()
        self.signal.acquire()
        self.task = None
        self.job = None
        self.env = None
        self.children: list | None = None
        self.ticking = False   # waits STANDBY_TICK at a time (set and read holding the session's lock)
        self.idle_ticks = 0    # ticks in a row with no reading put off to it (it parks after PARK_TICKS)
        self.seen = -1         # the put-off reading it saw at its last tick (DeferredReading.count)

    def nudge(self) -> None:
        """Wakes this runner's thread (to take its task, or to tick); nudges
        before it wakes count as one."""
        try:
            self.signal.release()
        except RuntimeError:           # nudged already
            pass

    def wait(self, reading: DeferredReading):
        """This thread's next task (a standby's may be the reading put off to it)."""
        signal = self.signal
        while True:
            if signal.acquire(timeout=STANDBY_TICK if self.ticking else -1):
                task, self.task = self.task, None
                if task is not None:
                    return task
                continue              # nudged to tick: a reading was put off to it
            task = reading.tick(self)
            if task is not None:
                return task


class DeferredReading:
    """The reading the core gave a runner while the thread that read a job
    runs it.  ``lock`` is the session's lock (held around the core):
    ``defer``, ``wake`` and ``take`` are called holding it, ``tick`` takes it."""

    def __init__(self, lock, runners: dict[int, Runner]):
        self.lock = lock
        self.runners = runners
        self.standby: Runner | None = None   # whose Read is put off
        self.count = 0                       # readings put off so far (a standby's tick compares)

    def defer(self, standby: Runner) -> None:
        """``standby`` is to read once the job just started has run for a
        tick (see tick), unless it ends first (see take)."""
        self.standby = standby
        self.count += 1
        standby.idle_ticks = 0
        if not standby.ticking:        # parked: one wake-up, and it ticks from now on
            standby.ticking = True
            standby.nudge()

    def wake(self) -> None:
        """The standby reads now (a job waits on its children: their JOBs must be read)."""
        standby, self.standby = self.standby, None
        if standby is not None:
            standby.task = Read(standby.id)
            standby.nudge()

    def tick(self, me: Runner):
        """A standby's look: its task (Read) once the reading put off to it
        waited a whole tick; else None (after PARK_TICKS idle ones it parks)."""
        with self.lock:
            if self.standby is me:
                if me.seen == self.count:
                    self.standby = None
                    return Read(me.id)
                me.seen = self.count
                return None
            me.idle_ticks += 1
            if me.idle_ticks >= PARK_TICKS:
                me.ticking = False
            return None

    def take(self, me: Runner):
        """On a runner the core left free (Idle): when a reading is still put
        off, this thread takes it, trading runner ids with the standby (which
        is then the free one, waiting as it was); returns its task, or None
        (wait for one)."""
        standby = self.standby
        if standby is None or me.task is not None:
            return None
        self.standby = None
        if standby is not me:
            mine, theirs = me.id, standby.id
            me.id, standby.id = theirs, mine
            self.runners[mine], self.runners[theirs] = standby, me
        return _new(Read, (me.id,))   # (tuple.__new__: half the cost of calling Read, once per job)
