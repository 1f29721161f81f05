"""The writer thread of a blocking link (cw.wire.writer): a burst of posts
leaves in few sends, even when one send takes longer than the gap that
tells a burst from lone posts (a TLS link encrypts before it sends)."""
from __future__ import annotations

import socket
import threading
import time

from cw.wire import frames
from cw.wire.decoder import FrameDecoder
from cw.wire.frames import Frame
from cw.wire.link import Link


class SlowSends:
    """A real socket whose every send takes 2 ms more (as an encrypting or
    congested one would), counting them."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.sends = 0

    def sendall(self, data) -> None:
        self.sends += 1
        time.sleep(0.002)
        self.sock.sendall(data)

    def __getattr__(self, name):
        return getattr(self.sock, name)


def test_a_burst_of_posts_is_batched_though_each_send_is_slower_than_the_burst_gap():
    ours, theirs = socket.socketpair()
    slow = SlowSends(ours)
    link = Link(slow, FrameDecoder(), "peer")
    # A gap of 1 ms, still shorter than a send: a loaded machine can pause the
    # posting loop for more than the 50 us default, and that would be a lone post.
    link.start_writer(burst_gap=1e-3)
    received = bytearray()
    posts = 300
    messages = [frames.encode_json(Frame.HELLO, {"n": i}) for i in range(posts)]
    expected = b"".join(messages)

    def read():
        while len(received) < len(expected):
            received.extend(theirs.recv(65536))

    reader = threading.Thread(target=read)
    reader.start()
    for message in messages:       # back to back: a burst, whatever a send costs
        link.post(message)
    link.flush(30)
    reader.join(30)
    assert bytes(received) == expected           # all of it, in order
    # Counted from the start of a slow direct send, every post looked lone and
    # went out alone (300 sends); counted from its end, the burst is batched.
    assert slow.sends < posts / 10, slow.sends
    link.close()
    theirs.close()


def test_lone_posts_go_out_at_once_from_the_posting_thread():
    ours, theirs = socket.socketpair()
    link = Link(ours, FrameDecoder(), "peer")
    link.start_writer(burst_gap=50e-6)
    writer = link._writer
    for _ in range(3):
        time.sleep(0.01)          # far apart: each is a lone post (a round trip waits for it)
        link.post(frames.frame(Frame.PING))
        assert not writer.pending and not writer.sending      # sent by this thread, already out
        assert theirs.recv(100) == frames.frame(Frame.PING)
    link.close()
    theirs.close()
