"""The only module that pickles and unpickles user data.

A job payload is the pickled ``(func, args, kwargs)``, or for a chunk of
``map`` calls ``(BATCH, func, [args, ...])``.  An outcome payload is the
pickled return value, or a pickled ``(exception, traceback text)`` pair.  Each
stage that can fail raises its own ``SerializationError`` subclass, so the
user learns whether the call or the result could not travel, and on which side.
"""
from __future__ import annotations

import pickle
import traceback

import cloudpickle

from . import protocol
from .errors import (
    CallPicklingError,
    CallUnpicklingError,
    RemoteError,
    RemoteTraceback,
    ResultPicklingError,
    ResultUnpicklingError,
)

PROTOCOL = 5
BATCH = "cw-batch"


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


_BY_VALUE_MODULES = getattr(getattr(cloudpickle, "cloudpickle", None), "_PICKLE_BY_VALUE_MODULES", None)


def dumps(obj) -> bytes:
    """Pickles user data: with the standard pickler when that is enough, else
    with cloudpickle.

    cloudpickle is needed for what the other side cannot import by name:
    lambdas, closures, and anything defined in ``__main__`` (the worker's
    ``__main__`` is not the client's).  Plain pickle refuses the first two,
    and its output names ``__main__`` for the last, so both fall through to
    cloudpickle.  The standard pickler is several times cheaper per call,
    which matters for the many small jobs of a ``map``.  Modules registered
    with ``cloudpickle.register_pickle_by_value`` always go through cloudpickle.
    """
    if _BY_VALUE_MODULES is not None and not _BY_VALUE_MODULES:
        try:
            data = pickle.dumps(obj, PROTOCOL)
        except Exception:  # noqa: BLE001 - anything plain pickle refuses, cloudpickle gets a go at
            pass
        else:
            if b"__main__" not in data:
                return data
    return cloudpickle.dumps(obj, protocol=PROTOCOL)


# --- client side ------------------------------------------------------------

def dumps_call(func, args, kwargs) -> bytes:
    try:
        return dumps((func, args, kwargs))
    except (Exception, SystemExit) as exc:
        raise CallPicklingError(
            f"cannot pickle the call {_name(func)}(...) to send it to a worker ({_describe(exc)}); "
            "pass arguments that pickle, or create unpicklable objects inside the job") from exc


def dumps_batch(func, arglists) -> bytes:
    try:
        return dumps((BATCH, func, arglists))
    except (Exception, SystemExit) as exc:
        raise CallPicklingError(
            f"cannot pickle a chunk of map calls to {_name(func)} ({_describe(exc)}); "
            "pass arguments that pickle") from exc


def load_outcome(status: int, data):
    """Returns ``(True, value)`` or ``(False, exception)`` for a RESULT's payload."""
    if status == protocol.OK:
        try:
            return True, pickle.loads(data)
        except BaseException as exc:  # noqa: BLE001 - any failure of user code in __setstate__
            return False, _unpickling_error("the job's result", exc)
    try:
        exc, tb = pickle.loads(data)
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

def run_payload(data) -> tuple[int, bytes]:
    """Runs one job payload; returns ``(status, outcome payload)``.  Never raises
    for anything the job does, except KeyboardInterrupt and the like, which end
    the worker (the master then re-runs the job elsewhere)."""
    try:
        call = pickle.loads(data)
    except (Exception, SystemExit) as exc:
        return error_outcome(CallUnpicklingError(
            f"the worker cannot unpickle the job ({_describe(exc)}); the function's module may be "
            "missing on the worker: install it there, or define the function in the client's script"), exc)
    if len(call) == 3 and call[0] == BATCH:
        _, func, arglists = call
        return _run_batch(func, arglists)
    func, args, kwargs = call
    try:
        value = func(*args, **kwargs)
    except (Exception, SystemExit) as exc:
        return error_outcome(exc)
    try:
        return protocol.OK, dumps(value)
    except (Exception, SystemExit) as exc:
        return error_outcome(ResultPicklingError(
            f"the worker cannot pickle the result of {_name(func)} ({_describe(exc)}); "
            "return plain data (numbers, strings, lists, dicts, arrays) instead"), exc)


def _run_batch(func, arglists) -> tuple[int, bytes]:
    outcomes = []
    for args in arglists:
        try:
            outcomes.append((True, func(*args)))
        except (Exception, SystemExit) as exc:
            outcomes.append((False, _portable(exc, traceback.format_exc())))
    try:
        return protocol.OK, dumps(outcomes)
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
    return protocol.OK, dumps(safe)


def error_outcome(exc: BaseException, cause: BaseException | None = None) -> tuple[int, bytes]:
    """The outcome of a job that raised ``exc`` (or that cw stopped, as a timeout)."""
    tb = "".join(traceback.format_exception(cause or exc))
    return protocol.RAISED, dumps(_portable(exc, tb))


def _portable(exc: BaseException, tb: str) -> tuple[BaseException, str]:
    """``(exc, tb)``, or a RemoteError standing in for an exception that would
    not survive the trip: one that pickles may still fail to unpickle (an
    ``__init__`` with other arguments than ``args``)."""
    try:
        pickle.loads(dumps((exc, tb)))
        return exc, tb
    except Exception as pickling_exc:  # noqa: BLE001 - whatever the exception's own code raises
        return RemoteError(
            f"the job raised {_describe(exc)}, which cannot be pickled to travel back "
            f"({_describe(pickling_exc)}); its traceback follows as the cause"), tb


def _name(func) -> str:
    return getattr(func, "__qualname__", None) or repr(func)
