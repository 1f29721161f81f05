"""Which workers can take a job now, and which give one back.

A worker is sent up to ``slots`` jobs: the one it runs and the next ones,
sent ahead, so it never waits a round trip between jobs.  A worker whose
jobs are quick (each of the last QUICK_STREAK ended within QUICK_JOB
seconds of the one before) is sent twice as many: the master then reads
several of its outcomes per wake-up, and the jobs that take their places go
to it several to a message, which it reads in one system call, so both ends
wake up, and under TLS encrypt, less often per job.  One slower job, or a
pause, ends the streak.  A job sent ahead is asked back (REVOKE) in two
cases, and its worker's REVOKED puts it back in its queue:

- a worker falls idle while another has a job sent ahead: the idle one
  takes that job over (a steal);
- a more urgent job of the same client arrives (cw.master.outrank): it
  takes the held job's place on that worker (a swap).

A worker that does not answer a REVOKE within ``revoke_timeout`` seconds
(frozen, swapping) loses the job all the same: a stand-in that nobody
wants takes its place in the worker's books, so that whatever the worker
later says about it (given back, or an outcome if it started it anyway)
is dropped like the word of a cancelled job, and the worker gets no new
job until it has answered.  Jobs a lent worker runs while their parent
waits do not count against its slots.
"""
from __future__ import annotations

from cw import settings
from cw.master.placement import Placement
from cw.master.records import Job, WorkerRecord

_QUICK_STREAK = settings.QUICK_STREAK


class Slots:
    def __init__(self, workers: dict[int, WorkerRecord], slots: int, placement: Placement,
                 revoke_timeout: float = 3.0):
        self.workers = workers            # the dispatcher's own dict
        self.slots = max(1, slots)
        self.quick_slots = 2 * self.slots if self.slots > 1 else 1   # (--slots 1: no prefetch, ever)
        self.placement = placement
        self.revoke_timeout = revoke_timeout
        self.idle: dict[int, None] = {}     # wids with nothing to run, in the order they freed up
        self.spare: dict[int, None] = {}    # wids running a job with a slot free for the next
        self.donors: dict[int, None] = {}   # wids with a job sent ahead (and no REVOKE out)
        self.revokes = 0                    # steals awaiting an answer (each serves one idle worker)
        self.swaps: set[int] = set()        # wids asked to give a job back for a more urgent one
        self.asked: dict[int, float] = {}   # wid -> when its REVOKE is overdue, in the order asked
        self.stalled: set[int] = set()      # wids that let a REVOKE go overdue: no job until they answer

    def file(self, worker: WorkerRecord) -> None:
        """Files the worker under idle, spare and donors by the jobs it was sent."""
        wid = worker.wid
        idle, spare, donors = self.idle, self.spare, self.donors
        # Twice per job: a look is cheaper than a pop, and it is in one at most, mostly.
        if wid in idle:
            del idle[wid]
        if wid in spare:
            del spare[wid]
        if wid in donors:
            del donors[wid]
        if worker.draining or wid not in self.workers:
            return                                 # it takes no job and has none to give
        load = len(worker.jobs) - worker.lent      # jobs it runs or will run, not counting lent ones
        room = self.quick_slots if worker.quick >= _QUICK_STREAK else self.slots
        if load < room and not (self.stalled and wid in self.stalled):
            if load <= 0:
                idle[wid] = None
            else:
                spare[wid] = None
        if load >= 2 and worker.revoking is None and not worker.jobs[-1].pinned:
            donors[wid] = None

    def ask(self, worker: WorkerRecord, job: Job, now: float, swap: bool = False) -> None:
        """Marks ``job``, sent ahead to ``worker``, as asked back (the caller sends the REVOKE)."""
        worker.revoking = job.gid
        if swap:
            self.swaps.add(worker.wid)
        else:
            self.revokes += 1
        self.asked[worker.wid] = now + self.revoke_timeout
        self.file(worker)

    def steal(self, clock) -> list[WorkerRecord]:
        """Workers to ask for their last job sent ahead (they are marked as
        asked), one per idle worker that could run it and is not yet served."""
        if not self.donors or len(self.idle) <= self.revokes:
            return []           # the usual case, before reading the clock
        asked = []
        now = clock()
        takers = sum(1 for wid in self.idle if self.placement.can_take_plain(self.workers[wid]))
        while self.donors and takers > self.revokes:
            donor = self.workers[next(iter(self.donors))]
            self.ask(donor, donor.jobs[-1], now)
            asked.append(donor)
        return asked

    def answered(self, worker: WorkerRecord, gid: int | None = None) -> bool:
        """The worker answered a REVOKE (``gid``), or left or is taken not
        to answer (None): it is no longer asked.  True if it was a swap.
        A worker that answers any REVOKE is not frozen: it may take jobs
        again (the caller files it)."""
        if gid is not None:
            self.stalled.discard(worker.wid)
        if worker.revoking is None or (gid is not None and worker.revoking != gid):
            return False
        worker.revoking = None
        self.asked.pop(worker.wid, None)
        if worker.wid in self.swaps:
            self.swaps.discard(worker.wid)
            return True
        self.revokes -= 1
        return False

    def left(self, worker: WorkerRecord) -> None:
        """The worker left (already out of ``workers``): it is in no book of ours."""
        self.file(worker)
        self.answered(worker)
        self.stalled.discard(worker.wid)

    def forsake_overdue(self, now: float) -> list[Job]:
        """The held jobs whose REVOKE went unanswered past its deadline, out
        of their workers' books (the caller requeues them).  Deadlines grow in
        the order asked (one timeout, one clock): only the oldest are looked at."""
        late = []
        for wid, deadline in self.asked.items():
            if deadline > now:
                break
            late.append(self.workers[wid])
        return [job for job in map(self.forsake, late) if job is not None]

    def forsake(self, worker: WorkerRecord) -> Job | None:
        """The worker never answered the REVOKE of its held job: returns the
        job, out of the worker's books (the caller requeues it), after
        putting in its place a stand-in nobody wants, with the same id."""
        gid = worker.revoking
        self.answered(worker)
        jobs = worker.jobs
        job = next((j for j in jobs if j.gid == gid), None)
        if job is None:
            return None
        stand_in = Job(None, job.jobid, None, 1, 0.0, 0, job.queue)   # client None: its outcome is dropped
        stand_in.gid, stand_in.worker, stand_in.state = gid, worker, job.state
        stand_in.pinned = True        # never asked again: the one REVOKE out for it stands
        jobs[jobs.index(job)] = stand_in
        job.worker = None
        self.stalled.add(worker.wid)
        self.file(worker)
        return job
