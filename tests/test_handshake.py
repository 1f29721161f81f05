"""Unit tests of cw.wire.handshake: the exchange through real frames, forged and garbage frames."""
from __future__ import annotations

import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cw.errors import AuthenticationError, ProtocolError
from cw.wire import frames, handshake
from cw.wire.decoder import FrameDecoder
from cw.wire.frames import Frame

SECRET = b"s" * 32
OTHER_SECRET = b"t" * 32


def only_frame(encoded: bytes):
    """Decodes exactly one whole frame, as a peer does before the handshake; returns (kind, body)."""
    dec = FrameDecoder(frames.PREAUTH_MAX_FRAME)
    dec.feed(encoded)
    got = dec.next_frame()
    assert got is not None
    assert dec.next_frame() is None and dec.buffered == 0
    return got


def run_handshake(server_secret, peer_secret):
    """Runs the handshake through real frames; returns what each side saw."""
    server_nonce, challenge = handshake.server_challenge()
    ch_kind, ch_body = only_frame(challenge)
    peer_nonce, response = handshake.peer_response(peer_secret, ch_kind, ch_body)
    resp = only_frame(response)
    proof = handshake.verify_response(server_secret, server_nonce, *resp)
    pf = only_frame(proof)
    return {"server_nonce": server_nonce, "challenge": (ch_kind, ch_body), "peer_nonce": peer_nonce,
            "response": resp, "proof": pf}


def test_handshake_same_secret_succeeds_both_ways():
    """With one secret the server accepts the peer's RESPONSE and the peer accepts the server's PROOF."""
    h = run_handshake(SECRET, SECRET)
    assert h["response"][0] == Frame.RESPONSE and h["proof"][0] == Frame.PROOF
    assert handshake.verify_proof(SECRET, h["challenge"][1], h["peer_nonce"], *h["proof"]) is None


def test_handshake_frames_have_the_documented_layout():
    """CHALLENGE: version, nonce; RESPONSE: nonce, MAC; PROOF: MAC."""
    h = run_handshake(SECRET, SECRET)
    assert h["challenge"] == (Frame.CHALLENGE, bytes([frames.VERSION]) + h["server_nonce"])
    assert h["response"][1][:handshake.NONCE_SIZE] == h["peer_nonce"]
    assert len(h["response"][1]) == handshake.NONCE_SIZE + handshake.MAC_SIZE
    assert len(h["proof"][1]) == handshake.MAC_SIZE


def test_handshake_nonces_are_fresh():
    """Each challenge and each response uses a new random nonce."""
    a, b = run_handshake(SECRET, SECRET), run_handshake(SECRET, SECRET)
    assert a["server_nonce"] != b["server_nonce"] and a["peer_nonce"] != b["peer_nonce"]


def test_handshake_wrong_secret_fails_on_server():
    """A peer with another secret is refused by the server with AuthenticationError."""
    with pytest.raises(AuthenticationError):
        run_handshake(SECRET, OTHER_SECRET)


def test_replayed_response_fails_against_fresh_challenge():
    """A RESPONSE recorded from an earlier session does not pass a new challenge."""
    recorded = run_handshake(SECRET, SECRET)["response"]
    fresh_nonce, _ = handshake.server_challenge()
    with pytest.raises(AuthenticationError):
        handshake.verify_response(SECRET, fresh_nonce, *recorded)


def test_reflected_or_forged_proof_fails_on_peer():
    """The peer refuses its own MAC reflected back as PROOF, a random PROOF, and one from another session."""
    h = run_handshake(SECRET, SECRET)
    reflected = h["response"][1][handshake.NONCE_SIZE:]
    other_session = run_handshake(SECRET, SECRET)["proof"][1]
    for forged in (reflected, os.urandom(handshake.MAC_SIZE), other_session):
        with pytest.raises(AuthenticationError):
            handshake.verify_proof(SECRET, h["challenge"][1], h["peer_nonce"], Frame.PROOF, forged)


def test_proof_checked_with_another_secret_fails_on_peer():
    """A genuine PROOF does not pass a peer that holds a different secret."""
    h = run_handshake(SECRET, SECRET)
    with pytest.raises(AuthenticationError):
        handshake.verify_proof(OTHER_SECRET, h["challenge"][1], h["peer_nonce"], *h["proof"])


def test_wrong_protocol_version_says_to_install_same_version():
    """A CHALLENGE of another protocol version raises ProtocolError telling to install the same cw version."""
    body = bytes([frames.VERSION + 1]) + os.urandom(handshake.NONCE_SIZE)
    with pytest.raises(ProtocolError, match="install the same cw version"):
        handshake.peer_response(SECRET, Frame.CHALLENGE, body)


def test_error_frame_instead_of_challenge_raises_authentication_error():
    """An ERROR frame where the CHALLENGE should be raises AuthenticationError quoting the master's text."""
    kind, body = only_frame(frames.encode_error("too many connections"))
    with pytest.raises(AuthenticationError, match="too many connections"):
        handshake.peer_response(SECRET, kind, body)


def test_error_frame_instead_of_proof_raises_authentication_error():
    """The master's "authentication failed" ERROR where the PROOF should be raises AuthenticationError
    pointing at the secret file."""
    h = run_handshake(SECRET, SECRET)
    with pytest.raises(AuthenticationError, match="secret file"):
        handshake.verify_proof(SECRET, h["challenge"][1], h["peer_nonce"], Frame.ERROR,
                               handshake.AUTH_FAILED.encode() + b": bad secret")


def test_other_error_frame_instead_of_proof_is_retryable():
    """Any other ERROR there (say the master's handshake timeout on a loaded machine) is a ProtocolError,
    which a worker retries, never the wrong-secret error that stops it for good."""
    h = run_handshake(SECRET, SECRET)
    with pytest.raises(ProtocolError, match="no handshake"):
        handshake.verify_proof(SECRET, h["challenge"][1], h["peer_nonce"], Frame.ERROR,
                               b"no handshake and HELLO within 10 s")


def test_non_cw_server_is_a_protocol_error():
    """A first frame that is not a CHALLENGE (e.g. another service) raises ProtocolError."""
    with pytest.raises(ProtocolError, match="cw master"):
        handshake.peer_response(SECRET, Frame.HELLO, json.dumps({}).encode())


@settings(max_examples=300, deadline=None)
@given(kind=st.integers(0, 255), body=st.binary(max_size=80))
def test_random_handshake_frames_raise_only_cw_errors(kind, body):
    """Garbage handshake frames raise only ProtocolError or AuthenticationError, and never pass as a MAC."""
    nonce = os.urandom(handshake.NONCE_SIZE)
    try:
        handshake.peer_response(SECRET, kind, body)   # a well-formed CHALLENGE may pass: it holds no MAC
    except (ProtocolError, AuthenticationError):
        pass
    with pytest.raises((ProtocolError, AuthenticationError)):
        handshake.verify_response(SECRET, nonce, kind, body)
    with pytest.raises((ProtocolError, AuthenticationError)):
        handshake.verify_proof(SECRET, b"\x01" + nonce, nonce, kind, body)
