"""Unit tests of cw.protocol: frames, body codecs, the incremental decoder, the handshake."""
from __future__ import annotations

import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cw.errors import AuthenticationError, ProtocolError
from cw.wire import protocol as p

SECRET = b"s" * 32
OTHER_SECRET = b"t" * 32


def raw(encoded) -> bytes:
    """An encoder's output as one bytes object (encoders return bytes or (head, payload))."""
    return b"".join(encoded) if isinstance(encoded, tuple) else encoded


def only_frame(encoded, max_frame=p.DEFAULT_MAX_FRAME):
    """Decodes exactly one whole frame and nothing else; returns (type, body)."""
    dec = p.FrameDecoder(max_frame)
    dec.feed(raw(encoded))
    got = dec.next_frame()
    assert got is not None
    assert dec.next_frame() is None and dec.buffered == 0
    return got


def drain(dec):
    frames = []
    while (f := dec.next_frame()) is not None:
        frames.append(f)
    return frames


# --- round trips -------------------------------------------------------------

ROUND_TRIPS = [
    # (encoded frame, expected type, decoder, expected decoded value)
    (p.encode_json(p.HELLO, {"role": "worker", "host": "h", "pid": 3}), p.HELLO,
     p.decode_json, {"role": "worker", "host": "h", "pid": 3}),
    (p.encode_submit(2**64 - 1, 7, 2.5, b"payload"), p.SUBMIT, p.decode_submit, (2**64 - 1, 7, 2.5, b"payload")),
    (p.encode_submit(1, 255, 0.0, b""), p.SUBMIT, p.decode_submit, (1, 255, 0.0, b"")),
    (p.encode_cancel(42), p.CANCEL, p.decode_cancel, 42),
    (p.encode_job(5, 2**32 - 1, 30.0, b"\x00job"), p.JOB, p.decode_job, (5, 2**32 - 1, 30.0, b"\x00job")),
    (p.encode_outcome(9, p.OK, b"ok"), p.OUTCOME, p.decode_outcome, (9, p.OK, b"ok")),
    (p.encode_outcome(9, p.RAISED, b"exc"), p.OUTCOME, p.decode_outcome, (9, p.RAISED, b"exc")),
    (p.encode_result(11, p.OK, b"host:123", b"value"), p.RESULT, p.decode_result,
     (11, p.OK, b"host:123", b"value")),
    (p.encode_result(12, p.LOST, b"", b'{"attempts":3}'), p.RESULT, p.decode_result,
     (12, p.LOST, b"", b'{"attempts":3}')),
    (p.encode_cancelled(13, True), p.CANCELLED, p.decode_cancelled, (13, True)),
    (p.encode_cancelled(14, False), p.CANCELLED, p.decode_cancelled, (14, False)),
    (p.encode_context_for_worker(3, b'{"cwd":"/x","path":["/y"]}'), p.CONTEXT, p.decode_context_for_worker,
     (3, {"cwd": "/x", "path": ["/y"]})),
    (p.encode_status_request(77), p.STATUS_REQ, p.decode_status_request, 77),
    (p.encode_status(78, {"workers": [], "queued": 0}), p.STATUS, p.decode_status,
     (78, {"workers": [], "queued": 0})),
]


@pytest.mark.parametrize("encoded, ftype, decode, expected", ROUND_TRIPS,
                         ids=[p.FRAME_NAMES[t] for _, t, _, _ in ROUND_TRIPS])
def test_encoders_round_trip(encoded, ftype, decode, expected):
    """Each encoder's frame has the right type and its decoder gives back the fields."""
    got_type, body = only_frame(encoded)
    assert got_type == ftype
    assert decode(body) == expected


def test_error_frame_carries_utf8_text_and_fits_before_auth():
    """ERROR frames carry UTF-8 text, cut so that even a long one passes the pre-auth limit."""
    assert only_frame(p.encode_error("bad secret é")) == (p.ERROR, "bad secret é".encode())
    ftype, body = only_frame(p.encode_error("x" * 100_000), max_frame=p.PREAUTH_MAX_FRAME)
    assert ftype == p.ERROR and 0 < len(body) <= p.PREAUTH_MAX_FRAME


# --- FrameDecoder --------------------------------------------------------------

def _many_frames():
    return [
        p.frame(p.HELLO, b""),
        raw(p.encode_submit(1, 3, 0.0, b"a" * 300)),
        p.encode_cancel(1),
        raw(p.encode_job(2, 1, 0.0, b"")),
        raw(p.encode_result(3, p.OK, b"h:1", bytes(range(256)))),
        p.encode_error("bye"),
    ] * 5


def test_decoder_one_byte_at_a_time_returns_all_frames_in_order():
    """Fed a stream of many frames byte by byte, the decoder returns each frame once, in order."""
    frames = _many_frames()
    stream = b"".join(frames)
    dec = p.FrameDecoder()
    got = []
    for i in range(len(stream)):
        dec.feed(stream[i:i + 1])
        got.extend(drain(dec))
    assert got == [(f[4], f[5:]) for f in frames]
    assert dec.buffered == 0


@pytest.mark.parametrize("encoded", [p.frame(p.HELLO, b""), raw(p.encode_submit(1, 2, 0.0, b"xyz" * 10))])
def test_decoder_frame_split_at_every_position(encoded):
    """A frame cut in two anywhere is returned only once its last byte arrives."""
    for cut in range(len(encoded) + 1):
        dec = p.FrameDecoder()
        dec.feed(encoded[:cut])
        if cut < len(encoded):
            assert dec.next_frame() is None
            assert dec.buffered == cut
        dec.feed(encoded[cut:])
        assert drain(dec) == [(encoded[4], encoded[5:])]
        assert dec.buffered == 0


def test_decoder_two_frames_split_at_every_position():
    """Two back-to-back frames cut anywhere come out whole and in order."""
    stream = raw(p.encode_job(1, 2, 0.0, b"first")) + p.encode_cancel(9)
    for cut in range(len(stream) + 1):
        dec = p.FrameDecoder()
        dec.feed(stream[:cut])
        got = drain(dec)
        dec.feed(stream[cut:])
        got += drain(dec)
        assert [t for t, _ in got] == [p.JOB, p.CANCEL]
        assert p.decode_job(got[0][1]) == (1, 2, 0.0, b"first") and p.decode_cancel(got[1][1]) == 9


def test_oversized_length_raises_at_header_before_body():
    """A length above max_frame raises ProtocolError once the 5-byte header is in, without waiting for the body."""
    dec = p.FrameDecoder(p.PREAUTH_MAX_FRAME)
    header = p.HEADER.pack(p.PREAUTH_MAX_FRAME + 1, p.HELLO)
    for byte in header[:-1]:
        dec.feed(bytes([byte]))
        assert dec.next_frame() is None
    dec.feed(header[-1:])
    with pytest.raises(ProtocolError, match="exceeds"):
        dec.next_frame()
    assert dec.buffered == p.HEADER_SIZE


def test_huge_length_raises_even_with_default_limit():
    """A 4 GiB length prefix is refused at once by a decoder with the default limit."""
    dec = p.FrameDecoder()
    dec.feed(p.HEADER.pack(2**32 - 1, p.JOB) + b"abc")
    with pytest.raises(ProtocolError):
        dec.next_frame()
    assert dec.buffered < 16


def test_frame_of_exactly_max_frame_is_accepted_and_limit_can_be_raised():
    """The limit is inclusive, and raising max_frame after the handshake admits bigger frames."""
    dec = p.FrameDecoder(p.PREAUTH_MAX_FRAME)
    dec.feed(p.frame(p.HELLO, b"x" * p.PREAUTH_MAX_FRAME))
    assert dec.next_frame() == (p.HELLO, b"x" * p.PREAUTH_MAX_FRAME)
    dec.max_frame = p.DEFAULT_MAX_FRAME
    dec.feed(p.frame(p.HELLO, b"y" * (p.PREAUTH_MAX_FRAME + 1)))
    assert dec.next_frame() == (p.HELLO, b"y" * (p.PREAUTH_MAX_FRAME + 1))


# --- malformed bodies ------------------------------------------------------------

MALFORMED = [
    (p.decode_submit, b"\x00" * 16),
    (p.decode_cancel, b"\x00" * 7),
    (p.decode_job, b"\x00" * 19),
    (p.decode_outcome, b"\x00" * 8),
    (p.decode_result, b"\x00" * 9),
    (p.decode_result, b"\x00" * 9 + b"\x05abc"),          # label of 5 bytes, only 3 present
    (p.decode_cancelled, b"\x00" * 8),
    (p.decode_context_for_worker, b"\x00" * 3),
    (p.decode_status_request, b""),
    (p.decode_status, b"\x00\x00"),
    (p.decode_json, b""),
    (p.decode_json, b'{"a": 1'),
    (p.decode_json, b"\xff\xfe\x00garbage"),
    (p.decode_json, b"[1, 2]"),
    (p.decode_json, b"3"),
    (p.decode_json, b'"text"'),
    (p.decode_json, b"null"),
    (p.decode_context_for_worker, b"\x00\x00\x00\x01not json"),
    (p.decode_context_for_worker, b"\x00\x00\x00\x01[]"),
    (p.decode_status, b"\x00\x00\x00\x01[]"),
    (p.decode_outcome, b"\x00" * 8 + bytes([p.LOST]) + b"x"),   # workers may not claim LOST
    (p.decode_outcome, b"\x00" * 8 + b"\x07"),
    (p.decode_outcome, b"\x00" * 8 + b"\xff"),
]


@pytest.mark.parametrize("decode, body", MALFORMED)
def test_malformed_body_raises_protocol_error(decode, body):
    """Bodies too short for their fixed fields, bad or non-object JSON, unknown OUTCOME status: ProtocolError."""
    with pytest.raises(ProtocolError):
        decode(body)


def test_deeply_nested_json_is_a_protocol_error():
    """JSON nested deeper than the parser's recursion limit (fits in 4 KiB) raises ProtocolError, not RecursionError."""
    with pytest.raises(ProtocolError):
        p.decode_json(b"[" * 4000)


DECODERS = [p.decode_json, p.decode_submit, p.decode_cancel, p.decode_job, p.decode_outcome, p.decode_result,
            p.decode_cancelled, p.decode_context_for_worker, p.decode_status_request, p.decode_status]


def reference_parse(stream: bytes, max_frame: int):
    """Frames a plain reading of the format finds in ``stream``, and whether a length exceeds max_frame."""
    frames, pos = [], 0
    while len(stream) - pos >= p.HEADER_SIZE:
        length, ftype = p.HEADER.unpack_from(stream, pos)
        if length > max_frame:
            return frames, True
        if len(stream) - pos - p.HEADER_SIZE < length:
            break
        frames.append((ftype, stream[pos + p.HEADER_SIZE:pos + p.HEADER_SIZE + length]))
        pos += p.HEADER_SIZE + length
    return frames, False


@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(st.binary(max_size=64), max_size=20))
def test_random_bytes_to_preauth_decoder_raise_only_protocol_error(chunks):
    """Random bytes fed to a pre-auth FrameDecoder give the frames they hold, or ProtocolError, nothing else."""
    expected, too_big = reference_parse(b"".join(chunks), p.PREAUTH_MAX_FRAME)
    dec = p.FrameDecoder(p.PREAUTH_MAX_FRAME)
    got = []
    try:
        for chunk in chunks:
            dec.feed(chunk)
            got += drain(dec)
    except ProtocolError:
        assert too_big
    else:
        assert not too_big
    assert got == expected


@settings(max_examples=300, deadline=None)
@given(decode=st.sampled_from(DECODERS), body=st.binary(max_size=64))
def test_random_bodies_to_decoders_raise_only_protocol_error(decode, body):
    """Every decode_* function either decodes random bytes or raises ProtocolError, nothing else."""
    try:
        decode(body)
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(ftype=st.integers(0, 255), body=st.binary(max_size=80))
def test_random_handshake_frames_raise_only_cw_errors(ftype, body):
    """Garbage handshake frames raise only ProtocolError or AuthenticationError, and never pass as a MAC."""
    nonce = os.urandom(p.NONCE_SIZE)
    try:
        p.peer_response(SECRET, ftype, body)   # a well-formed CHALLENGE may pass: it holds no MAC
    except (ProtocolError, AuthenticationError):
        pass
    with pytest.raises((ProtocolError, AuthenticationError)):
        p.verify_response(SECRET, nonce, ftype, body)
    with pytest.raises((ProtocolError, AuthenticationError)):
        p.verify_proof(SECRET, b"\x01" + nonce, nonce, ftype, body)


# --- handshake -------------------------------------------------------------------

def handshake(server_secret, peer_secret):
    """Runs the handshake through real frames; returns what each side saw."""
    server_nonce, challenge = p.server_challenge()
    ch_type, ch_body = only_frame(challenge, p.PREAUTH_MAX_FRAME)
    peer_nonce, response = p.peer_response(peer_secret, ch_type, ch_body)
    resp = only_frame(response, p.PREAUTH_MAX_FRAME)
    proof = p.verify_response(server_secret, server_nonce, *resp)
    pf = only_frame(proof, p.PREAUTH_MAX_FRAME)
    return {"server_nonce": server_nonce, "challenge": ch_body, "peer_nonce": peer_nonce,
            "response": resp, "proof": pf}


def test_handshake_same_secret_succeeds_both_ways():
    """With one secret the server accepts the peer's RESPONSE and the peer accepts the server's PROOF."""
    h = handshake(SECRET, SECRET)
    assert h["response"][0] == p.RESPONSE and h["proof"][0] == p.PROOF
    assert p.verify_proof(SECRET, h["challenge"], h["peer_nonce"], *h["proof"]) is None


def test_handshake_nonces_are_fresh():
    """Each challenge and each response uses a new random nonce."""
    a, b = handshake(SECRET, SECRET), handshake(SECRET, SECRET)
    assert a["server_nonce"] != b["server_nonce"] and a["peer_nonce"] != b["peer_nonce"]


def test_handshake_wrong_secret_fails_on_server():
    """A peer with another secret is refused by the server with AuthenticationError."""
    with pytest.raises(AuthenticationError):
        handshake(SECRET, OTHER_SECRET)


def test_replayed_response_fails_against_fresh_challenge():
    """A RESPONSE recorded from an earlier session does not pass a new challenge."""
    recorded = handshake(SECRET, SECRET)["response"]
    fresh_nonce, _ = p.server_challenge()
    with pytest.raises(AuthenticationError):
        p.verify_response(SECRET, fresh_nonce, *recorded)


def test_reflected_or_forged_proof_fails_on_peer():
    """The peer refuses its own MAC reflected back as PROOF, a random PROOF, and one from another session."""
    h = handshake(SECRET, SECRET)
    reflected = h["response"][1][p.NONCE_SIZE:]
    other_session = handshake(SECRET, SECRET)["proof"][1]
    for forged in (reflected, os.urandom(p.MAC_SIZE), other_session):
        with pytest.raises(AuthenticationError):
            p.verify_proof(SECRET, h["challenge"], h["peer_nonce"], p.PROOF, forged)


def test_proof_checked_with_another_secret_fails_on_peer():
    """A genuine PROOF does not pass a peer that holds a different secret."""
    h = handshake(SECRET, SECRET)
    with pytest.raises(AuthenticationError):
        p.verify_proof(OTHER_SECRET, h["challenge"], h["peer_nonce"], *h["proof"])


def test_wrong_protocol_version_says_to_install_same_version():
    """A CHALLENGE of another protocol version raises ProtocolError telling to install the same cw version."""
    body = bytes([p.VERSION + 1]) + os.urandom(p.NONCE_SIZE)
    with pytest.raises(ProtocolError, match="install the same cw version"):
        p.peer_response(SECRET, p.CHALLENGE, body)


def test_error_frame_instead_of_challenge_raises_authentication_error():
    """An ERROR frame where the CHALLENGE should be raises AuthenticationError quoting the master's text."""
    ftype, body = only_frame(p.encode_error("too many connections"))
    with pytest.raises(AuthenticationError, match="too many connections"):
        p.peer_response(SECRET, ftype, body)


def test_error_frame_instead_of_proof_raises_authentication_error():
    """The master's "authentication failed" ERROR where the PROOF should be raises AuthenticationError
    pointing at the secret file."""
    h = handshake(SECRET, SECRET)
    with pytest.raises(AuthenticationError, match="secret file"):
        p.verify_proof(SECRET, h["challenge"], h["peer_nonce"], p.ERROR, b"authentication failed: bad secret")


def test_other_error_frame_instead_of_proof_is_retryable():
    """Any other ERROR there (say the master's handshake timeout on a loaded machine) is a ProtocolError,
    which a worker retries, never the wrong-secret error that stops it for good."""
    h = handshake(SECRET, SECRET)
    with pytest.raises(ProtocolError, match="no handshake"):
        p.verify_proof(SECRET, h["challenge"], h["peer_nonce"], p.ERROR, b"no handshake and HELLO within 10 s")


def test_non_cw_server_is_a_protocol_error():
    """A first frame that is not a CHALLENGE (e.g. another service) raises ProtocolError."""
    with pytest.raises(ProtocolError, match="cw master"):
        p.peer_response(SECRET, p.HELLO, json.dumps({}).encode())
