"""Every stage of a job's round trip, crossed with every way user code can fail there.

In the manner of CPython's test_concurrent_futures/test_deadlock.py: small
picklable objects fail while they are pickled (``__reduce__``) or unpickled
(the callable ``__reduce__`` returns), on one chosen side only.  Each cell
expects its future to fail with one specific error, never to hang, and the
executor to run a normal job afterwards.

Stages: the client pickles the call, the worker unpickles it, the job runs,
the worker pickles the result, the client unpickles it.  Actions: raise an
exception, call sys.exit(), and on the worker side die hard (os._exit, and a
real segfault).

A hard crash in the client process itself is left out on purpose: the client
is this test process, so nothing would be left to receive an error, whatever
cw did.

Workers import this module by name (the client sends its sys.path along),
so the objects and job functions below are plain module-level names.  A
worker that imports it records its own pid in TEST_PID, which is why every
object carries the test process's pid explicitly instead of reading the
global on the far side.
"""
from __future__ import annotations

import ctypes
import os
import sys
import threading

import jobs
import pytest

import cw
from cw.errors import RemoteTraceback

#: The pid of the process that imported this module first: the test process,
#: which is the client.  Objects are built with it and act only on their side.
TEST_PID = os.getpid()

MESSAGE = "deliberate failure from the failure matrix"
EXIT_CODE = 42
CRASH_STATUS = 7
TIMEOUT = 30  # seconds; only catches a hang


# --- the actions ----------------------------------------------------------------

RAISE, EXIT, OS_EXIT, SEGFAULT = "raise", "sys.exit", "os._exit", "segfault"
CLIENT, WORKER = "client", "worker"


def on_side(side: str, client_pid: int) -> bool:
    """True in the process where an object meant for ``side`` must act."""
    here_is_client = os.getpid() == client_pid
    return here_is_client if side == CLIENT else not here_is_client


def act(action: str) -> None:
    if action == RAISE:
        raise ValueError(MESSAGE)
    if action == EXIT:
        sys.exit(EXIT_CODE)
    if action == OS_EXIT:
        os._exit(CRASH_STATUS)
    if action == SEGFAULT:
        ctypes.string_at(0)  # reads address 0: SIGSEGV
        os._exit(CRASH_STATUS)  # not reached; never return normally from a crash
    raise AssertionError(f"unknown action {action!r}")


class FailsWhenPickled:
    """Performs ``action`` in ``__reduce__``, when pickled on ``side``."""

    def __init__(self, action: str, side: str, client_pid: int = TEST_PID):
        self.action, self.side, self.client_pid = action, side, client_pid

    def __reduce__(self):
        if on_side(self.side, self.client_pid):
            act(self.action)
        return FailsWhenPickled, (self.action, self.side, self.client_pid)


def _rebuild_and_act(action: str, side: str, client_pid: int):
    if on_side(side, client_pid):
        act(action)
    return FailsWhenUnpickled(action, side, client_pid)


class FailsWhenUnpickled:
    """Pickles fine; performs ``action`` when unpickled on ``side``."""

    def __init__(self, action: str, side: str, client_pid: int = TEST_PID):
        self.action, self.side, self.client_pid = action, side, client_pid

    def __reduce__(self):
        return _rebuild_and_act, (self.action, self.side, self.client_pid)


# --- jobs (they run on workers) ---------------------------------------------------

def job_that_acts(action: str, client_pid: int):
    if os.getpid() != client_pid:  # never in the test process, whatever happens
        act(action)
    return "the job did not fail"


def job_returning(kind, action: str, client_pid: int):
    """Returns an object built on the worker, which fails at the next stage."""
    side = WORKER if kind is FailsWhenPickled else CLIENT
    return kind(action, side, client_pid)


def job_recursing_forever(depth=0):
    return job_recursing_forever(depth + 1)


def job_returning_deep_nesting(depth=100_000):
    value = []
    for _ in range(depth):
        value = [value]
    return value


class ExceptionThatCannotBeUnpickled(Exception):
    """Pickles, but unpickling calls __init__ with args=(message,): TypeError."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


class ExceptionThatCannotBePickled(Exception):
    def __init__(self, message):
        super().__init__(message)
        self.lock = threading.Lock()


def job_raising(kind):
    if kind is ExceptionThatCannotBeUnpickled:
        raise kind(MESSAGE, 3)
    raise kind(MESSAGE)


# --- the matrix ---------------------------------------------------------------------

def submit_call_that(executor, stage, action):
    if stage == "pickle-call-in-client":
        return executor.submit(jobs.identity, FailsWhenPickled(action, CLIENT))
    if stage == "unpickle-call-on-worker":
        return executor.submit(jobs.identity, FailsWhenUnpickled(action, WORKER))
    if stage == "run-job-on-worker":
        return executor.submit(job_that_acts, action, TEST_PID)
    if stage == "pickle-result-on-worker":
        return executor.submit(job_returning, FailsWhenPickled, action, TEST_PID)
    if stage == "unpickle-result-in-client":
        return executor.submit(job_returning, FailsWhenUnpickled, action, TEST_PID)
    raise AssertionError(stage)


MATRIX = [
    # The client pickles the call: submit() must not raise, the future fails.
    ("pickle-call-in-client", RAISE, cw.CallPicklingError),
    ("pickle-call-in-client", EXIT, cw.CallPicklingError),
    # (os._exit / segfault while pickling in the client: see the module docstring.)
    ("unpickle-call-on-worker", RAISE, cw.CallUnpicklingError),
    ("unpickle-call-on-worker", EXIT, cw.CallUnpicklingError),
    ("unpickle-call-on-worker", OS_EXIT, cw.WorkerLost),
    ("unpickle-call-on-worker", SEGFAULT, cw.WorkerLost),
    ("run-job-on-worker", RAISE, ValueError),
    ("run-job-on-worker", EXIT, SystemExit),
    ("run-job-on-worker", OS_EXIT, cw.WorkerLost),
    ("run-job-on-worker", SEGFAULT, cw.WorkerLost),
    ("pickle-result-on-worker", RAISE, cw.ResultPicklingError),
    ("pickle-result-on-worker", EXIT, cw.ResultPicklingError),
    ("pickle-result-on-worker", OS_EXIT, cw.WorkerLost),
    ("pickle-result-on-worker", SEGFAULT, cw.WorkerLost),
    ("unpickle-result-in-client", RAISE, cw.ResultUnpicklingError),
    ("unpickle-result-in-client", EXIT, cw.ResultUnpicklingError),
    # (os._exit / segfault while unpickling in the client: see the module docstring.)
]


def submit_or_fail(submit):
    """A failure in user code must reach the future, never escape from submit()."""
    try:
        return submit()
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - SystemExit included on purpose
        pytest.fail(f"submit() raised {exc!r} instead of returning a future that fails with it")


def assert_still_works(cluster, executor, crashed: bool):
    assert executor.submit(jobs.square, 7).result(timeout=TIMEOUT) == 49
    if crashed:
        # The supervisor replaced every dead worker (and has no restart pending,
        # which would slow the fixture's teardown).
        cluster.wait_for_workers(2)


@pytest.mark.parametrize(("stage", "action", "expected"), MATRIX,
                         ids=[f"{stage}-{action}" for stage, action, _ in MATRIX])
def test_failure_at_each_stage_fails_only_that_future(cluster, executor, stage, action, expected):
    future = submit_or_fail(lambda: submit_call_that(executor, stage, action))
    exc = future.exception(timeout=TIMEOUT)
    assert type(exc) is expected, f"expected {expected.__name__}, got {exc!r}"
    if expected is cw.WorkerLost:
        assert exc.attempts == 3 and len(exc.workers) == 3, exc
        assert exc.jobid == future.jobid
    elif expected is ValueError:
        assert str(exc) == MESSAGE
        assert isinstance(exc.__cause__, RemoteTraceback) and MESSAGE in exc.__cause__.tb
    elif expected is SystemExit:
        assert exc.code == EXIT_CODE
    else:
        # A SerializationError names what went wrong inside it.
        assert (MESSAGE if action == RAISE else "SystemExit") in str(exc), exc
    assert_still_works(cluster, executor, crashed=expected is cw.WorkerLost)


@pytest.mark.parametrize("kind", [ExceptionThatCannotBeUnpickled, ExceptionThatCannotBePickled],
                         ids=["cannot-be-unpickled", "cannot-be-pickled"])
def test_an_exception_that_cannot_travel_back_becomes_remote_error(cluster, executor, kind):
    exc = executor.submit(job_raising, kind).exception(timeout=TIMEOUT)
    assert type(exc) is cw.RemoteError, repr(exc)
    assert kind.__name__ in str(exc) and MESSAGE in str(exc)
    assert isinstance(exc.__cause__, RemoteTraceback) and "job_raising" in exc.__cause__.tb
    assert_still_works(cluster, executor, crashed=False)


def test_a_job_raising_recursion_error_keeps_its_type(cluster, executor):
    exc = executor.submit(job_recursing_forever).exception(timeout=TIMEOUT)
    assert type(exc) is RecursionError, repr(exc)
    assert isinstance(exc.__cause__, RemoteTraceback) and "job_recursing_forever" in exc.__cause__.tb
    assert_still_works(cluster, executor, crashed=False)


def test_a_result_too_deep_to_pickle_is_a_result_pickling_error(cluster, executor):
    exc = executor.submit(job_returning_deep_nesting).exception(timeout=TIMEOUT)
    assert type(exc) is cw.ResultPicklingError, repr(exc)
    assert "recursion" in str(exc).lower()
    assert_still_works(cluster, executor, crashed=False)
