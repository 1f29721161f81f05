"""cw's wire protocol, with no I/O (in the manner of h11).

Every connection carries frames::

    +----------------+---------+----------------------+
    | length: u32 BE | type:u8 | body (length bytes)  |
    +----------------+---------+----------------------+

A frame's body starts with a few fixed fields (``struct``) and may end with an
opaque payload: pickled user data that only clients and workers ever look at.
The master moves payloads as bytes and never unpickles them.

Before anything else each connection runs a mutual HMAC-SHA256 handshake on a
shared secret (``server_challenge`` ... ``verify_proof``); until it succeeds the
decoder refuses frames bigger than ``PREAUTH_MAX_FRAME``, so an unauthenticated
peer can make us hold only a few KiB.

Data flow of one job::

    client --SUBMIT(jobid, payload)--> master --JOB(gid, ctx, payload)--> worker
    client <--RESULT(jobid, status, worker, payload)-- master <--OUTCOME(gid, status, payload)-- worker
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import struct

from cw import settings
from cw.errors import AuthenticationError, ProtocolError
from cw.wire import buffers
from cw.wire import options as job_options

VERSION = 2
HEADER = struct.Struct("!IB")
HEADER_SIZE = HEADER.size

DEFAULT_MAX_FRAME = settings.MAX_FRAME
PREAUTH_MAX_FRAME = settings.PREAUTH_MAX_FRAME

# Frame types.  Handshake first, then the messages of an authenticated link.
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
DRAIN = 25      # worker -> master: empty; finishing the current job, send no more
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

FRAME_NAMES = {
    CHALLENGE: "CHALLENGE", RESPONSE: "RESPONSE", PROOF: "PROOF", HELLO: "HELLO", CONTEXT: "CONTEXT",
    SUBMIT: "SUBMIT", CANCEL: "CANCEL", JOB: "JOB", OUTCOME: "OUTCOME", RESULT: "RESULT",
    CANCELLED: "CANCELLED", STATUS_REQ: "STATUS_REQ", STATUS: "STATUS", ERROR: "ERROR",
    WELCOME: "WELCOME", PING: "PING", PONG: "PONG", ABORT: "ABORT", DRAIN: "DRAIN",
    REVOKE: "REVOKE", REVOKED: "REVOKED", SUBMIT_WITH: "SUBMIT_WITH", JOB_ENV: "JOB_ENV", LIMIT: "LIMIT",
    NOTICE: "NOTICE", LEND: "LEND", RECLAIM: "RECLAIM", OUTPUT: "OUTPUT",
    SETUP: "SETUP",
}

# Outcome status codes (OUTCOME and RESULT frames).
OK = 0        # payload: the pickled return value
RAISED = 1    # payload: a pickled exception with its remote traceback
LOST = 2      # made by the master; payload: JSON {"attempts", "workers"}
UNPLACEABLE = 3  # made by the master; payload: JSON {"reason", "waited"}: no worker could ever run it

_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")
_SUBMIT = struct.Struct("!QBd")
_SUBMIT_WITH = struct.Struct("!QBdiH")
_JOB = struct.Struct("!QId")
_OUTCOME = struct.Struct("!QB")
_RESULT = struct.Struct("!QBB")
_CANCELLED = struct.Struct("!QB")


def frame(ftype: int, body: bytes = b"") -> bytes:
    """One whole frame: header and body."""
    return HEADER.pack(len(body), ftype) + body


def _with_payload(ftype: int, fields: bytes, payload) -> tuple:
    """A frame as (head, payload chunks...): ``payload`` is bytes (or a view),
    or a tuple of them (big buffers sent out of band, see cw.payload)."""
    if type(payload) is tuple:
        size = 0
        for chunk in payload:
            size += len(chunk)
        return (HEADER.pack(len(fields) + size, ftype) + fields, *payload)
    return HEADER.pack(len(fields) + len(payload), ftype) + fields, payload


# --- encoders.  Those carrying a payload return (head, payload...) so that a
# big payload is handed to the socket as it is instead of being copied into a frame.

def encode_json(ftype: int, obj) -> bytes:
    return frame(ftype, json.dumps(obj, separators=(",", ":")).encode())


def encode_submit(jobid: int, retries: int, timeout: float, payload: bytes) -> tuple:
    return _with_payload(SUBMIT, _SUBMIT.pack(jobid, retries, timeout), payload)


def encode_submit_with(jobid: int, retries: int, timeout: float, priority: int, options: dict,
                       payload: bytes) -> tuple:
    """SUBMIT with scheduling options: priority and a JSON object of
    ``resources`` ({name: amount}), ``tag`` (str) and ``workers`` (ids and host names)."""
    opts = json.dumps(options, separators=(",", ":")).encode() if options else b""
    fields = _SUBMIT_WITH.pack(jobid, retries, timeout, priority, len(opts)) + opts
    return _with_payload(SUBMIT_WITH, fields, payload)


def encode_job_env(gid: int, env: dict) -> bytes:
    return frame(JOB_ENV, _U64.pack(gid) + json.dumps(env, separators=(",", ":")).encode())


def encode_notice(jobid: int, text: str) -> bytes:
    return frame(NOTICE, _U64.pack(jobid) + text.encode("utf-8", "replace")[:4000])


def encode_output(gid: int, text: str) -> bytes:
    return frame(OUTPUT, _U64.pack(gid) + text.encode("utf-8", "replace"))


def encode_output_for_client(jobid: int, label: bytes, text) -> bytes:
    return frame(OUTPUT, _CANCELLED.pack(jobid, len(label)) + label + bytes(text))


def decode_output(body) -> tuple[int, bytes]:
    (gid,) = _fields(_U64, body, "OUTPUT")
    return gid, bytes(body[_U64.size:])


def decode_output_for_client(body) -> tuple[int, bytes, str]:
    jobid, label_len = _fields(_CANCELLED, body, "OUTPUT")
    start = _CANCELLED.size + label_len
    return jobid, bytes(body[_CANCELLED.size:start]), bytes(body[start:]).decode("utf-8", "replace")


LEND_FRAME = frame(LEND)
RECLAIM_FRAME = frame(RECLAIM)


def encode_cancel(jobid: int) -> bytes:
    return frame(CANCEL, _U64.pack(jobid))


def encode_job(gid: int, ctx: int, timeout: float, payload: bytes) -> tuple:
    return _with_payload(JOB, _JOB.pack(gid, ctx, timeout), payload)


def encode_outcome(gid: int, status: int, payload: bytes) -> tuple:
    return _with_payload(OUTCOME, _OUTCOME.pack(gid, status), payload)


def encode_result(jobid: int, status: int, label: bytes, payload: bytes) -> tuple:
    fields = _RESULT.pack(jobid, status, len(label)) + label
    return _with_payload(RESULT, fields, payload)


def encode_abort(gid: int) -> bytes:
    return frame(ABORT, _U64.pack(gid))


def encode_revoke(gid: int) -> bytes:
    return frame(REVOKE, _U64.pack(gid))


def encode_revoked(gid: int, given_back: bool) -> bytes:
    return frame(REVOKED, _CANCELLED.pack(gid, given_back))


def decode_revoked(body) -> tuple[int, bool]:
    gid, given_back = _fields(_CANCELLED, body, "REVOKED")
    return gid, bool(given_back)


PING_FRAME = frame(PING)
PONG_FRAME = frame(PONG)
DRAIN_FRAME = frame(DRAIN)


def encode_cancelled(jobid: int, cancelled: bool) -> bytes:
    return frame(CANCELLED, _CANCELLED.pack(jobid, cancelled))


def encode_context_for_worker(ctx: int, context_json: bytes) -> bytes:
    return frame(CONTEXT, _U32.pack(ctx) + context_json)


def encode_status_request(reqid: int) -> bytes:
    return frame(STATUS_REQ, _U32.pack(reqid))


def encode_status(reqid: int, obj) -> bytes:
    return frame(STATUS, _U32.pack(reqid) + json.dumps(obj, separators=(",", ":")).encode())


def encode_error(text: str) -> bytes:
    return frame(ERROR, text.encode("utf-8", "replace")[:4000])


# --- decoders of frame bodies.  Each raises ProtocolError on a malformed body.

def _tail(body, start: int):
    """The payload after a frame's fixed fields: a view, not a copy, of a large body."""
    return memoryview(body)[start:] if len(body) >= LARGE_FRAME else body[start:]


def _fields(st: struct.Struct, body, name: str):
    if len(body) < st.size:
        raise ProtocolError(f"{name} frame of {len(body)} bytes is shorter than its {st.size}-byte header")
    return st.unpack_from(body)


def decode_json(body, name: str = "JSON"):
    try:
        obj = json.loads(bytes(body))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: "[[[[..."
        raise ProtocolError(f"{name} frame is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{name} frame must hold a JSON object, not {type(obj).__name__}")
    return obj


def decode_submit(body) -> tuple[int, int, float, bytes]:
    jobid, retries, timeout = _fields(_SUBMIT, body, "SUBMIT")
    if not timeout >= 0.0:  # also refuses NaN
        raise ProtocolError(f"SUBMIT frame has an invalid timeout {timeout!r}")
    return jobid, retries, timeout, _tail(body, _SUBMIT.size)


def decode_submit_with(body) -> tuple[int, int, float, int, dict, bytes]:
    jobid, retries, timeout, priority, opts_len = _fields(_SUBMIT_WITH, body, "SUBMIT_WITH")
    if not timeout >= 0.0:
        raise ProtocolError(f"SUBMIT_WITH frame has an invalid timeout {timeout!r}")
    start = _SUBMIT_WITH.size + opts_len
    if len(body) < start:
        raise ProtocolError("SUBMIT_WITH frame is shorter than its options")
    options = check_options(decode_json(body[_SUBMIT_WITH.size:start], "SUBMIT_WITH")) if opts_len else {}
    return jobid, retries, timeout, priority, options, _tail(body, start)


def check_options(options: dict) -> dict:
    """Validates SUBMIT_WITH's options: the master trusts no peer's JSON."""
    return job_options.check_submitted(options)


def decode_limit(body) -> tuple[str, int | None]:
    return job_options.check_limit_request(decode_json(body, "LIMIT"))


def decode_job_env(body) -> tuple[int, dict]:
    (gid,) = _fields(_U64, body, "JOB_ENV")
    return gid, decode_json(body[_U64.size:], "JOB_ENV")


def decode_notice(body) -> tuple[int, str]:
    (jobid,) = _fields(_U64, body, "NOTICE")
    return jobid, bytes(body[_U64.size:]).decode("utf-8", "replace")


def decode_cancel(body) -> int:
    return _fields(_U64, body, "CANCEL")[0]


def decode_job(body) -> tuple[int, int, float, bytes]:
    gid, ctx, timeout = _fields(_JOB, body, "JOB")
    return gid, ctx, timeout, _tail(body, _JOB.size)


def decode_abort(body) -> int:
    return _fields(_U64, body, "ABORT")[0]


decode_revoke = decode_abort


def decode_outcome(body) -> tuple[int, int, bytes]:
    gid, status = _fields(_OUTCOME, body, "OUTCOME")
    if status not in (OK, RAISED):
        raise ProtocolError(f"OUTCOME frame has unknown status {status}")
    return gid, status, _tail(body, _OUTCOME.size)


def decode_result(body) -> tuple[int, int, bytes, bytes]:
    jobid, status, label_len = _fields(_RESULT, body, "RESULT")
    start = _RESULT.size + label_len
    if len(body) < start:
        raise ProtocolError("RESULT frame is shorter than its worker label")
    return jobid, status, bytes(body[_RESULT.size:start]), _tail(body, start)


def decode_cancelled(body) -> tuple[int, bool]:
    jobid, cancelled = _fields(_CANCELLED, body, "CANCELLED")
    return jobid, bool(cancelled)


def decode_context_for_worker(body) -> tuple[int, dict]:
    (ctx,) = _fields(_U32, body, "CONTEXT")
    return ctx, decode_json(body[_U32.size:], "CONTEXT")


def decode_status_request(body) -> int:
    return _fields(_U32, body, "STATUS_REQ")[0]


def decode_status(body) -> tuple[int, dict]:
    (reqid,) = _fields(_U32, body, "STATUS")
    return reqid, decode_json(body[_U32.size:], "STATUS")


#: Frames at least this big are received straight into a buffer of their own
#: size (see FrameDecoder.direct_buffer): no growing, no copy at the end.
LARGE_FRAME = 1 << 20


class FrameDecoder:
    """Incremental frame decoder shared by every peer.

    ``feed(data)`` buffers bytes; ``next_frame()`` returns ``(type, body)`` or
    ``None`` when more data is needed.  A length above ``max_frame`` raises
    ``ProtocolError`` as soon as the header is seen, before anything is
    allocated for it.  ``max_frame`` may be raised later (after the handshake).

    For a large frame whose header has arrived, ``direct_buffer()`` hands out
    the writable rest of a buffer of exactly the frame's size, for the socket
    to receive into (``recv_into``, asyncio's BufferedProtocol); the caller
    then reports the bytes it wrote with ``direct_filled(n)``.  The body is
    returned as a writable memoryview of that buffer, never copied.  The
    buffer comes from ``allocate(size)``: by default this process's pool of
    reused buffers (see ``cw.buffers``).
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME, allocate=None):
        self.max_frame = max_frame
        self.allocate = allocate or buffers.POOL.get
        self._buf = bytearray()
        self._pos = 0
        self._large = None        # (type, writable view of the body, bytes filled so far)

    def feed(self, data) -> None:
        if self._large is not None:
            ftype, body, filled = self._large
            take = min(len(data), len(body) - filled)
            body[filled:filled + take] = data[:take]
            self._large = (ftype, body, filled + take)
            data = data[take:]
            if not data:
                return
        if self._pos and self._pos == len(self._buf):
            # Everything so far was consumed: start over instead of growing.
            self._buf.clear()
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        extra = self._large[2] + HEADER_SIZE if self._large is not None else 0
        return len(self._buf) - self._pos + extra

    def direct_buffer(self):
        """A memoryview to receive the rest of a large frame into, or None."""
        if self._large is None:
            buf, pos = self._buf, self._pos
            if len(buf) - pos < HEADER_SIZE or self._large_pending_check(buf, pos) is None:
                return None
        ftype, body, filled = self._large
        return body[filled:] if filled < len(body) else None

    def direct_filled(self, n: int) -> None:
        ftype, body, filled = self._large
        self._large = (ftype, body, filled + n)

    def _large_pending_check(self, buf, pos):
        length, ftype = HEADER.unpack_from(buf, pos)
        if length < LARGE_FRAME or length > self.max_frame or len(buf) - pos - HEADER_SIZE >= length:
            return None
        body = self.allocate(length)
        have = len(buf) - pos - HEADER_SIZE
        body[:have] = buf[pos + HEADER_SIZE:]
        del buf[:]
        self._pos = 0
        self._large = (ftype, body, have)
        return self._large

    def next_frame(self):
        if self._large is not None:
            ftype, body, filled = self._large
            if filled < len(body):
                return None
            self._large = None
            return ftype, body
        buf, pos = self._buf, self._pos
        if len(buf) - pos < HEADER_SIZE:
            self._compact()
            return None
        length, ftype = HEADER.unpack_from(buf, pos)
        if length > self.max_frame:
            raise ProtocolError(
                f"frame of {length} bytes (type {ftype}) exceeds the limit of {self.max_frame} bytes")
        end = pos + HEADER_SIZE + length
        if len(buf) < end:
            if length >= LARGE_FRAME:
                self._large_pending_check(buf, pos)
            else:
                self._compact()
            return None
        with memoryview(buf) as view:   # one copy (a bytearray slice would make two)
            body = bytes(view[pos + HEADER_SIZE:end])
        self._pos = end
        return ftype, body

    def _compact(self) -> None:
        # Drop consumed bytes once they are the larger part of the buffer, so
        # a long-lived connection's buffer stays proportional to what is pending.
        if self._pos and self._pos * 2 >= len(self._buf):
            del self._buf[:self._pos]
            self._pos = 0


# --- the handshake's pure functions ---------------------------------------
#
# server -> peer   CHALLENGE  version, server nonce
# peer -> server   RESPONSE   peer nonce, HMAC(secret, "cw-peer" | server nonce | peer nonce)
# server -> peer   PROOF      HMAC(secret, "cw-master" | peer nonce | server nonce)
#
# Fresh nonces on both sides make a recorded exchange useless to replay, and
# the distinct labels stop a reflected MAC from passing for the other side's.

NONCE_SIZE = 32
MAC_SIZE = 32
#: How the master's ERROR frame starts when the peer's secret is wrong (and
#: only then): a peer must tell that, which retrying cannot fix, from a
#: handshake cut short for another reason.
AUTH_FAILED = "authentication failed"
_PEER_LABEL = b"cw-peer"
_SERVER_LABEL = b"cw-master"


def _mac(secret: bytes, label: bytes, first: bytes, second: bytes) -> bytes:
    return hmac.new(secret, label + first + second, hashlib.sha256).digest()


def server_challenge() -> tuple[bytes, bytes]:
    """Returns (server nonce, CHALLENGE frame)."""
    nonce = os.urandom(NONCE_SIZE)
    return nonce, frame(CHALLENGE, bytes([VERSION]) + nonce)


def peer_response(secret: bytes, ftype: int, body: bytes) -> tuple[bytes, bytes]:
    """Answers a CHALLENGE frame; returns (peer nonce, RESPONSE frame)."""
    if ftype == ERROR:
        raise AuthenticationError(f"the master refused the connection: {bytes(body).decode('utf-8', 'replace')}")
    if ftype != CHALLENGE or len(body) != 1 + NONCE_SIZE:
        raise ProtocolError("the server did not start with a cw challenge; is it a cw master?")
    if body[0] != VERSION:
        raise ProtocolError(f"the master speaks cw protocol version {body[0]}, this side speaks {VERSION}; "
                            "install the same cw version on every machine")
    server_nonce = bytes(body[1:])
    nonce = os.urandom(NONCE_SIZE)
    return nonce, frame(RESPONSE, nonce + _mac(secret, _PEER_LABEL, server_nonce, nonce))


def verify_response(secret: bytes, server_nonce: bytes, ftype: int, body: bytes) -> bytes:
    """Checks a peer's RESPONSE; returns the PROOF frame to send back."""
    if ftype != RESPONSE or len(body) != NONCE_SIZE + MAC_SIZE:
        raise ProtocolError(f"expected a handshake response, got frame type {ftype} of {len(body)} bytes")
    peer_nonce, mac = bytes(body[:NONCE_SIZE]), bytes(body[NONCE_SIZE:])
    if not hmac.compare_digest(mac, _mac(secret, _PEER_LABEL, server_nonce, peer_nonce)):
        raise AuthenticationError("the peer's handshake does not match our secret")
    return frame(PROOF, _mac(secret, _SERVER_LABEL, peer_nonce, server_nonce))


def verify_proof(secret: bytes, challenge_body: bytes, peer_nonce: bytes, ftype: int, body: bytes) -> None:
    """Checks the master's PROOF, so a peer never talks to an impostor."""
    if ftype == ERROR:
        text = bytes(body).decode("utf-8", "replace")
        if text.startswith(AUTH_FAILED):
            raise AuthenticationError(
                f"the master refused our handshake ({text}); this machine's secret file differs from "
                "the master's: copy the master's secret file here")
        raise ProtocolError(f"the master ended the handshake: {text}")  # e.g. its handshake timeout
    if ftype != PROOF or len(body) != MAC_SIZE:
        raise ProtocolError(f"expected the master's handshake proof, got frame type {ftype}")
    server_nonce = bytes(challenge_body[1:])
    if not hmac.compare_digest(bytes(body), _mac(secret, _SERVER_LABEL, peer_nonce, server_nonce)):
        raise AuthenticationError("the master's handshake proof does not match our secret: it is not our master, "
                                  "or it uses another secret file")
