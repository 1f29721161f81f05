"""The master's side of big frames by reference (see cw.wire.segments).

A peer that proved at HELLO that it shares our machine sends big frames as
BY_SEGMENT: the master maps the segment, keeps its own descriptor of it as
long as the payload lives (the job's record holds it, for re-runs), and
answers RELEASE.  A frame whose payload is such a segment goes on to a peer
of the same machine by reference again (the master never touches the
bytes), and to any other peer as the bytes, read from the mapping.
"""
from __future__ import annotations

import itertools
import resource

from cw.wire import segments
from cw.wire.frames import Frame

#: How many frames came in and went out by reference (shown in the master's status).
COUNTS = {"received": 0, "sent": 0}
#: Most segments whose descriptor the master keeps (each job waiting with a big
#: payload keeps one): beyond that, payloads are mapped and their descriptor
#: closed, and they go on as bytes, so thousands of queued big jobs cannot use
#: up the master's descriptors (whose soft limit is often 1024).
KEEP_MAX = resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 4


class PeerSharing:
    """One connection's side of it: whether the peer can open our segments,
    and the segments we sent it, held until it answers RELEASE."""

    def __init__(self):
        self.peer_opened = False    # we can open the peer's segments
        self.enabled = False        # and the peer said (SHARING) that it can open ours
        self.held: dict[int, tuple] = {}   # token -> (mapping, size) until the peer's RELEASE
        self.held_bytes = 0
        self.tokens = itertools.count(1)

    def welcome_fields(self, hello: dict) -> dict:
        """Tests the peer's probe; what WELCOME tells the peer about it."""
        self.peer_opened = segments.can_open(hello.get("probe"))
        return {"probe": segments.probe(), "peer_opened": self.peer_opened}

    def frame(self, ftype: int, body, write):
        """Handles a frame of kinds 40-42; returns the frame a BY_SEGMENT names,
        or None.  ``write`` sends our RELEASE."""
        if ftype == Frame.SHARING:
            self.enabled = self.peer_opened
        elif ftype == Frame.RELEASE:
            held = self.held.pop(segments.decode_release(body), None)
            if held is not None:
                self.held_bytes -= held[1]
        else:
            kind, body, token = segments.open_ref(body, keep_fd=segments.kept_count() < KEEP_MAX)
            write([segments.encode_release(token)])
            COUNTS["received"] += 1
            return kind, body
        return None

    def outgoing(self, data):
        """A ``(head, payload)`` frame for this peer: a BY_SEGMENT frame when
        the payload is a segment we keep and the peer can open it."""
        if not self.enabled:
            return data
        kept = segments.kept_segment(data[1])
        if kept is None:
            return data
        segment, mapping = kept
        if not segments.may_hold(self.held_bytes, segment.length):
            return data                 # a peer slow to RELEASE: the socket's backpressure takes over
        kind, fields, _ = segments.split_frame(data)
        token = next(self.tokens)
        self.held[token] = (mapping, segment.length)   # our descriptor stays open until the peer's RELEASE
        self.held_bytes += segment.length
        COUNTS["sent"] += 1
        return segments.encode_kept_ref(kind, segment, token, fields)

    def lost(self) -> None:
        self.held.clear()
        self.held_bytes = 0
