"""The exceptions cw raises.  Imports nothing from cw, so every module may use it.

The family is shallow on purpose (see CPython's BrokenExecutor): catch
``cw.CwError`` for anything cw itself reports; every failed future gets its
own instance.
"""
from __future__ import annotations

import concurrent.futures


class CwError(Exception):
    """Base class of every error cw reports itself."""


class ProtocolError(CwError):
    """A peer sent bytes that are not valid cw frames (bad length, bad type)."""


class AuthenticationError(CwError):
    """The shared-secret handshake failed: the two sides hold different secrets."""


class TlsError(AuthenticationError):
    """TLS could not be set up: one side speaks TLS and the other not, or a
    certificate was refused (another CA, expired, none); retrying cannot fix it."""


class SecretFileError(CwError):
    """The secret file is missing, unsafe (readable by others) or too short."""


class BrokenCluster(CwError, concurrent.futures.BrokenExecutor):
    """The connection to the master was lost; pending futures fail with this."""


class HandshakeFailed(BrokenCluster):
    """The master was reached but the handshake did not complete (it hung up,
    timed out, or sent garbage); worth another try, unlike a wrong secret."""


class WorkerLost(CwError):
    """A job's worker died under it on every attempt it was given."""

    def __init__(self, message: str, jobid=None, attempts: int = 0, workers=()):
        super().__init__(message)
        self.jobid = jobid
        self.attempts = attempts
        self.workers = tuple(workers)

    def __reduce__(self):
        return (type(self), (self.args[0], self.jobid, self.attempts, self.workers))


class Unplaceable(CwError):
    """No connected worker could ever run the job (it asks for more resources
    than any worker machine has, or names workers that are gone), and none
    that could joined within the master's --unplaceable-timeout."""


class JobTimeout(CwError, TimeoutError):
    """The job ran longer than its timeout and was stopped; its worker was replaced."""


class SerializationError(CwError):
    """User data could not be pickled or unpickled; the subclass says where."""


class CallPicklingError(SerializationError):
    """The client could not pickle the function or its arguments."""


class CallUnpicklingError(SerializationError):
    """The worker could not unpickle the function or its arguments."""


class ResultPicklingError(SerializationError):
    """The worker could not pickle the job's result (or its exception)."""


class ResultUnpicklingError(SerializationError):
    """The client could not unpickle the result the worker sent."""


class RemoteTraceback(Exception):
    """Carries the worker's traceback text; set as ``__cause__`` of a job's exception."""

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


class RemoteError(CwError):
    """Stands in for a job's exception that could not travel back as itself."""


class InstallError(CwError):
    """pip failed on some workers (``executor.install``); the message names them with pip's error."""


class ContainerEngineMissing(CwError, RuntimeError):
    """``cw.command(..., image=...)`` was given an image but this machine has no container engine."""


class ContainerEngineError(CwError, RuntimeError):
    """The container engine failed before it could run the program (no daemon, no image...)."""


class AddressFileError(CwError, ValueError):
    """A master's address file exists but does not hold a master's address."""


class SlurmError(CwError):
    """A SLURM command failed, or the cluster could not be found."""


class KeptValueError(CwError):
    """A job uses a kept value (a ``put`` Ref, a future passed as an
    argument) that cannot be had: released, too big for the master's
    ``--kept-bytes``, or refused at submit (another executor's)."""


class DependencyFailed(CwError):
    """A job did not run: a future passed to it as an argument failed.
    ``jobid`` names the failed job; ``__cause__`` is its exception."""

    def __init__(self, message: str, jobid: int = 0):
        super().__init__(message)
        self.jobid = jobid

    def __reduce__(self):
        return type(self), (self.args[0], self.jobid)
