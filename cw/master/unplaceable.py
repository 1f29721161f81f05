"""Jobs that no connected worker could ever run.

When the head of a queue of jobs that ask for something finds no worker,
the dispatcher asks whether any connected worker could ever run it; when
workers leave or drain, it asks for every such queue at once.  The answer
is worked out once per change of the workers (``epoch``).  If none could,
the client is told once (a NOTICE naming the job and why) and the queue's
clock starts; after ``timeout`` seconds its jobs fail as UNPLACEABLE,
unless a worker that fits came meanwhile.  A job of the queue going to a
worker stops the clock.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable

from cw.master.placement import Placement
from cw.master.records import ClientRecord, Job, JobQueue
from cw.wire import frames


class Unplaceable:
    def __init__(self, placement: Placement, clock: Callable[[], float], timeout: float):
        self.placement = placement
        self.clock = clock
        self.timeout = timeout
        self.epoch = 0                # bumped when workers come, go or drain

    def check(self, client: ClientRecord, queue: JobQueue, job: Job) -> bytes | None:
        """Finds out (once per epoch) whether any connected worker could ever
        run the queue's jobs; returns the NOTICE to send the client, if it
        must be told now."""
        if queue.checked == self.epoch:
            return None
        queue.checked = self.epoch
        queue.reason = self.placement.why_never(queue)
        if queue.reason is None:
            queue.waiting_since = None
            client.notified.discard(queue.key)
        elif queue.waiting_since is None:
            queue.waiting_since = self.clock()
            if queue.key not in client.notified:
                client.notified.add(queue.key)
                text = f"{queue.reason}; it waits for such a worker to join, and fails after {self.timeout:g} s"
                return frames.encode_notice(job.jobid, text)
        return None

    def recheck(self, clients: Iterable[ClientRecord]) -> list[tuple[int, bytes]]:
        """(client id, NOTICE) for queues that only workers now gone could
        run: they are told, and timed, now, not when some worker next frees up."""
        notices = []
        for client in list(clients):
            for key, queue in list(client.queues.items()):
                job = queue.head() if key is not None else None
                notice = None if job is None else self.check(client, queue, job)
                if notice is not None:
                    notices.append((client.cid, notice))
        return notices

    @staticmethod
    def placed(client: ClientRecord, queue: JobQueue) -> None:
        """A job of the queue went to a worker: it is not waiting for one."""
        if queue.waiting_since is not None or queue.reason is not None:
            queue.waiting_since = queue.reason = None
            client.notified.discard(queue.key)

    def expire(self, clients: Iterable[ClientRecord], fail: Callable[[ClientRecord, Job, bytes], None]) -> None:
        """Calls ``fail(client, job, reason)`` for each queued job that no
        connected worker could run for longer than ``timeout``."""
        now = self.clock()
        for client in list(clients):
            for queue in list(client.queues.values()):
                since = queue.waiting_since
                if since is None or now - since < self.timeout:
                    continue
                if queue.checked != self.epoch and self.placement.why_never(queue) is None:
                    queue.waiting_since = None      # a worker that fits came meanwhile
                    continue
                body = json.dumps({"reason": queue.reason, "waited": round(now - since, 1)}).encode()
                for job in list(queue.jobs()):
                    fail(client, job, body)
                queue.waiting_since = None
                queue.checked = -1           # the next job of this kind is looked at afresh
                client.notified.discard(queue.key)
