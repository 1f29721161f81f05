"""cw's frames and the messages they carry, with no I/O (in the manner of h11).

Every connection carries frames::

    +----------------+---------+----------------------+
    | length: u32 BE | kind:u8 | body (length bytes)  |
    +----------------+---------+----------------------+

A frame's body starts with a few fixed fields (``struct``) and may end with an
opaque payload: pickled user data that only clients and workers ever look at.
The master moves payloads as bytes and never unpickles them.  Each ``decode_*``
function turns a body into a named message (a ``NamedTuple``, so it unpacks
like the tuple it is) and raises ``ProtocolError`` on a malformed one; a
message of one field is that field.

Data flow of one job::

    client --SUBMIT(jobid, payload)--> master --JOB(gid, ctx, payload)--> worker
    client <--RESULT(jobid, status, worker, payload)-- master <--OUTCOME(gid, status, payload)-- worker

Frames are cut out of the byte stream by ``cw.wire.decoder.FrameDecoder``.
The connection's first frames are the handshake (``cw.wire.handshake``); until
it succeeds a peer's decoder refuses frames bigger than ``PREAUTH_MAX_FRAME``,
so an unauthenticated peer can make us hold only a few KiB.
"""
from __future__ import annotations

import json
import struct
from enum import IntEnum
from typing import NamedTuple

from cw import settings
from cw.errors import ProtocolError
from cw.wire import options as job_options

#: Sent in the CHALLENGE; both ends must speak the same.
VERSION = 4   # 4: job events (SUBSCRIBE...), kept values (DEPS, PUT...); 3: function cache, frames by reference
HEADER = struct.Struct("!IB")
HEADER_SIZE = HEADER.size

DEFAULT_MAX_FRAME = settings.MAX_FRAME
PREAUTH_MAX_FRAME = settings.PREAUTH_MAX_FRAME
#: Frames at least this big are received straight into a buffer of their own
#: size (see cw.wire.decoder), and their payloads decoded as views, not copies.
LARGE_FRAME = 1 << 20

#: A payload: bytes, a view of a received frame, or (to encoders) a tuple of
#: them, big buffers sent out of band (see cw.wire.payload).
Payload = bytes | bytearray | memoryview


class Frame(IntEnum):
    """The kind of a frame: its header's second field.  Handshake first, then
    the messages of an authenticated link."""

    CHALLENGE = 1   # server -> peer: version u8, nonce[32]
    RESPONSE = 2    # peer -> server: nonce[32], mac[32]
    PROOF = 3       # server -> peer: mac[32]
    HELLO = 10      # peer -> master: JSON {"role": "client"|"worker", "host", "pid", ...}
    CONTEXT = 11    # client -> master: JSON {"cwd", "path"}; master -> worker: ctx u32 + that JSON
    SUBMIT = 12     # client -> master: jobid u64, retries u8 (255: master default), timeout f64 (0: none) + payload
    CANCEL = 13     # client -> master: jobid u64
    JOB = 14        # master -> worker: gid u64, ctx u32, timeout f64 + payload
    OUTCOME = 15    # worker -> master: gid u64, status u8 + payload
    RESULT = 16     # master -> client: jobid u64, status u8, label length u8, label + payload
    CANCELLED = 17  # master -> client: jobid u64, cancelled u8 (0: too late, it runs)
    STATUS_REQ = 18  # client -> master: request id u32
    STATUS = 19     # master -> client: request id u32 + JSON
    ERROR = 20      # either way, before closing: UTF-8 text saying why
    WELCOME = 21    # master -> peer after HELLO: JSON {"id", "heartbeat", "timeout"}
    PING = 22       # master -> peer, every heartbeat interval: empty
    PONG = 23       # peer -> master, in answer: empty
    ABORT = 24      # master -> worker: gid u64; stop that job now (cancelled by its client)
    DRAIN = 25      # worker -> master: gid u64 of each job it started and has not finished; it finishes
                    # those and takes no other (the master counts no attempt for the rest)
    REVOKE = 26     # master -> worker: gid u64; give back that job if it has not started
    REVOKED = 27    # worker -> master: gid u64, given back u8 (0: it started, its outcome follows)
    SUBMIT_WITH = 28  # client -> master: SUBMIT's fields, priority i32, options length u16 + options JSON + payload
    JOB_ENV = 29    # master -> worker, just before a JOB: gid u64 + JSON {name: value} to set in the job's environment
    LIMIT = 30      # client -> master: JSON {"tag", "limit"}: at most limit jobs with that tag run (null: no limit)
    NOTICE = 31     # master -> client: jobid u64 + UTF-8 text: why that job (and its like) cannot run yet
    LEND = 32       # worker -> master: empty; its running job waits for jobs it submitted: send it others
    RECLAIM = 33    # worker -> master: empty; a job that lent its slot runs again
    OUTPUT = 34     # worker -> master, before its OUTCOME: gid u64 + UTF-8 text the job printed;
                    # master -> client, before its RESULT: jobid u64, label length u8, label + that text
    SETUP = 35      # client -> master: payload of a job every worker that connects later runs first
    FUNC = 36       # client -> master, master -> worker: digest[16] + a function's pickled bytes
                    # (sent once; job payloads then name it by digest, see FUNCTION_MARK)
    NEED = 37       # worker -> master: digest[16] of a function it lacks (the master answers FUNC)
    FORGET = 38     # client -> master: digest[16] of a function it will not name again
    # 40-42: big frames by reference between processes of one machine (see cw.wire.segments).
    BY_SEGMENT = 40  # either way: kind u8, pid u32, fd u32, inode u64, offset u64, length u64, token u64 + fields
    RELEASE = 41    # either way, in answer to BY_SEGMENT: token u64; its sender may close the segment
    SHARING = 42    # peer -> master after WELCOME: empty; the peer can open the master's segments too
    # 50-54: job events for watchers such as the dashboard (see cw.master.events).
    SUBSCRIBE = 50  # client -> master: empty; send me EVENTS from now on
    UNSUBSCRIBE = 51  # client -> master: empty; send no more EVENTS
    EVENTS = 52     # master -> client: JSON {"t", "fields", "events", "dropped", "counts"}, a few times a second
    # 60-68: kept values, futures as arguments (see cw.wire.kept, cw.master.kept).
    DEPS = 60       # client -> master, just before a SUBMIT: jobid u64 + (key u64, job id u64 or 0) each
    PUT = 61        # client -> master: key u64, status u8, flags u8 + payload: a value kept under key
    PUT_ACK = 62    # master -> client, in answer to a user's PUT: key u64 + UTF-8 text ("" when kept)
    RELEASE_KEY = 63  # client -> master: key u64; nothing of this client names it any more
    MISSING = 64    # master -> client: key u64; a job waits on it: PUT the future's outcome
    FETCH = 65      # worker -> master: key u64 of a kept value a job needs
    KEPT = 66       # master -> worker: key u64 + the value's payload
    KEPT_GONE = 67  # master -> worker, in answer to FETCH: key u64 + UTF-8 text: not held
    DROP = 68       # master -> worker: key u64; the value may leave this host's cache


class Status(IntEnum):
    """How a job ended: the status of OUTCOME and RESULT frames."""

    OK = 0           # payload: the pickled return value
    RAISED = 1       # payload: a pickled exception with its remote traceback
    LOST = 2         # made by the master; payload: JSON {"attempts", "workers"}
    UNPLACEABLE = 3  # made by the master; payload: JSON {"reason", "waited"}: no worker could ever run it
    DEPENDENCY = 4   # made by the master; payload: job id u64 of a failed dependency, its status u8 + payload
    DEPENDENCY_CANCELLED = 5   # made by the master; payload: job id u64 of the cancelled dependency
    KEPT_ERROR = 6   # made by the master; payload: UTF-8 text: a kept value the job uses is not there


def kind_name(kind: int) -> str:
    """A frame kind's name for messages, or its number if cw has no such kind."""
    try:
        return Frame(kind).name
    except ValueError:
        return str(kind)


# --- messages: what the decoders return ---------------------------------------

class Submit(NamedTuple):
    jobid: int
    retries: int        # 255: the master's default
    timeout: float      # seconds; 0: none
    payload: Payload


class SubmitWith(NamedTuple):
    jobid: int
    retries: int
    timeout: float
    priority: int
    options: dict       # {"resources", "tag", "workers"}, checked by cw.wire.options
    payload: Payload


class Job(NamedTuple):
    gid: int            # the master's id of the job, unique across clients
    ctx: int            # the context (cwd, sys.path) the worker must run it in
    timeout: float
    payload: Payload


class Outcome(NamedTuple):
    gid: int
    status: int         # Status.OK or Status.RAISED
    payload: Payload


class Result(NamedTuple):
    jobid: int
    status: int         # a Status
    label: bytes        # the worker that ran it, "host:pid"
    payload: Payload


class Cancelled(NamedTuple):
    jobid: int
    cancelled: bool     # False: too late, it runs


class Revoked(NamedTuple):
    gid: int
    given_back: bool    # False: it started; its OUTCOME follows


class WorkerContext(NamedTuple):
    ctx: int
    context: dict       # {"cwd", "path"}


class JobEnv(NamedTuple):
    gid: int
    env: dict           # {name: value}


class Limit(NamedTuple):
    tag: str
    limit: int | None   # None: no limit


class Notice(NamedTuple):
    jobid: int
    text: str


class Output(NamedTuple):
    gid: int
    text: bytes         # UTF-8, passed on to the client undecoded


class ClientOutput(NamedTuple):
    jobid: int
    label: bytes
    text: str


class Function(NamedTuple):
    digest: bytes       # DIGEST_SIZE bytes: blake2b of data
    data: bytes         # the function, pickled (by value)


class StatusReply(NamedTuple):
    reqid: int
    report: dict


# --- encoders.  Those carrying a payload return (head, payload...) so that a
# big payload is handed to the socket as it is instead of being copied into a frame.

_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")
_SUBMIT = struct.Struct("!QBd")
_SUBMIT_WITH = struct.Struct("!QBdiH")
_JOB = struct.Struct("!QId")
_OUTCOME = struct.Struct("!QB")
_RESULT = struct.Struct("!QBB")
_ID_FLAG = struct.Struct("!QB")     # CANCELLED, REVOKED; and OUTPUT's jobid + label length
_WORKER_STATUSES = (Status.OK, Status.RAISED)   # LOST and UNPLACEABLE are the master's to say
#: A job payload that names its function by digest: FUNCTION_MARK, the
#: digest, then the pickled ``(args, kwargs)`` (cw.wire.payload).  A pickle
#: starts with 0x80 and an out-of-band envelope with 0xFF, so the first byte
#: tells them apart, and the master reads the digest without unpickling.
FUNCTION_MARK = 0xFE
DIGEST_SIZE = 16
_FUNCTION_HEAD = 1 + DIGEST_SIZE
_MAX_TEXT = 4000                    # bytes of ERROR and NOTICE text: an ERROR must fit before auth


def frame(kind: int, body: bytes = b"") -> bytes:
    """One whole frame: header and body."""
    return HEADER.pack(len(body), kind) + body


def _with_payload(kind: int, fields: bytes, payload) -> tuple:
    """A frame as (head, payload chunks...): ``payload`` is bytes (or a view),
    or a tuple of them."""
    if type(payload) is tuple:
        size = 0
        for chunk in payload:
            size += len(chunk)
        return (HEADER.pack(len(fields) + size, kind) + fields, *payload)
    return HEADER.pack(len(fields) + len(payload), kind) + fields, payload


def _json(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


PING_FRAME = frame(Frame.PING)
PONG_FRAME = frame(Frame.PONG)
LEND_FRAME = frame(Frame.LEND)
RECLAIM_FRAME = frame(Frame.RECLAIM)
SUBSCRIBE_FRAME = frame(Frame.SUBSCRIBE)
UNSUBSCRIBE_FRAME = frame(Frame.UNSUBSCRIBE)


def encode_json(kind: int, obj) -> bytes:
    """HELLO, WELCOME, LIMIT, a client's CONTEXT: a JSON object as the whole body."""
    return frame(kind, _json(obj))


def encode_submit(jobid: int, retries: int, timeout: float, payload) -> tuple:
    return _with_payload(Frame.SUBMIT, _SUBMIT.pack(jobid, retries, timeout), payload)


def encode_submit_with(jobid: int, retries: int, timeout: float, priority: int, options: dict,
                       payload) -> tuple:
    """SUBMIT with scheduling options: priority and a JSON object of
    ``resources`` ({name: amount}), ``tag`` (str) and ``workers`` (ids and host names)."""
    opts = _json(options) if options else b""
    fields = _SUBMIT_WITH.pack(jobid, retries, timeout, priority, len(opts)) + opts
    return _with_payload(Frame.SUBMIT_WITH, fields, payload)


def encode_drain(started) -> bytes:
    return frame(Frame.DRAIN, b"".join(_U64.pack(gid) for gid in started))


def decode_drain(body) -> list[int]:
    """The gids a draining worker had started (the jobs it finishes)."""
    if len(body) % _U64.size:
        raise ProtocolError(f"DRAIN frame of {len(body)} bytes is not a list of 8-byte job ids")
    return [gid for (gid,) in _U64.iter_unpack(body)]


def encode_cancel(jobid: int) -> bytes:
    return frame(Frame.CANCEL, _U64.pack(jobid))


def encode_job(gid: int, ctx: int, timeout: float, payload) -> tuple:
    return _with_payload(Frame.JOB, _JOB.pack(gid, ctx, timeout), payload)


def encode_job_env(gid: int, env: dict) -> bytes:
    return frame(Frame.JOB_ENV, _U64.pack(gid) + _json(env))


def encode_outcome(gid: int, status: int, payload) -> tuple:
    return _with_payload(Frame.OUTCOME, _OUTCOME.pack(gid, status), payload)


def encode_result(jobid: int, status: int, label: bytes, payload) -> tuple:
    return _with_payload(Frame.RESULT, _RESULT.pack(jobid, status, len(label)) + label, payload)


def encode_cancelled(jobid: int, cancelled: bool) -> bytes:
    return frame(Frame.CANCELLED, _ID_FLAG.pack(jobid, cancelled))


def encode_abort(gid: int) -> bytes:
    return frame(Frame.ABORT, _U64.pack(gid))


def encode_revoke(gid: int) -> bytes:
    return frame(Frame.REVOKE, _U64.pack(gid))


def encode_revoked(gid: int, given_back: bool) -> bytes:
    return frame(Frame.REVOKED, _ID_FLAG.pack(gid, given_back))


def encode_notice(jobid: int, text: str) -> bytes:
    return frame(Frame.NOTICE, _U64.pack(jobid) + text.encode("utf-8", "replace")[:_MAX_TEXT])


def encode_output(gid: int, text: str) -> bytes:
    return frame(Frame.OUTPUT, _U64.pack(gid) + text.encode("utf-8", "replace"))


def encode_output_for_client(jobid: int, label: bytes, text) -> bytes:
    return frame(Frame.OUTPUT, _ID_FLAG.pack(jobid, len(label)) + label + bytes(text))


def encode_context_for_worker(ctx: int, context_json: bytes) -> bytes:
    return frame(Frame.CONTEXT, _U32.pack(ctx) + context_json)


def encode_status_request(reqid: int) -> bytes:
    return frame(Frame.STATUS_REQ, _U32.pack(reqid))


def encode_status(reqid: int, obj) -> bytes:
    return frame(Frame.STATUS, _U32.pack(reqid) + _json(obj))


def encode_function(digest: bytes, data) -> bytes:
    return frame(Frame.FUNC, digest + bytes(data))


def encode_need(digest: bytes) -> bytes:
    return frame(Frame.NEED, digest)


def encode_forget(digest: bytes) -> bytes:
    return frame(Frame.FORGET, digest)


def function_digest(payload) -> bytes | None:
    """The digest of the function a job payload names, or None when the
    payload carries its function (by reference or by value) itself."""
    if payload[:1] == b"\xfe" and len(payload) > _FUNCTION_HEAD:
        return bytes(payload[1:_FUNCTION_HEAD])
    return None


def encode_error(text: str) -> bytes:
    return frame(Frame.ERROR, text.encode("utf-8", "replace")[:_MAX_TEXT])


# --- decoders of frame bodies.  Each raises ProtocolError on a malformed body.

def _tail(body, start: int):
    """The payload after a frame's fixed fields: a view, not a copy, of a large body."""
    return memoryview(body)[start:] if len(body) >= LARGE_FRAME else body[start:]


def _fields(st: struct.Struct, body, name: str) -> tuple:
    if len(body) < st.size:
        raise ProtocolError(f"{name} frame of {len(body)} bytes is shorter than its {st.size}-byte header")
    return st.unpack_from(body)


#: Builds a message from a tuple of its fields: half the cost of calling the
#: NamedTuple, whose generated __new__ is Python code.  For the decoders every
#: job goes through (SUBMIT, JOB, OUTCOME, RESULT).
_new = tuple.__new__


def _text(body) -> str:
    return bytes(body).decode("utf-8", "replace")


def decode_json(body, name: str = "JSON") -> dict:
    try:
        obj = json.loads(bytes(body))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: "[[[[..."
        raise ProtocolError(f"{name} frame is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{name} frame must hold a JSON object, not {type(obj).__name__}")
    return obj


def decode_error(body) -> str:
    return _text(body)


def decode_submit(body) -> Submit:
    jobid, retries, timeout = _fields(_SUBMIT, body, "SUBMIT")
    if not timeout >= 0.0:  # also refuses NaN
        raise ProtocolError(f"SUBMIT frame has an invalid timeout {timeout!r}")
    return _new(Submit, (jobid, retries, timeout, _tail(body, _SUBMIT.size)))


def decode_submit_with(body) -> SubmitWith:
    jobid, retries, timeout, priority, opts_len = _fields(_SUBMIT_WITH, body, "SUBMIT_WITH")
    if not timeout >= 0.0:
        raise ProtocolError(f"SUBMIT_WITH frame has an invalid timeout {timeout!r}")
    start = _SUBMIT_WITH.size + opts_len
    if len(body) < start:
        raise ProtocolError("SUBMIT_WITH frame is shorter than its options")
    options = {}
    if opts_len:
        options = job_options.check_submitted(decode_json(body[_SUBMIT_WITH.size:start], "SUBMIT_WITH"))
    return _new(SubmitWith, (jobid, retries, timeout, priority, options, _tail(body, start)))


def decode_cancel(body) -> int:
    """CANCEL's jobid."""
    return _fields(_U64, body, "CANCEL")[0]


def decode_job(body) -> Job:
    gid, ctx, timeout = _fields(_JOB, body, "JOB")
    return _new(Job, (gid, ctx, timeout, _tail(body, _JOB.size)))


def decode_job_env(body) -> JobEnv:
    (gid,) = _fields(_U64, body, "JOB_ENV")
    return JobEnv(gid, decode_json(body[_U64.size:], "JOB_ENV"))


def decode_outcome(body) -> Outcome:
    gid, status = _fields(_OUTCOME, body, "OUTCOME")
    if status not in _WORKER_STATUSES:
        raise ProtocolError(f"OUTCOME frame has unknown status {status}")
    return _new(Outcome, (gid, status, _tail(body, _OUTCOME.size)))


def decode_result(body) -> Result:
    jobid, status, label_len = _fields(_RESULT, body, "RESULT")
    start = _RESULT.size + label_len
    if len(body) < start:
        raise ProtocolError("RESULT frame is shorter than its worker label")
    return _new(Result, (jobid, status, bytes(body[_RESULT.size:start]), _tail(body, start)))


def decode_cancelled(body) -> Cancelled:
    jobid, cancelled = _fields(_ID_FLAG, body, "CANCELLED")
    return Cancelled(jobid, bool(cancelled))


def decode_abort(body) -> int:
    """ABORT's gid."""
    return _fields(_U64, body, "ABORT")[0]


def decode_revoke(body) -> int:
    """REVOKE's gid."""
    return _fields(_U64, body, "REVOKE")[0]


def decode_revoked(body) -> Revoked:
    gid, given_back = _fields(_ID_FLAG, body, "REVOKED")
    return Revoked(gid, bool(given_back))


def decode_limit(body) -> Limit:
    return Limit(*job_options.check_limit_request(decode_json(body, "LIMIT")))


def decode_notice(body) -> Notice:
    (jobid,) = _fields(_U64, body, "NOTICE")
    return Notice(jobid, _text(body[_U64.size:]))


def decode_output(body) -> Output:
    """A worker's OUTPUT."""
    (gid,) = _fields(_U64, body, "OUTPUT")
    return Output(gid, bytes(body[_U64.size:]))


def decode_output_for_client(body) -> ClientOutput:
    """The master's OUTPUT to a client."""
    jobid, label_len = _fields(_ID_FLAG, body, "OUTPUT")
    start = _ID_FLAG.size + label_len
    return ClientOutput(jobid, bytes(body[_ID_FLAG.size:start]), _text(body[start:]))


def decode_function(body) -> Function:
    """FUNC's digest and pickled function; the bytes are a copy (they are kept)."""
    if len(body) <= DIGEST_SIZE:
        raise ProtocolError(f"FUNC frame of {len(body)} bytes holds no function after its {DIGEST_SIZE}-byte digest")
    return Function(bytes(body[:DIGEST_SIZE]), bytes(body[DIGEST_SIZE:]))


def decode_digest(body, name: str = "NEED") -> bytes:
    """NEED's and FORGET's digest."""
    if len(body) != DIGEST_SIZE:
        raise ProtocolError(f"{name} frame of {len(body)} bytes is not a {DIGEST_SIZE}-byte function digest")
    return bytes(body)


def decode_context_for_worker(body) -> WorkerContext:
    (ctx,) = _fields(_U32, body, "CONTEXT")
    return WorkerContext(ctx, decode_json(body[_U32.size:], "CONTEXT"))


def decode_events(body) -> dict:
    """EVENTS' JSON object (see cw.master.events); its events as dicts in ``"jobs"``."""
    msg = decode_json(body, "EVENTS")
    fields, rows = msg.get("fields"), msg.get("events")
    if not isinstance(fields, list) or not isinstance(rows, list) or \
            not all(isinstance(row, list) and len(row) == len(fields) for row in rows):
        raise ProtocolError("EVENTS frame needs a list of fields and events of that many values each")
    msg["jobs"] = [dict(zip(fields, row, strict=True)) for row in rows]
    return msg


def decode_status_request(body) -> int:
    """STATUS_REQ's request id."""
    return _fields(_U32, body, "STATUS_REQ")[0]


def decode_status(body) -> StatusReply:
    (reqid,) = _fields(_U32, body, "STATUS")
    return StatusReply(reqid, decode_json(body[_U32.size:], "STATUS"))
