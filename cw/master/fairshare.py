"""Whose job goes next: fair share between clients.

Each client has a virtual clock that advances by 1/weight per job it is
given; the client with the earliest clock goes next, so one client's
100,000 queued jobs do not starve another's ten, and a client of weight 2
gets twice the share of one of weight 1.  A client that comes back after a
pause starts at the current clock, not with credit for the time it was away.
"""
from __future__ import annotations

import heapq

from cw.master.records import ClientRecord


class FairShare:
    def __init__(self, clients: dict[int, ClientRecord]):
        self.clients = clients        # the dispatcher's own dict: clients that left are skipped
        self.ready: list = []         # heap of (vtime, seq, cid): clients that may have jobs to run
        self.vclock = 0.0             # the clock of the client served last
        self._seq = 0

    def __bool__(self) -> bool:
        return bool(self.ready)

    def add(self, client: ClientRecord) -> None:
        """The client may have a job that can go (once in the heap at most)."""
        if not client.in_ready and not client.paused and client.queued:
            client.in_ready = True
            if client.vtime < self.vclock:
                client.vtime = self.vclock   # no credit for the time it had nothing queued
            self._seq += 1
            heapq.heappush(self.ready, (client.vtime, self._seq, client.cid))

    def add_all(self) -> None:
        """Something changed that may let blocked jobs go (a worker came, a limit rose)."""
        for client in self.clients.values():
            self.add(client)

    def pop(self) -> ClientRecord | None:
        """The client whose turn it is, out of the heap; None if the one
        popped left or is paused (``add`` puts it back when it resumes)."""
        _, _, cid = heapq.heappop(self.ready)
        client = self.clients.get(cid)
        if client is None:
            return None
        client.in_ready = False
        return None if client.paused else client

    def served(self, client: ClientRecord) -> None:
        """The client was given a job: its clock advances, and it queues for its next turn."""
        self.vclock = client.vtime
        client.vtime += 1.0 / client.weight
        self.add(client)
