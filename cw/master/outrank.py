"""Priorities hold with prefetch: a more urgent job takes a held one's place.

A worker holds the job it runs and the next one, sent ahead
(cw.master.slots), which it has not started.  Without this rule a job sent
ahead is a promise: a more urgent job submitted later waits behind it (issue
13: lo0, lo1, lo2 then hi0, hi1, hi2 on one worker started as lo0, lo1, hi1,
hi0, hi2, lo2).  So when a job finds no free slot and outranks a job of the
same client held somewhere, the dispatcher asks that held job back (REVOKE,
a swap); when the worker gives it back, the worker gets the client's most
urgent job in its place, without using up one of the client's turns (it
gave one back).  Jobs then start in priority order, as with no prefetch.

Priorities rank jobs within a client's share only: another client's held
job is never asked back, so no client can buy turns with priorities.

Most clients submit at one priority and pay nothing for this: a client's
held jobs are indexed, by priority, only once it has submitted jobs of two
priorities (``ClientRecord.floor`` is the lowest it submitted, and only a
job above it can outrank anything).  The index is lazy: an entry whose job
has since started, finished or gone back is dropped when met, and a bucket
that grows past what the workers could hold is swept.
"""
from __future__ import annotations

from cw.master.records import AHEAD, QUEUED, ClientRecord, Job, WorkerRecord
from cw.master.slots import Slots
from cw.wire import frames


class Outrank:
    def __init__(self, workers: dict[int, WorkerRecord], slots: Slots):
        self.workers = workers        # the dispatcher's own dict
        self.slots = slots

    def submitted(self, client: ClientRecord, job: Job, now: float) -> list:
        """``job``'s priority is not its client's floor (the dispatcher
        checks that first, so the usual submit costs one comparison): asks
        back the least urgent held job of the client below it, if any (a
        swap).  Returns what to send: [(worker id, REVOKE)] or []."""
        if client.floor is None or job.priority < client.floor:
            if client.floor is not None and client.held is None:
                self._watch(client)
            client.floor = job.priority
            return []
        if client.held is None:
            self._watch(client)
        if job.state != QUEUED or job.queue is not client.plain or client.paused:
            return []                 # only plain jobs are sent ahead, so only they can take a held one's place
        found = self._victim(client, job.priority)
        if found is None:
            return []
        worker, held = found
        self.slots.ask(worker, held, now, swap=True)
        return [(worker.wid, frames.encode_revoke(held.gid))]

    def sent_ahead(self, job: Job) -> None:
        """``job``, of a client whose held jobs are indexed, went to a worker (maybe ahead)."""
        if job.state != AHEAD:
            return
        held = job.client.held
        bucket = held.get(job.priority)
        if bucket is None:
            bucket = held[job.priority] = {}
        bucket[job] = None
        if len(bucket) > 2 * len(self.workers) * self.slots.slots + 64:
            for stale in [j for j in bucket if not self._held(j, job.client)]:
                del bucket[stale]

    def _watch(self, client: ClientRecord) -> None:
        """Indexes the client's jobs held now; ``sent_ahead`` adds later ones."""
        client.held = {}
        for worker in self.workers.values():
            for job in worker.jobs:
                if job.client is client:
                    self.sent_ahead(job)

    @staticmethod
    def _held(job: Job, client: ClientRecord) -> bool:
        return job.state == AHEAD and job.client is client and not job.pinned

    def _victim(self, client: ClientRecord, priority: int) -> tuple[WorkerRecord, Job] | None:
        """The least urgent held job of the client below ``priority``, the
        last sent among equals (it would have started last), out of the index."""
        held = client.held
        stalled = self.slots.stalled
        busy = []                     # held, but their worker cannot be asked now: back in the index after
        found = None
        for low in sorted(held):
            if low >= priority:
                break
            bucket = held[low]
            while bucket:
                job = bucket.popitem()[0]      # dicts pop the last added first
                if not self._held(job, client):
                    continue                   # started, done, or back in its queue
                worker = job.worker
                if worker.revoking is not None or worker.draining or worker.wid in stalled:
                    busy.append(job)
                    continue
                found = (worker, job)
                break
            if not bucket:
                del held[low]
            if found is not None:
                break
        for job in busy:
            held.setdefault(job.priority, {})[job] = None
        return found
