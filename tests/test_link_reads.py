"""Reads of a blocking Link (cw.wire.link) with a timeout: on a plain socket
the kernel keeps the timeout (SO_RCVTIMEO) instead of a select() per read."""
from __future__ import annotations

import socket
import struct
import threading

import pytest

from cw.wire import frames
from cw.wire.decoder import FrameDecoder
from cw.wire.frames import Frame, Status
from cw.wire.link import Link


@pytest.fixture
def pair():
    ours, theirs = socket.socketpair()
    link = Link(ours, FrameDecoder(), "peer")
    yield link, theirs
    link.close()
    theirs.close()


def _kernel_timeout(sock) -> float:
    seconds, micros = struct.unpack("@ll", sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16))
    return seconds + micros / 1e6


def test_a_silent_peer_times_a_read_out_and_a_read_without_timeout_waits_again(pair):
    link, theirs = pair
    with pytest.raises(TimeoutError, match="nothing heard from the master at peer for 0.05 s"):
        link.recv(0.05)
    theirs.sendall(frames.frame(Frame.PING))
    assert link.recv(None) == (Frame.PING, b"")
    assert _kernel_timeout(link.sock) == 0.0      # no limit: the next read waits as long as it takes


def test_frames_come_whole_under_a_timeout_small_and_large(pair):
    link, theirs = pair
    big = b"\x07" * (frames.LARGE_FRAME + 12345)     # (read straight into its own buffer)
    data = b"".join(frames.encode_outcome(1, Status.OK, big)) + frames.frame(Frame.PING)
    sender = threading.Thread(target=theirs.sendall, args=(data,))
    sender.start()
    kind, body = link.recv(30.0)
    assert kind == Frame.OUTCOME and frames.decode_outcome(body).payload == big
    assert link.recv(30.0) == (Frame.PING, b"")
    sender.join()


def test_a_read_of_a_link_closed_here_says_so(pair):
    link, _ = pair
    link.sock.close()
    with pytest.raises(OSError, match="closed here"):
        link.recv(1.0)
