"""Job events for watchers such as the dashboard: which job ran on which
worker, for which client, from when to when, and how it ended.

A client sends SUBSCRIBE and from then on gets an EVENTS frame twice a
second (none when nothing happened)::

    {"t": 1700000000.25,                 # the master's wall clock when sent
     "fields": ["job", "client", "worker", "function", "start", "end", "outcome", "traceback", "output"],
     "events": [[17, 3, 5, "__main__.square", 1700000000.01, 1700000000.02, "ok", null, "hi\n"], ...],
     "dropped": 0,                       # events not kept since the last frame (the bound below)
     "missed": 0,                        # events this subscriber was not sent while it was slow
     "counts": {"ok": 120, "raised": 2}} # jobs ended, by outcome, since a subscriber came to a master
                                         # that had none (the counts start again after the last leaves)

An event with ``end`` null says the job started; a job that started and
ended between two frames is one event with both times (coalesced).
``outcome`` is "ok", "raised", "lost" (its worker died) or "cancelled"
(nobody wanted the result any more).  ``traceback`` is the remote
traceback of a job that raised, read from its outcome's pickle as text
(the master never unpickles); ``output`` what the job printed.  Both are
cut to ``MAX_TEXT`` characters, the traceback keeping its end.

The master must never pay much for being watched:
- While nobody subscribes, ``Dispatcher.events`` is None and the
  dispatcher's hooks cost one attribute test per job.
- At most ``MAX_PENDING`` events wait for the next frame; more are counted
  as dropped, never queued.  ``counts`` stays exact regardless.
- A subscriber that reads slower than we write (its connection is paused,
  or holds more than the write buffer's high-water mark) gets no frames
  until it catches up; what it missed is counted in its own ``missed``.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time

from cw import settings
from cw.wire import frames
from cw.wire.frames import Frame, Status

log = logging.getLogger("cw.master")

FIELDS = ("job", "client", "worker", "function", "start", "end", "outcome", "traceback", "output")
#: Seconds between two EVENTS frames (the dashboard redraws once a second).
INTERVAL = 0.5
#: Events kept for the next frame at most (the rest are dropped, with a count).
MAX_PENDING = 500
#: Start times of running jobs kept at most (a job given back never ends here).
MAX_RUNNING = 100_000
#: Function names remembered by digest.
MAX_LABELS = 4096
#: Bytes of a payload's head searched for the name of its function.
_HEAD = 512
#: Bytes of a payload's head that name its function (a by-reference pickle's
#: frame header, module and name), the key of the labels remembered.
_KEY = 128
#: Characters of a traceback or of a job's output an event carries at most.
MAX_TEXT = 4000
_TRACEBACK = b"Traceback (most recent call last)"

OUTCOMES = {Status.OK: "ok", Status.RAISED: "raised", Status.LOST: "lost"}
_LOST, _RAISED = int(Status.LOST), int(Status.RAISED)   # plain ints: an enum member's lookup costs more per job


def _string_at(data: bytes, i: int) -> tuple[str, int] | None:
    """A pickle's SHORT_BINUNICODE at ``i``: (text, index after it and its MEMOIZE)."""
    if data[i:i + 1] != b"\x8c" or i + 2 > len(data):
        return None
    end = i + 2 + data[i + 1]
    text = data[i + 2:end].decode("utf-8", "replace")
    if data[end:end + 1] == b"\x94":
        end += 1
    return text, end


def function_name(data, limit: int = _HEAD) -> str | None:
    """The name of the function a pickled call names, read from the pickle's
    opcodes without unpickling it (the master never does): the first
    ``module``, ``name``, STACK_GLOBAL of its head, or the ``__qualname__``
    of a function cloudpickle sent by value.  None when neither is found."""
    head = bytes(data[:limit])
    if head[:1] == b"\xff" and len(head) >= 13:       # out-of-band envelope: its pickle follows the lengths
        count = int.from_bytes(head[1:5], "big")
        head = bytes(data[13 + 8 * count:13 + 8 * count + limit])
    key = head.find(b"\x8c\x0c__qualname__\x94")
    if key != -1:
        found = _string_at(head, key + 15)
        if found is not None:
            return found[0]
    i = head.find(b"\x8c")
    while i != -1:
        module = _string_at(head, i)
        if module is not None:
            name = _string_at(head, module[1])
            if name is not None and head[name[1]:name[1] + 1] == b"\x93":
                return f"{module[0]}.{name[0]}"
        i = head.find(b"\x8c", i + 1)
    return None


def traceback_text(data) -> str | None:
    """The traceback text in a RAISED outcome's pickle (``(exception,
    text)``, see cw.wire.payload), found as a pickled string without
    unpickling; its last MAX_TEXT characters.  None if there is none."""
    data = bytes(data[:1 << 20])
    at = data.find(_TRACEBACK)
    if at >= 5 and data[at - 5] == 0x58:            # BINUNICODE: u32 little-endian length
        size = int.from_bytes(data[at - 4:at], "little")
    elif at >= 2 and data[at - 2] == 0x8C:          # SHORT_BINUNICODE: u8 length
        size = data[at - 1]
    else:
        return None
    return data[at:at + size].decode("utf-8", "replace")[-MAX_TEXT:]


class EventFeed:
    """The events of one master, gathered between two frames (no I/O).
    ``clock`` gives wall-clock seconds (time.time), for people to read."""

    def __init__(self, functions=None, clock=time.time, max_pending: int = MAX_PENDING, running=None):
        self.functions = functions          # the dispatcher's FunctionStore: names of functions sent by digest
        self.clock = clock
        self.max_pending = max_pending
        self.running = running              # () -> (job, worker) pairs running now (see full_since)
        self.full_since = None              # when the events filled up (MAX_PENDING) since the last take()
        self.pending: dict[int, list] = {}  # gid -> event
        self.fresh: dict[int, tuple] = {}   # gid -> (job, worker, start) of jobs started since the last take()
        self.starts: dict[int, float] = {}  # gid -> start, of jobs running since before the last take()
        self.dropped = 0                    # events not kept since the last take()
        self.counts: dict[str, int] = {}
        self._labels: dict[bytes, str] = {}

    # --- the dispatcher's hooks ---------------------------------------------

    def started(self, job, worker) -> None:
        """``job`` runs on ``worker`` from now (called again later: no effect).

        While the events are full (MAX_PENDING since the last frame) a start
        is not timed: its event could not go in this frame anyway, and the
        master saves a clock read and a record per job just when it is
        busiest (B1 with a dashboard: most of what watching cost it).  A job
        that started then and still runs at take() is given the time the
        events filled up (at most INTERVAL early) from ``running``."""
        if len(self.pending) >= self.max_pending:
            return
        gid = job.gid
        fresh = self.fresh
        if gid in fresh or gid in self.starts:
            return
        if len(fresh) < MAX_RUNNING:                # its event is made at its end, or at take() if it still runs
            fresh[gid] = (job, worker, self.clock())

    def ended(self, job, worker, status: int, payload=b"") -> None:
        """``job`` ended on ``worker`` with ``status`` (a frames.Status) and
        its outcome's ``payload``."""
        gid = job.gid
        fresh = self.fresh.pop(gid, None)
        start = fresh[2] if fresh is not None else self.starts.pop(gid, None)
        outcome = "cancelled" if job.client is None and status != _LOST else OUTCOMES.get(status, "?")
        counts = self.counts
        counts[outcome] = counts.get(outcome, 0) + 1
        event = self.pending.get(gid)
        if event is None:
            if len(self.pending) >= self.max_pending:   # the common case under load: no event, no clock read
                self.dropped += 1
                return
            now = self.clock()
            event = self._add(gid, job, worker, now if start is None else start)
        else:
            now = self.clock()
        event[5], event[6] = now, outcome           # it started since the last frame: one event says both
        if status == _RAISED:
            event[7] = traceback_text(payload)

    def output(self, job, worker, text: bytes) -> None:
        """What ``job`` printed (it comes just before its outcome)."""
        fresh = self.fresh.get(job.gid)
        start = fresh[2] if fresh is not None else self.starts.get(job.gid)
        event = self.pending.get(job.gid) or self._add(job.gid, job, worker, start)
        if event is not None:
            event[8] = bytes(text[:4 * MAX_TEXT]).decode("utf-8", "replace")[-MAX_TEXT:]

    def _add(self, gid: int, job, worker, start) -> list | None:
        if len(self.pending) >= self.max_pending:
            self.dropped += 1
            return None
        client = job.client.cid if job.client is not None else None
        event = self.pending[gid] = [job.jobid, client, worker.wid, self.label(job.payload), start, None, None,
                                     None, None]
        if len(self.pending) >= self.max_pending:   # full: the starts from now on are not timed one by one
            self.full_since = self.clock()
        return event

    def label(self, payload) -> str:
        """What the dashboard calls a job's function: its name when the
        payload's pickle says it, else a short digest."""
        if payload is None:
            return "?"
        if payload[:1] == b"\xfe":                  # names its function by digest (frames.FUNCTION_MARK)
            digest = frames.function_digest(payload)
            label = self._labels.get(digest)
            if label is None:
                data = self.functions.frames.get(digest, b"") if self.functions is not None else b""
                label = function_name(memoryview(data)[frames.HEADER_SIZE + frames.DIGEST_SIZE:], 1 << 16) \
                    or f"fn:{digest.hex()[:8]}"
                if len(self._labels) >= MAX_LABELS:
                    self._labels.clear()
                self._labels[digest] = label
            return label
        head = bytes(payload[:_KEY])
        skip = 11 if head[:3] == b"\x80\x05\x95" else 0   # protocol 5 and its FRAME length, which the arguments change
        cut = head.find(b"\x93")                   # STACK_GLOBAL: the function's name ends before it
        head = head[skip:cut] if cut != -1 else head   # the key of one kind of call, whatever its arguments
        label = self._labels.get(head)
        if label is None:
            label = function_name(payload) or "?"
            if len(self._labels) >= MAX_LABELS:
                self._labels.clear()
            self._labels[head] = label
        return label

    # --- the frames ---------------------------------------------------------

    def take(self) -> tuple[list, int]:
        """(events since the last take, how many were dropped meanwhile)."""
        starts = self.starts
        for gid, (job, worker, start) in self.fresh.items():
            if job.gid == gid and job.worker is worker and job.payload is not None:
                if gid not in self.pending:         # (its output made its event already)
                    self._add(gid, job, worker, start)   # started, still running (not given back and sent again)
                starts[gid] = start
        if self.full_since is not None and self.running is not None:
            for job, worker in self.running():  # those that started while the events were full
                if job.gid not in starts and job.worker is worker and job.payload is not None:
                    starts[job.gid] = self.full_since
        self.full_since = None
        self.fresh = {}
        while len(starts) > MAX_RUNNING:            # jobs given back never end here: forget the oldest
            del starts[next(iter(starts))]
        events, dropped = list(self.pending.values()), self.dropped
        self.pending = {}
        self.dropped = 0
        return events, dropped


class Watchers:
    """The master's subscribers and the task that sends them EVENTS.

    A subscriber is anything with ``write(chunks)`` and ``transport``
    (cw.master.server.PeerConnection).  The feed is the dispatcher's while
    at least one subscriber is there, and gone (None) when the last leaves."""

    def __init__(self, dispatcher, clock=time.time, interval: float = INTERVAL):
        self.dispatcher = dispatcher
        self.clock = clock
        self.interval = interval
        self.subscribers: dict = {}         # subscriber -> events it missed (it was slow)
        self.feed: EventFeed | None = None
        self.task = None

    def subscribe(self, peer) -> None:
        if self.feed is None:
            workers = self.dispatcher.workers
            self.feed = EventFeed(self.dispatcher.functions, self.clock,
                                  running=lambda: ((job, w) for w in workers.values() for job in w.running()))
            self.dispatcher.events = self.feed
        self.subscribers.setdefault(peer, 0)
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._run())

    def unsubscribe(self, peer) -> None:
        if self.subscribers.pop(peer, None) is not None and not self.subscribers:
            self.dispatcher.events = None
            self.feed = None    # a later subscriber's counts start again from 0
            if self.task is not None:
                self.task.cancel()
                self.task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.send()
            except Exception:  # a bug here must cost the watchers a frame, never their feed for good
                log.exception("internal error while sending job events to %d subscribers", len(self.subscribers))

    def send(self) -> None:
        """One EVENTS frame to each subscriber that keeps up; the others are
        told next time how many they missed."""
        if self.feed is None:
            return
        events, dropped = self.feed.take()
        if not events and not dropped and not any(self.subscribers.values()):
            return                          # nothing to say, and nobody to tell what it missed
        now = self.clock()
        bodies: dict[int, bytes] = {}       # by missed count: usually one body for all
        for peer in list(self.subscribers):
            missed = self.subscribers[peer]
            transport = peer.transport
            if transport.is_closing():
                continue
            if getattr(peer, "reading_paused", False) or \
                    transport.get_write_buffer_size() > settings.WRITE_HIGH_WATER:
                self.subscribers[peer] = missed + len(events)
                continue
            body = bodies.get(missed)
            if body is None:
                body = bodies[missed] = json.dumps(
                    {"t": now, "fields": FIELDS, "events": events, "dropped": dropped, "missed": missed,
                     "counts": self.feed.counts},
                    separators=(",", ":")).encode()
            self.subscribers[peer] = 0
            peer.write([frames.frame(Frame.EVENTS, body)])
