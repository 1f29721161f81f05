"""Which workers can take a job now, and which give one back.

A worker is sent up to ``slots`` jobs: the one it runs and the next ones,
sent ahead, so it never waits a round trip between jobs.  A worker that
falls idle while another has a job sent ahead takes that job over: the
dispatcher asks the busy one to give it back (REVOKE), and its REVOKED
puts the job back in its queue.  Jobs a lent worker runs while their
parent waits do not count against its slots.
"""
from __future__ import annotations

from cw.master.placement import Placement
from cw.master.records import WorkerRecord


class Slots:
    def __init__(self, workers: dict[int, WorkerRecord], slots: int, placement: Placement):
        self.workers = workers            # the dispatcher's own dict
        self.slots = max(1, slots)
        self.placement = placement
        self.idle: dict[int, None] = {}     # wids with nothing to run, in the order they freed up
        self.spare: dict[int, None] = {}    # wids running a job with a slot free for the next
        self.donors: dict[int, None] = {}   # wids with a job sent ahead (and no REVOKE out)
        self.revokes = 0                    # REVOKEs awaiting an answer

    def file(self, worker: WorkerRecord) -> None:
        """Files the worker under idle, spare and donors by the jobs it was sent."""
        wid = worker.wid
        load = len(worker.jobs) - worker.lent      # jobs it runs or will run, not counting lent ones
        self.idle.pop(wid, None)
        self.spare.pop(wid, None)
        self.donors.pop(wid, None)
        if wid not in self.workers:
            return
        if not worker.draining:
            if load <= 0:
                self.idle[wid] = None
            elif load < self.slots:
                self.spare[wid] = None
        if load >= 2 and worker.revoking is None and not worker.draining and not worker.jobs[-1].pinned:
            self.donors[wid] = None

    def steal(self) -> list[WorkerRecord]:
        """Workers to ask for their last job sent ahead (they are marked as
        asked), one per idle worker that could run it and is not yet served."""
        if not self.donors or len(self.idle) <= self.revokes:
            return []
        asked = []
        takers = sum(1 for wid in self.idle if self.placement.can_take_plain(self.workers[wid]))
        while self.donors and takers > self.revokes:
            donor = self.workers[next(iter(self.donors))]
            donor.revoking = donor.jobs[-1].gid
            self.revokes += 1
            self.file(donor)
            asked.append(donor)
        return asked

    def answered(self, worker: WorkerRecord, gid: int | None = None) -> None:
        """The worker answered our REVOKE (``gid``), or left (None): it is no longer asked."""
        if worker.revoking is not None and (gid is None or worker.revoking == gid):
            worker.revoking = None
            self.revokes -= 1
