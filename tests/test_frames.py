"""Unit tests of cw.wire.frames: frame kinds, messages, body codecs."""
from __future__ import annotations

from enum import IntEnum

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cw.errors import ProtocolError
from cw.wire import frames as f
from cw.wire import kept, segments
from cw.wire.decoder import FrameDecoder
from cw.wire.frames import Frame, Status


def raw(encoded) -> bytes:
    """An encoder's output as one bytes object (encoders return bytes or (head, payload...))."""
    return b"".join(encoded) if isinstance(encoded, tuple) else encoded


def only_frame(encoded, max_frame=f.DEFAULT_MAX_FRAME):
    """Decodes exactly one whole frame and nothing else; returns (kind, body)."""
    dec = FrameDecoder(max_frame)
    dec.feed(raw(encoded))
    got = dec.next_frame()
    assert got is not None
    assert dec.next_frame() is None and dec.buffered == 0
    return got


# --- the wire's numbers ------------------------------------------------------------

def test_frame_kinds_and_status_codes_keep_their_wire_values():
    """Peers of one VERSION must agree on these numbers: renumbering one is a new protocol version."""
    assert {k.name: k.value for k in Frame} == {
        "CHALLENGE": 1, "RESPONSE": 2, "PROOF": 3, "HELLO": 10, "CONTEXT": 11, "SUBMIT": 12, "CANCEL": 13,
        "JOB": 14, "OUTCOME": 15, "RESULT": 16, "CANCELLED": 17, "STATUS_REQ": 18, "STATUS": 19, "ERROR": 20,
        "WELCOME": 21, "PING": 22, "PONG": 23, "ABORT": 24, "DRAIN": 25, "REVOKE": 26, "REVOKED": 27,
        "SUBMIT_WITH": 28, "JOB_ENV": 29, "LIMIT": 30, "NOTICE": 31, "LEND": 32, "RECLAIM": 33, "OUTPUT": 34,
        "SETUP": 35, "FUNC": 36, "NEED": 37, "FORGET": 38,
        "BY_SEGMENT": 40, "RELEASE": 41, "SHARING": 42,
        "SUBSCRIBE": 50, "UNSUBSCRIBE": 51, "EVENTS": 52,
        "DEPS": 60, "PUT": 61, "PUT_ACK": 62, "RELEASE_KEY": 63, "MISSING": 64, "FETCH": 65, "KEPT": 66,
        "KEPT_GONE": 67, "DROP": 68}
    assert {s.name: s.value for s in Status} == {"OK": 0, "RAISED": 1, "LOST": 2, "UNPLACEABLE": 3, "DEPENDENCY": 4,
                                                 "DEPENDENCY_CANCELLED": 5, "KEPT_ERROR": 6}
    assert f.VERSION == 4


def test_kind_name_names_known_kinds_and_numbers_unknown_ones():
    assert f.kind_name(14) == "JOB" and f.kind_name(Frame.PONG) == "PONG"
    assert f.kind_name(200) == "200"


# --- round trips -------------------------------------------------------------------

ROUND_TRIPS = [
    # (encoded frame, expected kind, decoder, expected decoded value)
    (f.encode_json(Frame.HELLO, {"role": "worker", "host": "h", "pid": 3}), Frame.HELLO,
     f.decode_json, {"role": "worker", "host": "h", "pid": 3}),
    (f.encode_json(Frame.WELCOME, {"id": 4, "heartbeat": 1.0, "timeout": 5.0}), Frame.WELCOME,
     f.decode_json, {"id": 4, "heartbeat": 1.0, "timeout": 5.0}),
    (f.encode_json(Frame.CONTEXT, {"cwd": "/x", "path": ["/y"]}), Frame.CONTEXT,
     f.decode_json, {"cwd": "/x", "path": ["/y"]}),
    (f.encode_json(Frame.LIMIT, {"tag": "gpu-jobs", "limit": 3}), Frame.LIMIT, f.decode_limit, f.Limit("gpu-jobs", 3)),
    (f.encode_json(Frame.LIMIT, {"tag": "t", "limit": None}), Frame.LIMIT, f.decode_limit, f.Limit("t", None)),
    (f.encode_submit(2**64 - 1, 7, 2.5, b"payload"), Frame.SUBMIT, f.decode_submit,
     f.Submit(2**64 - 1, 7, 2.5, b"payload")),
    (f.encode_submit(1, 255, 0.0, b""), Frame.SUBMIT, f.decode_submit, f.Submit(1, 255, 0.0, b"")),
    (f.encode_submit(1, 2, 0.0, (b"pick", b"led")), Frame.SUBMIT, f.decode_submit, f.Submit(1, 2, 0.0, b"pickled")),
    (f.encode_submit_with(3, 1, 9.5, -2**31, {"tag": "t", "resources": {"cpu": 1, "gpu": 1}}, b"p"),
     Frame.SUBMIT_WITH, f.decode_submit_with,
     f.SubmitWith(3, 1, 9.5, -2**31, {"tag": "t", "resources": {"cpu": 1, "gpu": 1}}, b"p")),
    (f.encode_submit_with(4, 0, 0.0, 2**31 - 1, {}, b""), Frame.SUBMIT_WITH, f.decode_submit_with,
     f.SubmitWith(4, 0, 0.0, 2**31 - 1, {}, b"")),
    (f.encode_cancel(42), Frame.CANCEL, f.decode_cancel, 42),
    (f.encode_job(5, 2**32 - 1, 30.0, b"\x00job"), Frame.JOB, f.decode_job, f.Job(5, 2**32 - 1, 30.0, b"\x00job")),
    (f.encode_job_env(6, {"CUDA_VISIBLE_DEVICES": "0"}), Frame.JOB_ENV, f.decode_job_env,
     f.JobEnv(6, {"CUDA_VISIBLE_DEVICES": "0"})),
    (f.encode_outcome(9, Status.OK, b"ok"), Frame.OUTCOME, f.decode_outcome, f.Outcome(9, Status.OK, b"ok")),
    (f.encode_outcome(9, Status.RAISED, b"exc"), Frame.OUTCOME, f.decode_outcome,
     f.Outcome(9, Status.RAISED, b"exc")),
    (f.encode_result(11, Status.OK, b"host:123", b"value"), Frame.RESULT, f.decode_result,
     f.Result(11, Status.OK, b"host:123", b"value")),
    (f.encode_result(12, Status.LOST, b"", b'{"attempts":3}'), Frame.RESULT, f.decode_result,
     f.Result(12, Status.LOST, b"", b'{"attempts":3}')),
    (f.encode_result(13, Status.UNPLACEABLE, b"", b"{}"), Frame.RESULT, f.decode_result,
     f.Result(13, Status.UNPLACEABLE, b"", b"{}")),
    (f.encode_cancelled(13, True), Frame.CANCELLED, f.decode_cancelled, f.Cancelled(13, True)),
    (f.encode_cancelled(14, False), Frame.CANCELLED, f.decode_cancelled, f.Cancelled(14, False)),
    (f.encode_abort(15), Frame.ABORT, f.decode_abort, 15),
    (f.encode_revoke(16), Frame.REVOKE, f.decode_revoke, 16),
    (f.encode_revoked(17, True), Frame.REVOKED, f.decode_revoked, f.Revoked(17, True)),
    (f.encode_revoked(18, False), Frame.REVOKED, f.decode_revoked, f.Revoked(18, False)),
    (f.encode_notice(19, "no worker has a gpu"), Frame.NOTICE, f.decode_notice, f.Notice(19, "no worker has a gpu")),
    (f.encode_output(20, "printed é\n"), Frame.OUTPUT, f.decode_output, f.Output(20, "printed é\n".encode())),
    (f.encode_output_for_client(21, b"h:1", "printed é\n".encode()), Frame.OUTPUT, f.decode_output_for_client,
     f.ClientOutput(21, b"h:1", "printed é\n")),
    (f.encode_context_for_worker(3, b'{"cwd":"/x","path":["/y"]}'), Frame.CONTEXT, f.decode_context_for_worker,
     f.WorkerContext(3, {"cwd": "/x", "path": ["/y"]})),
    (f.encode_status_request(77), Frame.STATUS_REQ, f.decode_status_request, 77),
    (f.encode_status(78, {"workers": [], "queued": 0}), Frame.STATUS, f.decode_status,
     f.StatusReply(78, {"workers": [], "queued": 0})),
    (f.encode_error("bad secret é"), Frame.ERROR, f.decode_error, "bad secret é"),
    (f.frame(Frame.SETUP, b"pickled setup job"), Frame.SETUP, bytes, b"pickled setup job"),
    (f.encode_function(b"d" * 16, b"pickled function"), Frame.FUNC, f.decode_function,
     f.Function(b"d" * 16, b"pickled function")),
    (f.encode_need(b"n" * 16), Frame.NEED, lambda body: f.decode_digest(body, "NEED"), b"n" * 16),
    (f.encode_forget(b"g" * 16), Frame.FORGET, lambda body: f.decode_digest(body, "FORGET"), b"g" * 16),
]

#: Frames with an empty body, made once.
BARE_FRAMES = {Frame.PING: f.PING_FRAME, Frame.PONG: f.PONG_FRAME, Frame.DRAIN: f.encode_drain(()),
               Frame.LEND: f.LEND_FRAME, Frame.RECLAIM: f.RECLAIM_FRAME}
# Big frames by reference (cw.wire.segments); BY_SEGMENT needs a live segment to
# decode: its round trip is tests/test_segments.py's.
ROUND_TRIPS.append((segments.encode_release(9), Frame.RELEASE, segments.decode_release, 9))
BARE_FRAMES[Frame.SHARING] = f.frame(Frame.SHARING)
BARE_FRAMES[Frame.SUBSCRIBE] = f.SUBSCRIBE_FRAME
BARE_FRAMES[Frame.UNSUBSCRIBE] = f.UNSUBSCRIBE_FRAME
ROUND_TRIPS.append((f.encode_json(Frame.EVENTS, {"fields": ["job", "end"], "events": [[1, None]]}), Frame.EVENTS,
                    f.decode_events, {"fields": ["job", "end"], "events": [[1, None]],
                                      "jobs": [{"job": 1, "end": None}]}))


def test_events_with_rows_unlike_their_fields_are_refused():
    with pytest.raises(ProtocolError, match="EVENTS"):
        f.decode_events(b'{"fields": ["job"], "events": [[1, 2]]}')


# Kept values and futures as arguments (cw.wire.kept).
ROUND_TRIPS += [
    (kept.encode_deps(5, [(2**64 - 1, 3), (9, 0)]), Frame.DEPS, kept.decode_deps,
     kept.Deps(5, [(2**64 - 1, 3), (9, 0)])),
    (kept.encode_put(7, Status.RAISED, True, b"value"), Frame.PUT, kept.decode_put,
     kept.Put(7, Status.RAISED, True, b"value")),
    (kept.encode_kept(8, b"value"), Frame.KEPT,      # (its payload is a view: compared as text here)
     lambda body: kept.Keyed(kept.decode_kept(body).key, bytes(kept.decode_kept(body).payload).decode()),
     kept.Keyed(8, "value")),
] + [(kept.encode_key(kind, 2**63 + 1, text), kind, lambda body, kind=kind: kept.decode_key(body, kind.name),
      kept.Keyed(2**63 + 1, text))
     for kind, text in ((Frame.PUT_ACK, "refused: full é"), (Frame.RELEASE_KEY, ""), (Frame.MISSING, ""),
                        (Frame.FETCH, ""), (Frame.KEPT_GONE, "released"), (Frame.DROP, ""))]
#: Made and checked by cw.wire.handshake (tests/test_handshake.py).
HANDSHAKE_FRAMES = {Frame.CHALLENGE, Frame.RESPONSE, Frame.PROOF}

#: Every message type: the NamedTuples of cw.wire.frames.
MESSAGES = {obj for obj in vars(f).values()
            if isinstance(obj, type) and issubclass(obj, tuple) and hasattr(obj, "_fields")}


@pytest.mark.parametrize("encoded, kind, decode, expected", ROUND_TRIPS,
                         ids=[f"{kind.name}-{i}" for i, (_, kind, _, _) in enumerate(ROUND_TRIPS)])
def test_encoders_round_trip(encoded, kind, decode, expected):
    """Each encoder's frame has the right kind and its decoder gives back every field, of the same type."""
    got_kind, body = only_frame(encoded)
    assert got_kind == kind
    got = decode(body)
    assert got == expected
    assert type(got) is type(expected)
    if isinstance(expected, tuple):
        for name in expected._fields:
            want = getattr(expected, name)
            # Status codes are decoded as the plain ints they are on the wire.
            assert type(getattr(got, name)) is (int if isinstance(want, IntEnum) else type(want)), name


@pytest.mark.parametrize("kind", sorted(BARE_FRAMES))
def test_bare_frames_are_a_header_with_an_empty_body(kind):
    assert only_frame(BARE_FRAMES[kind]) == (kind, b"")


def test_a_payload_names_its_function_by_a_prefix_the_master_reads_without_unpickling():
    named = b"\xfe" + b"d" * 16 + b"\x80pickle"
    assert f.function_digest(named) == b"d" * 16
    assert f.function_digest(memoryview(named)) == b"d" * 16
    assert f.function_digest(b"\x80pickle") is None and f.function_digest(b"") is None
    assert f.function_digest(b"\xff" + b"d" * 16) is None      # the out-of-band envelope


@pytest.mark.parametrize("body, name", [(b"short", "NEED"), (b"x" * 17, "FORGET")])
def test_digest_frames_of_the_wrong_size_are_refused(body, name):
    with pytest.raises(ProtocolError, match=name):
        f.decode_digest(body, name)
    with pytest.raises(ProtocolError, match="FUNC"):
        f.decode_function(b"x" * 16)


def test_every_frame_kind_has_a_round_trip_or_is_bare():
    """A new frame kind must come with an encoder and decoder tested above (or be bare, or the handshake's)."""
    covered = {kind for _, kind, _, _ in ROUND_TRIPS} | set(BARE_FRAMES) | HANDSHAKE_FRAMES | {Frame.BY_SEGMENT}
    assert set(Frame) - covered == set()


def test_every_message_type_survives_a_round_trip():
    """Each NamedTuple a decoder returns is checked field by field above."""
    assert len(MESSAGES) >= 14
    assert MESSAGES - {type(expected) for _, _, _, expected in ROUND_TRIPS} == set()


def test_messages_unpack_like_the_tuples_they_replace():
    """Code written for the anonymous tuples keeps working: unpacking and indexing."""
    gid, ctx, timeout, payload = f.decode_job(only_frame(f.encode_job(5, 6, 1.5, b"x"))[1])
    assert (gid, ctx, timeout, payload) == (5, 6, 1.5, b"x")
    assert f.decode_outcome(only_frame(f.encode_outcome(7, Status.RAISED, b"e"))[1])[1] == Status.RAISED


def test_large_payloads_are_views_of_the_received_frame():
    """A payload in a frame of LARGE_FRAME bytes or more is decoded as a view, never copied."""
    payload = bytes(range(256)) * (f.LARGE_FRAME // 256)
    job = f.decode_job(only_frame(f.encode_job(1, 2, 0.0, payload))[1])
    assert isinstance(job.payload, memoryview) and job.payload == payload


def test_every_jobs_frames_are_one_bytes_for_small_payloads_and_uncopied_for_big_ones():
    """SUBMIT, JOB and RESULT, a frame per job each at the master, come as one
    bytes object when their payload is small (no join in the writer), the same
    bytes as the generic (head, payload) form; a big payload stays its own chunk."""
    small, big = b"p" * 100, b"b" * f.LARGE_FRAME
    for encode, args in ((f.encode_submit, (7, 255, 1.5)), (f.encode_job, (7, 3, 1.5)),
                         (f.encode_result, (7, Status.RAISED, b"host:1"))):
        one = encode(*args, small)
        assert type(one) is bytes and one == raw(encode(*args, (small,))), encode.__name__
        head, payload = encode(*args, big)
        assert payload is big and raw((head, payload)) == raw(encode(*args, (big,))), encode.__name__


def test_error_and_notice_text_is_cut_to_fit_before_auth():
    """ERROR frames carry UTF-8 text, cut so that even a long one passes the pre-auth limit; NOTICE too."""
    kind, body = only_frame(f.encode_error("x" * 100_000), max_frame=f.PREAUTH_MAX_FRAME)
    assert kind == Frame.ERROR and 0 < len(body) <= f.PREAUTH_MAX_FRAME
    kind, body = only_frame(f.encode_notice(1, "y" * 100_000), max_frame=f.PREAUTH_MAX_FRAME)
    assert kind == Frame.NOTICE and len(f.decode_notice(body).text) <= f.PREAUTH_MAX_FRAME


# --- malformed bodies ------------------------------------------------------------

MALFORMED = [
    (f.decode_submit, b"\x00" * 16),
    (f.decode_submit, b"\x00" * 9 + b"\xff" * 8),                  # timeout NaN
    (f.decode_submit_with, b"\x00" * 22),
    (f.decode_submit_with, b"\x00" * 21 + b"\x00\x05{}"),          # options of 5 bytes, only 2 present
    (f.decode_submit_with, b"\x00" * 21 + b"\x00\x02[]"),          # options not an object
    (f.decode_submit_with, b"\x00" * 21 + b"\x00\x0e{\"colour\":\"r\"}"),  # options checked (cw.wire.options)
    (f.decode_cancel, b"\x00" * 7),
    (f.decode_job, b"\x00" * 19),
    (f.decode_job_env, b"\x00" * 8 + b"[]"),
    (f.decode_outcome, b"\x00" * 8),
    (f.decode_result, b"\x00" * 9),
    (f.decode_result, b"\x00" * 9 + b"\x05abc"),          # label of 5 bytes, only 3 present
    (f.decode_cancelled, b"\x00" * 8),
    (f.decode_revoked, b"\x00" * 8),
    (f.decode_abort, b"\x00" * 7),
    (f.decode_revoke, b""),
    (f.decode_notice, b"\x00" * 7),
    (f.decode_output, b"\x00" * 7),
    (f.decode_output_for_client, b"\x00" * 8),
    (f.decode_limit, b'{"tag": 3, "limit": 1}'),
    (f.decode_limit, b'{"tag": "t", "limit": -1}'),
    (f.decode_limit, b'{"tag": "t", "limit": true}'),
    (f.decode_context_for_worker, b"\x00" * 3),
    (f.decode_status_request, b""),
    (f.decode_status, b"\x00\x00"),
    (f.decode_json, b""),
    (f.decode_json, b'{"a": 1'),
    (f.decode_json, b"\xff\xfe\x00garbage"),
    (f.decode_json, b"[1, 2]"),
    (f.decode_json, b"3"),
    (f.decode_json, b'"text"'),
    (f.decode_json, b"null"),
    (f.decode_context_for_worker, b"\x00\x00\x00\x01not json"),
    (f.decode_context_for_worker, b"\x00\x00\x00\x01[]"),
    (f.decode_status, b"\x00\x00\x00\x01[]"),
    (f.decode_outcome, b"\x00" * 8 + bytes([Status.LOST]) + b"x"),   # workers may not claim LOST
    (f.decode_outcome, b"\x00" * 8 + b"\x07"),
    (f.decode_outcome, b"\x00" * 8 + b"\xff"),
]


@pytest.mark.parametrize("decode, body", MALFORMED)
def test_malformed_body_raises_protocol_error(decode, body):
    """Bodies too short for their fixed fields, bad or non-object JSON, unknown OUTCOME status: ProtocolError."""
    with pytest.raises(ProtocolError):
        decode(body)


def test_deeply_nested_json_is_a_protocol_error():
    """JSON nested deeper than the parser's recursion limit (fits in 4 KiB) raises ProtocolError, not RecursionError."""
    with pytest.raises(ProtocolError):
        f.decode_json(b"[" * 4000)


#: Found by name, so that a new decoder is fed garbage too.
DECODERS = [getattr(f, name) for name in sorted(dir(f)) if name.startswith("decode_")]


@settings(max_examples=300, deadline=None)
@given(decode=st.sampled_from(DECODERS), body=st.binary(max_size=64))
def test_random_bodies_to_decoders_raise_only_protocol_error(decode, body):
    """Every decode_* function either decodes random bytes or raises ProtocolError, nothing else."""
    try:
        decode(body)
    except ProtocolError:
        pass
