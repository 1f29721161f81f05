"""Kept values on the wire: frames 60-68 and the hook that turns a key back
into its value on a worker.  No I/O, no pickling.

A *kept value* is a pickled value the master holds once, as bytes it never
unpickles, under a key (u64) its client chose at random: a client's
``put(obj)``, or the outcome of a job whose future another job takes as an
argument.  A job's payload names a kept value by a stand-in that unpickles
by calling ``resolve(key)`` (a Ref or a future pickles so, see
cw.client.refs), and its SUBMIT follows a DEPS frame naming the keys it
uses, so the master holds the job back until they are all there::

    client --PUT(key, payload)-----------> master          (put: kept at once)
    client --DEPS(jobid, [(key, dep)])--->  master          (then SUBMIT)
    master --MISSING(key)---------------->  client          (a finished dependency it no longer has)
    worker --FETCH(key)------------------>  master --KEPT(key, payload)--> worker
    master --DROP(key)------------------->  worker          (released: leave the host's cache)
"""
from __future__ import annotations

import struct
from typing import NamedTuple

from cw.errors import KeptValueError, ProtocolError
from cw.wire.frames import HEADER, LARGE_FRAME, Frame, _with_payload, frame

_KEY = struct.Struct("!Q")
_PAIR = struct.Struct("!QQ")
_PUT = struct.Struct("!QBB")
_DEP_HEAD = struct.Struct("!QB")
#: PUT's flags.
BROADCAST = 1
#: Most keys a job may name (a DEPS frame's bound).
MAX_DEPS = 65536


class Deps(NamedTuple):
    jobid: int
    deps: list          # [(key, job id or 0)]


class Keyed(NamedTuple):
    key: int
    text: str           # PUT_ACK's and KEPT_GONE's; "" for the others


class Kept(NamedTuple):
    key: int
    payload: memoryview


class Put(NamedTuple):
    key: int
    status: int         # a frames.Status: OK for a value, else how the future it stands for ended
    broadcast: bool
    payload: bytes      # (a view of the frame when it is big)


def encode_deps(jobid: int, deps) -> bytes:
    """``deps``: (key, job id) pairs; the job id is 0 for a put's key."""
    return frame(Frame.DEPS, _KEY.pack(jobid) + b"".join(_PAIR.pack(k, j) for k, j in deps))


def decode_deps(body) -> Deps:
    if len(body) < _KEY.size or (len(body) - _KEY.size) % _PAIR.size:
        raise ProtocolError(f"DEPS frame of {len(body)} bytes is not a job id and (key, job id) pairs")
    (jobid,) = _KEY.unpack_from(body)
    deps = list(_PAIR.iter_unpack(memoryview(body)[_KEY.size:]))
    if len(deps) > MAX_DEPS:
        raise ProtocolError(f"DEPS frame names {len(deps)} kept values; at most {MAX_DEPS} per job")
    return Deps(jobid, deps)


def encode_put(key: int, status: int, broadcast: bool, payload) -> tuple:
    return _with_payload(Frame.PUT, _PUT.pack(key, status, BROADCAST if broadcast else 0), payload)


def decode_put(body) -> Put:
    if len(body) < _PUT.size:
        raise ProtocolError(f"PUT frame of {len(body)} bytes is shorter than its {_PUT.size}-byte header")
    key, status, flags = _PUT.unpack_from(body)
    return Put(key, status, bool(flags & BROADCAST), _kept_bytes(memoryview(body)[_PUT.size:]))


def _kept_bytes(view):
    """A payload to keep: a big one as the view it is (a big frame is received into a
    buffer of its own, or mapped from a segment, which then goes on to a worker of
    the same machine by reference), a small one copied out of the shared read buffer."""
    return view if len(view) >= LARGE_FRAME else bytes(view)


def encode_key(kind: int, key: int, text: str = "") -> bytes:
    """RELEASE_KEY, MISSING, FETCH, DROP (no text); PUT_ACK and KEPT_GONE (text)."""
    return frame(kind, _KEY.pack(key) + text.encode("utf-8", "replace")[:4000])


def decode_key(body, name: str) -> Keyed:
    """A key frame's key and text."""
    if len(body) < _KEY.size:
        raise ProtocolError(f"{name} frame of {len(body)} bytes holds no 8-byte key")
    return Keyed(_KEY.unpack_from(body)[0], bytes(body[_KEY.size:]).decode("utf-8", "replace"))


def encode_kept(key: int, payload) -> tuple:
    return _with_payload(Frame.KEPT, _KEY.pack(key), payload)


def kept_frame_size(payload) -> int:
    return HEADER.size + _KEY.size + len(payload)


def decode_kept(body) -> Kept:
    """KEPT's key and payload (a view of the frame)."""
    if len(body) < _KEY.size:
        raise ProtocolError(f"KEPT frame of {len(body)} bytes holds no 8-byte key")
    return Kept(_KEY.unpack_from(body)[0], memoryview(body)[_KEY.size:])


def dependency_payload(jobid: int, status: int, payload) -> bytes:
    """The payload of a DEPENDENCY result: the failed dependency's job id, its status and its payload."""
    return _DEP_HEAD.pack(jobid, status) + bytes(payload)


def decode_dependency(payload) -> tuple[int, int, memoryview]:
    if len(payload) < _DEP_HEAD.size:
        raise ProtocolError("DEPENDENCY result too short for its failed job's id and status")
    jobid, status = _DEP_HEAD.unpack_from(payload)
    return jobid, status, memoryview(payload)[_DEP_HEAD.size:]


def cancelled_payload(jobid: int) -> bytes:
    return _KEY.pack(jobid)


def decode_cancelled_payload(payload) -> int:
    return _KEY.unpack_from(payload)[0] if len(payload) >= _KEY.size else 0


# --- the worker's side of a stand-in -----------------------------------------

_resolver = None


def install(resolver) -> None:
    """The function ``resolve`` asks (a worker process installs one, cw.worker.refs)."""
    global _resolver
    _resolver = resolver


def resolve(key: int):
    """What a Ref or a future passed to a job unpickles to: its value."""
    if _resolver is None:
        raise KeptValueError(f"kept value {key:#x} reached a process that is not a cw worker; Refs and "
                             "futures turn into their values only inside jobs")
    return _resolver(key)


def value(obj):
    """What a finished future passed to a job unpickles to: its result, carried along."""
    return obj
