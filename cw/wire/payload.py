"""The only module that pickles and unpickles user data.

A job payload is the pickled ``(func, args, kwargs)``, or for a chunk of
``map`` calls ``(BATCH, func, [args, ...])``.  An outcome payload is the
pickled return value, or a pickled ``(exception, traceback text)`` pair.  Each
stage that can fail raises its own ``SerializationError`` subclass, so the
user learns whether the call or the result could not travel, and on which side.

Big buffers travel out of band (pickle protocol 5): a numpy array's data, a
``PickleBuffer``, and a ``bytes`` object passed as an argument or returned as
the result are not copied into the pickle but sent as they are after it, and
the receiver unpickles with views of the frame it received.  Such a payload
is a tuple of chunks, and on the wire::

    0xFF, buffer count u32, pickle length u64, each buffer's length u64,
    the pickle, the buffers

(a pickle of protocol 5 starts with 0x80, so the first byte tells the two apart).

A function that travels by value (defined in ``__main__``, a lambda, a
closure) is sent once (FUNC frames) and job payloads name it by the digest
of its pickled bytes: ``0xFE, digest[16]``, then the payload of ``(args,
kwargs)`` or ``(BATCH, [args, ...])`` as above (see cw.client.functions).
"""
from __future__ import annotations

import hashlib
import pickle
import struct
import traceback
import types

import cloudpickle

from cw.errors import (
    CallPicklingError,
    CallUnpicklingError,
    KeptValueError,
    RemoteError,
    RemoteTraceback,
    ResultPicklingError,
    ResultUnpicklingError,
)
from cw.wire.frames import DIGEST_SIZE, FUNCTION_MARK, Status

PROTOCOL = 5
BATCH = "cw-batch"
#: Buffers at least this big travel out of band; smaller ones are cheaper in the pickle.
OUT_OF_BAND_MIN = 256 * 1024
_ENVELOPE = struct.Struct("!BIQ")
_ENVELOPE_MARK = 0xFF


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


_BY_VALUE_MODULES = getattr(getattr(cloudpickle, "cloudpickle", None), "_PICKLE_BY_VALUE_MODULES", None)


def dumps(obj):
    """Pickles user data: with the standard pickler when that is enough, else
    with cloudpickle.  Returns bytes, or a tuple of chunks when big buffers
    travel out of band (see the module's docstring).

    cloudpickle is needed for what the other side cannot import by name:
    lambdas, closures, and anything defined in ``__main__`` (the worker's
    ``__main__`` is not the client's).  Plain pickle refuses the first two,
    and its output names ``__main__`` for the last, so both fall through to
    cloudpickle.  The standard pickler is several times cheaper per call,
    which matters for the many small jobs of a ``map``.  Modules registered
    with ``cloudpickle.register_pickle_by_value`` always go through cloudpickle.
    """
    views: list[memoryview] = []      # the buffers that go out of band, in the pickle's order

    def out_of_band(buffer: pickle.PickleBuffer) -> bool:
        # Called by the pickler for each buffer (protocol 5): a true answer keeps
        # it in the pickle.  A small one is cheaper copied than viewed (and would
        # keep its whole received frame alive); a non-contiguous one cannot be viewed.
        try:
            view = buffer.raw()
        except BufferError:
            return True
        if view.nbytes < OUT_OF_BAND_MIN:
            return True
        views.append(view)
        return False

    if _BY_VALUE_MODULES is not None and not _BY_VALUE_MODULES:
        try:
            data = pickle.dumps(obj, PROTOCOL, buffer_callback=out_of_band)
        except Exception:  # noqa: BLE001 - anything plain pickle refuses, cloudpickle gets a go at
            pass
        else:
            if b"__main__" not in data:
                return _with_views(data, views) if views else data
        views.clear()
    data = cloudpickle.dumps(obj, protocol=PROTOCOL, buffer_callback=out_of_band)
    return _with_views(data, views) if views else data


def _with_views(data: bytes, views: list):
    """The payload of a pickle ``data`` whose big buffers ``views`` travel out of band."""
    head = _ENVELOPE.pack(_ENVELOPE_MARK, len(views), len(data))
    lengths = struct.pack(f"!{len(views)}Q", *(v.nbytes for v in views))
    return (head + lengths + data, *views)


def loads(data):
    """Unpickles what ``dumps`` made, received in one piece (bytes or a view);
    out-of-band buffers come out as views of ``data``, not copies."""
    if not data or data[0] != _ENVELOPE_MARK:
        return pickle.loads(data)
    view = memoryview(data)
    if len(view) < _ENVELOPE.size:
        raise ValueError("payload too short for its out-of-band header")
    _, count, pickle_len = _ENVELOPE.unpack_from(view)
    start = _ENVELOPE.size + 8 * count
    if len(view) < start:
        raise ValueError("payload too short for its out-of-band buffer lengths")
    lengths = struct.unpack_from(f"!{count}Q", view, _ENVELOPE.size)
    if start + pickle_len + sum(lengths) != len(view):
        raise ValueError(f"payload of {len(view)} bytes does not match its out-of-band lengths")
    pos = start + pickle_len
    buffers = []
    for length in lengths:
        buffers.append(view[pos:pos + length])
        pos += length
    return pickle.loads(view[start:start + pickle_len], buffers=buffers)


def views_writable_memory(payload) -> bool:
    """Whether a payload sends some buffer as it is that its owner may still
    change (a numpy array, unlike ``bytes``): then the sender must wait until
    it has been sent, or a later change would travel instead of the value at
    the time of the call."""
    return type(payload) is tuple and any(not view.readonly for view in payload[1:])


def joined(payload) -> bytes:
    """A payload as one bytes object (for the few places that store it whole)."""
    return b"".join(payload) if type(payload) is tuple else payload


class _BigBytes:
    """Stands in for a big ``bytes`` argument or result, so that it travels
    out of band: plain pickle copies ``bytes`` into the pickle and never asks
    a ``reducer_override``.  It unpickles as a ``bytes`` object."""

    __slots__ = ("data",)

    def __init__(self, data: bytes):
        self.data = data

    def __reduce_ex__(self, protocol):
        return bytes, (pickle.PickleBuffer(self.data),)


def _big_bytes(value):
    return _BigBytes(value) if type(value) is bytes and len(value) >= OUT_OF_BAND_MIN else value


def _wrap_big_bytes(args, kwargs):
    for a in args:
        if type(a) is bytes and len(a) >= OUT_OF_BAND_MIN:
            args = tuple(map(_big_bytes, args))
            break
    if kwargs:
        for v in kwargs.values():
            if type(v) is bytes and len(v) >= OUT_OF_BAND_MIN:
                kwargs = {k: _big_bytes(v) for k, v in kwargs.items()}
                break
    return args, kwargs


# --- functions sent once ----------------------------------------------------

_FUNCTION_PREFIX = bytes([FUNCTION_MARK])
_FUNCTION_HEAD = 1 + DIGEST_SIZE
#: Functions unpickled from FUNC frames by this process (tests read it inside jobs).
functions_loaded = 0


def pickle_by_value(func) -> bytes | None:
    """The pickled bytes of a function that travels by value (defined in
    ``__main__``, a lambda, a closure, or a method bound to such a class's
    instance), or None for one the standard pickler sends by name (a module's
    function: a few bytes, nothing to cache)."""
    if not isinstance(func, (types.FunctionType, types.MethodType)):
        return None
    if _BY_VALUE_MODULES is not None and not _BY_VALUE_MODULES:
        try:
            data = pickle.dumps(func, PROTOCOL)
        except Exception:  # noqa: BLE001 - a lambda or a closure: by value
            pass
        else:
            if b"__main__" not in data:
                return None
    return cloudpickle.dumps(func, protocol=PROTOCOL)


def digest_of(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE).digest()


def _named(digest: bytes, inner):
    """A job payload naming its function by ``digest``; ``inner`` the payload of its arguments."""
    if type(inner) is tuple:
        return (_FUNCTION_PREFIX + digest + inner[0], *inner[1:])
    return _FUNCTION_PREFIX + digest + inner


def dumps_call_named(func, digest: bytes, args, kwargs):
    """The payload of a call of the function whose FUNC is ``digest``."""
    try:
        return _named(digest, dumps(_wrap_big_bytes(args, kwargs)))
    except (Exception, SystemExit) as exc:
        raise CallPicklingError(
            f"cannot pickle the arguments of {_name(func)}(...) to send them to a worker ({_describe(exc)}); "
            "pass arguments that pickle, or create unpicklable objects inside the job") from exc


def dumps_batch_named(func, digest: bytes, arglists):
    try:
        return _named(digest, dumps((BATCH, arglists)))
    except (Exception, SystemExit) as exc:
        raise CallPicklingError(
            f"cannot pickle a chunk of map calls to {_name(func)} ({_describe(exc)}); "
            "pass arguments that pickle") from exc


def load_function(entry):
    """The function of a FUNC (a cw.worker.functions.FunctionEntry),
    unpickled the first time only: later jobs share the object."""
    global functions_loaded
    func = entry.func
    if func is None:
        func = entry.func = pickle.loads(entry.data)
        functions_loaded += 1
    return func


# --- client side ------------------------------------------------------------

def dumps_call(func, args, kwargs):
    try:
        return dumps((func, *_wrap_big_bytes(args, kwargs)))
    except (Exception, SystemExit) as exc:
        raise CallPicklingError(
            f"cannot pickle the call {_name(func)}(...) to send it to a worker ({_describe(exc)}); "
            "pass arguments that pickle, or create unpicklable objects inside the job") from exc


def dumps_batch(func, arglists):
    try:
        return dumps((BATCH, func, arglists))
    except (Exception, SystemExit) as exc:
        raise CallPicklingError(
            f"cannot pickle a chunk of map calls to {_name(func)} ({_describe(exc)}); "
            "pass arguments that pickle") from exc


def load_outcome(status: int, data):
    """Returns ``(True, value)`` or ``(False, exception)`` for a RESULT's payload."""
    if status == Status.OK:
        try:
            return True, loads(data)
        except BaseException as exc:  # noqa: BLE001 - any failure of user code in __setstate__
            return False, _unpickling_error("the job's result", exc)
    try:
        exc, tb = loads(data)
    except BaseException as exc:  # noqa: BLE001
        return False, _unpickling_error("the exception the job raised", exc)
    if tb:
        exc.__cause__ = RemoteTraceback(tb)
    return False, exc


def _unpickling_error(what: str, exc: BaseException) -> ResultUnpicklingError:
    err = ResultUnpicklingError(
        f"cannot unpickle {what} in the client ({_describe(exc)}); the class or module it needs "
        "may be missing or different here: install the same code on client and workers")
    err.__cause__ = exc
    return err


def batch_items(outcomes):
    """Yields ``(True, value)`` or ``(False, exception)`` for each call of a map chunk."""
    for ok, value in outcomes:
        if ok:
            yield True, value
        else:
            exc, tb = value
            exc.__cause__ = RemoteTraceback(tb)
            yield False, exc


# --- worker side ------------------------------------------------------------

def run_payload(data, hold: list | None = None, function=None):
    """Runs one job payload; returns ``(status, outcome payload)``.  Never raises
    for anything the job does, except KeyboardInterrupt and the like, which end
    the worker (the master then re-runs the job elsewhere).  The unpickled
    call is appended to ``hold``: the caller lets go of the arguments after
    sending the outcome (freeing 100 MB takes milliseconds).  ``function``:
    the FunctionEntry of the digest a payload names (see load_function)."""
    try:
        if data[:1] == _FUNCTION_PREFIX:
            call = _load_named(data, function)
        else:
            call = loads(data)
    except (Exception, SystemExit) as exc:
        if isinstance(exc, KeptValueError):
            return error_outcome(exc)     # a Ref or a future it takes cannot be had (cw.worker.refs)
        return error_outcome(CallUnpicklingError(
            f"the worker cannot unpickle the job ({_describe(exc)}); the function's module may be "
            "missing on the worker: install it there, or define the function in the client's script"), exc)
    if hold is not None:
        hold.append(call)
    if len(call) == 3 and call[0] == BATCH:
        _, func, arglists = call
        return _run_batch(func, arglists)
    func, args, kwargs = call
    try:
        value = func(*args, **kwargs)
    except (Exception, SystemExit) as exc:
        return error_outcome(exc)
    try:
        if type(value) is bytes and len(value) >= OUT_OF_BAND_MIN:
            value = _BigBytes(value)
        return Status.OK, dumps(value)
    except (Exception, SystemExit) as exc:
        return error_outcome(ResultPicklingError(
            f"the worker cannot pickle the result of {_name(func)} ({_describe(exc)}); "
            "return plain data (numbers, strings, lists, dicts, arrays) instead"), exc)


def _load_named(data, function):
    if function is None:
        raise ValueError("the payload names a function this worker was not given")
    func = function.func
    if func is None:
        func = load_function(function)
    rest = memoryview(data)[_FUNCTION_HEAD:]
    # (loads' own first test, inline: a call fewer per job)
    rest = pickle.loads(rest) if rest[0] != _ENVELOPE_MARK else loads(rest)
    if len(rest) == 2 and rest[0] == BATCH:
        return BATCH, func, rest[1]
    return func, *rest


def _run_batch(func, arglists):
    outcomes = []
    for args in arglists:
        try:
            outcomes.append((True, func(*args)))
        except (Exception, SystemExit) as exc:
            outcomes.append((False, _portable(exc, traceback.format_exc())))
    try:
        return Status.OK, dumps(outcomes)
    except (Exception, SystemExit):
        pass
    # One result would not pickle: check each, so that only that one fails.
    safe = []
    for ok, value in outcomes:
        try:
            dumps(value)
            safe.append((ok, value))
        except (Exception, SystemExit) as exc:
            err = ResultPicklingError(
                f"the worker cannot pickle the result of {_name(func)} ({_describe(exc)})")
            safe.append((False, (err, traceback.format_exc())))
    return Status.OK, dumps(safe)


def error_outcome(exc: BaseException, cause: BaseException | None = None):
    """The outcome of a job that raised ``exc`` (or that cw stopped, as a timeout)."""
    tb = "".join(traceback.format_exception(cause or exc))
    return Status.RAISED, dumps(_portable(exc, tb))


def _portable(exc: BaseException, tb: str) -> tuple[BaseException, str]:
    """``(exc, tb)``, or a RemoteError standing in for an exception that would
    not survive the trip: one that pickles may still fail to unpickle (an
    ``__init__`` with other arguments than ``args``)."""
    try:
        loads(joined(dumps((exc, tb))))
        return exc, tb
    except Exception as pickling_exc:  # noqa: BLE001 - whatever the exception's own code raises
        return RemoteError(
            f"the job raised {_describe(exc)}, which cannot be pickled to travel back "
            f"({_describe(pickling_exc)}); its traceback follows as the cause"), tb


def _name(func) -> str:
    return getattr(func, "__qualname__", None) or repr(func)
