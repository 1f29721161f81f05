"""Fuzzing with bounded budgets: hostile bytes against a real master, and
hostile masters against the client/worker side of the handshake.

The master tests share one master for the module (hypothesis runs many
examples per test, and the ``master`` fixture is per test); after every
example an executor kept for the module checks that the master still serves.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from cw.errors import AuthenticationError, BrokenCluster, ProtocolError
from cw.launch.local import start_master
from cw.wire import frames, handshake
from cw.wire.auth import load_secret
from cw.wire.decoder import FrameDecoder
from cw.wire.frames import Frame
from cw.wire.link import open_link, peer_info

TIMEOUT = 10  # seconds; only catches a hang


def budget(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


OTHER_SECRET = b"not the cluster's secret, 32 b.."


# --- a real master, hostile peers ----------------------------------------------------

@pytest.fixture(scope="module")
def fuzzed_master(tmp_path_factory):
    """One master for the module, with an executor that checks it still serves."""
    log = open(tmp_path_factory.mktemp("fuzz-master") / "master.log", "w")
    cluster = start_master(port=0, stderr=log)
    try:
        executor = cluster.executor()
        try:
            yield cluster, executor
        finally:
            executor.shutdown()
    finally:
        cluster.stop()
        log.close()


ANY_TYPE = st.integers(0, 255)
SMALL_BODY = st.binary(max_size=200)


def some_frames(types=ANY_TYPE, bodies=SMALL_BODY):
    return st.builds(frames.frame, types, bodies)


def truncated(frame_strategy):
    return frame_strategy.flatmap(lambda f: st.integers(1, len(f) - 1).map(lambda n: f[:n]))


# Each attack is (kind, data); data is bytes, or a tuple the attack builds from
# the live CHALLENGE (a RESPONSE must answer this connection's nonce to look valid).
PREAUTH_ATTACKS = st.one_of(
    st.tuples(st.just("random bytes"), st.binary(min_size=1, max_size=6000)),
    st.tuples(st.just("random frames"), st.lists(some_frames(), min_size=1, max_size=4).map(b"".join)),
    st.tuples(st.just("truncated frame"), truncated(some_frames(bodies=st.binary(min_size=1, max_size=200)))),
    st.tuples(st.just("oversized length"), st.builds(
        lambda length, ftype, rest: frames.HEADER.pack(length, ftype) + rest,
        st.integers(frames.PREAUTH_MAX_FRAME + 1, 2**32 - 1), st.integers(0, 255), st.binary(max_size=100))),
    st.tuples(st.just("RESPONSE with a random MAC"), st.builds(
        lambda nonce, mac: frames.frame(Frame.RESPONSE, nonce + mac),
        st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32))),
    st.tuples(st.just("RESPONSE with another secret's MAC"), st.tuples(st.just("other secret"))),
    st.tuples(st.just("authenticated, then random frames"),
              st.tuples(st.just("authenticate"), st.lists(some_frames(), min_size=1, max_size=3).map(b"".join))),
)


def read_until_closed(sock):
    """Frames the master sends until it closes; and how it closed."""
    decoder = FrameDecoder(frames.DEFAULT_MAX_FRAME)
    got = []
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return got, "reset"
        if not data:
            assert decoder.buffered == 0, "the master closed in the middle of a frame"
            return got, "eof"
        decoder.feed(data)
        while (item := decoder.next_frame()) is not None:
            got.append(item)


def read_frame(sock, decoder):
    while (item := decoder.next_frame()) is None:
        data = sock.recv(65536)
        assert data, "the peer closed the connection early"
        decoder.feed(data)
    return item


def first_frame_is_complete(data: bytes, max_frame: int) -> bool:
    """Whether the master has enough of ``data`` to judge it: a whole first frame, or a bad length."""
    decoder = FrameDecoder(max_frame)
    decoder.feed(data)
    try:
        return decoder.next_frame() is not None
    except ProtocolError:
        return True


def is_valid_hello(data: bytes) -> bool:
    decoder = FrameDecoder(frames.DEFAULT_MAX_FRAME)
    decoder.feed(data)
    item = decoder.next_frame()
    if item is None or item[0] != Frame.HELLO:
        return False
    try:
        return frames.decode_json(item[1]).get("role") in ("client", "worker")
    except ProtocolError:
        return False


@budget(300)
@given(attack=PREAUTH_ATTACKS)
def test_a_hostile_peer_is_dropped_and_costs_the_master_nothing(fuzzed_master, attack):
    cluster, executor = fuzzed_master
    kind, data = attack
    secret = load_secret()
    with socket.create_connection((cluster.host, cluster.port), timeout=TIMEOUT) as sock:
        decoder = FrameDecoder(frames.PREAUTH_MAX_FRAME)
        ftype, challenge = read_frame(sock, decoder)
        assert ftype == Frame.CHALLENGE
        max_frame = frames.PREAUTH_MAX_FRAME
        if data == ("other secret",):
            data = handshake.peer_response(OTHER_SECRET, ftype, challenge)[1]
        elif isinstance(data, tuple):  # authenticate for real, then send the frames
            data = data[1]
            assume(not is_valid_hello(data))
            nonce, response = handshake.peer_response(secret, ftype, challenge)
            sock.sendall(response)
            handshake.verify_proof(secret, challenge, nonce, *read_frame(sock, decoder))
            max_frame = frames.DEFAULT_MAX_FRAME
        judged = first_frame_is_complete(data, max_frame)
        try:
            sock.sendall(data)
            if not judged:
                sock.shutdown(socket.SHUT_WR)  # the master cannot judge a partial frame: end it
        except (BrokenPipeError, ConnectionResetError):
            pass  # dropped while we were still sending
        got, how = read_until_closed(sock)  # the socket's timeout fails the test if it stays open
    event(f"{kind}: {'judged' if judged else 'partial'}, {len(got)} ERROR frame(s), {how}")

    assert [f for f in got if f[0] != Frame.ERROR] == [], f"the master answered {kind} with more than ERROR"
    if judged and len(data) <= frames.PREAUTH_MAX_FRAME:
        # It read all we sent: it says why, then closes cleanly.
        assert how == "eof" and len(got) == 1, (how, got)
        reason = got[0][1].decode()
        if kind.startswith("RESPONSE"):
            assert "does not match our secret" in reason
        elif kind == "oversized length":
            assert "exceeds the limit" in reason
    assert cluster.master.poll() is None, "the master died"
    assert isinstance(executor.status()["workers"], list)  # and it still serves a real client


# --- a hostile master, the client/worker side of the handshake -----------------------

CHALLENGE_TYPES = st.one_of(st.sampled_from([Frame.CHALLENGE, Frame.ERROR, Frame.PROOF]),
                            st.integers(0, 255))
PROOF_TYPES = st.one_of(st.sampled_from([Frame.PROOF, Frame.ERROR, Frame.CHALLENGE]),
                        st.integers(0, 255))


def near_valid_challenges():
    version = st.one_of(st.just(frames.VERSION), st.integers(0, 255))
    nonce = st.binary(min_size=handshake.NONCE_SIZE, max_size=handshake.NONCE_SIZE)
    return st.one_of(st.builds(lambda v, n: bytes([v]) + n, version, nonce), st.binary(max_size=80))


def near_valid_proofs():
    return st.one_of(st.binary(min_size=handshake.MAC_SIZE, max_size=handshake.MAC_SIZE), st.binary(max_size=80))


@budget(500)
@given(ftype=CHALLENGE_TYPES, body=near_valid_challenges())
def test_peer_response_accepts_only_a_well_formed_challenge(ftype, body):
    try:
        nonce, response = handshake.peer_response(load_secret(), ftype, body)
    except (ProtocolError, AuthenticationError):
        return
    assert ftype == Frame.CHALLENGE and len(body) == 1 + handshake.NONCE_SIZE and body[0] == frames.VERSION
    header = frames.HEADER.pack(handshake.NONCE_SIZE + handshake.MAC_SIZE, Frame.RESPONSE)
    assert response[:frames.HEADER_SIZE] == header


@budget(500)
@given(challenge=near_valid_challenges(), peer_nonce=st.binary(max_size=40), ftype=PROOF_TYPES,
       body=near_valid_proofs())
def test_verify_proof_refuses_every_forged_proof(challenge, peer_nonce, ftype, body):
    with pytest.raises((ProtocolError, AuthenticationError)):
        handshake.verify_proof(load_secret(), challenge, peer_nonce, ftype, body)


# What a hostile master sends instead of the CHALLENGE, or after a genuine one instead of the PROOF.
MASTER_SCRIPTS = st.one_of(
    st.tuples(st.just("challenge"), st.one_of(
        st.binary(max_size=300),
        st.lists(some_frames(CHALLENGE_TYPES, near_valid_challenges()), min_size=1, max_size=3).map(b"".join),
        truncated(some_frames(CHALLENGE_TYPES, near_valid_challenges())))),
    st.tuples(st.just("proof"), st.one_of(
        st.binary(max_size=300),
        st.lists(some_frames(PROOF_TYPES, near_valid_proofs()), min_size=1, max_size=3).map(b"".join),
        truncated(some_frames(PROOF_TYPES, near_valid_proofs())))),
)


class HostileMaster:
    """A listening socket whose one connection gets ``script`` (a function of
    the connection), then EOF; it records every byte the client sends until
    the client closes."""

    def __init__(self, script):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(TIMEOUT)
        self.port = self.server.getsockname()[1]
        self.received = bytearray()
        self.client_closed = False
        self.thread = threading.Thread(target=self._serve, args=(script,), daemon=True)
        self.thread.start()

    def _serve(self, script) -> None:
        try:
            conn, _ = self.server.accept()
        except TimeoutError:
            return
        with conn:
            conn.settimeout(TIMEOUT)
            try:
                script(conn)
                conn.shutdown(socket.SHUT_WR)  # then read all it says, so that closing sends no RST
                while chunk := conn.recv(65536):
                    self.received.extend(chunk)
                self.client_closed = True
            except ConnectionResetError:
                self.client_closed = True  # it closed with some of our garbage unread
            except TimeoutError:
                pass                       # it kept the connection open

    def close(self) -> list[int]:
        """Waits for the connection to end; returns the types of the frames the client sent."""
        self.thread.join(2 * TIMEOUT)
        self.server.close()
        assert not self.thread.is_alive()
        decoder = FrameDecoder(frames.DEFAULT_MAX_FRAME)
        decoder.feed(bytes(self.received))
        sent = []
        while (item := decoder.next_frame()) is not None:
            sent.append(item[0])
        assert decoder.buffered == 0, "the client sent a partial frame"
        return sent


def connect_client(port):
    return open_link("127.0.0.1", port, load_secret(), peer_info("client"), connect_timeout=TIMEOUT)


@budget(100)
@given(script=MASTER_SCRIPTS)
def test_open_link_refuses_a_hostile_master(script):
    """open_link against a master that answers garbage raises a cw error (never
    hangs, never returns a link) and sends nothing after its RESPONSE."""
    stage, data = script
    if stage == "proof":
        data = frames.frame(Frame.CHALLENGE, bytes([frames.VERSION]) + os.urandom(handshake.NONCE_SIZE)) + data
    hostile = HostileMaster(lambda conn: conn.sendall(data))
    try:
        link = connect_client(hostile.port)
    except (ProtocolError, AuthenticationError, BrokenCluster) as exc:
        event(f"{stage}: {type(exc).__name__}")
    else:
        link.close()
        pytest.fail("open_link accepted a master that never proved it holds the secret")
    sent = hostile.close()
    assert hostile.client_closed
    assert sent in ([], [Frame.RESPONSE]), f"the client sent {sent} to a master that never proved itself"


def hang_up_at_once(conn):
    pass


def hang_up_after_the_handshake(conn):
    """A master that proves itself, reads HELLO, then hangs up instead of WELCOME."""
    secret = load_secret()
    nonce, challenge = handshake.server_challenge()
    conn.sendall(challenge)
    decoder = FrameDecoder(frames.PREAUTH_MAX_FRAME)
    conn.sendall(handshake.verify_response(secret, nonce, *read_frame(conn, decoder)))
    decoder.max_frame = frames.DEFAULT_MAX_FRAME
    assert read_frame(conn, decoder)[0] == Frame.HELLO


@pytest.mark.parametrize("script", [hang_up_at_once, hang_up_after_the_handshake],
                         ids=["before-the-challenge", "instead-of-welcome"])
def test_open_link_closes_its_socket_when_the_master_hangs_up(script):
    """Found by the fuzzer above: the error must not keep the connection open.
    The exception is kept alive here, as a caller that logs or stores it would."""
    hostile = HostileMaster(script)
    with pytest.raises(BrokenCluster) as refused:
        connect_client(hostile.port)
    hostile.close()
    assert hostile.client_closed, f"open_link raised {refused.value!r} but left its socket open"


# --- the atheris harness ------------------------------------------------------------

HARNESS = Path(__file__).with_name("fuzz_atheris_decoder.py")


def test_atheris_harness_finds_nothing_in_2000_runs(tmp_path):
    pytest.importorskip("atheris", reason="atheris is not installed (pip install atheris); "
                                          f"{HARNESS.name} needs it")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(HARNESS.parent.parent),
                                                                     os.environ.get("PYTHONPATH")])))
    # In tmp_path: libFuzzer writes crash-* reproducers into its working directory.
    proc = subprocess.run([sys.executable, str(HARNESS), "-runs=2000", "-seed=1"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-5000:]
    assert "Done 2000 runs" in proc.stderr, proc.stderr[-5000:]
