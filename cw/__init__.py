"""cw (cluster-workers): spread Python function calls over many machines.

A master routes jobs between long-lived workers and the clients that submit
them.  See README.rst.
"""
from __future__ import annotations

import random

PORT = 5494

from .errors import (  # noqa: E402
    AuthenticationError,
    BrokenCluster,
    CallPicklingError,
    CallUnpicklingError,
    CwError,
    JobTimeout,
    ProtocolError,
    RemoteError,
    ResultPicklingError,
    ResultUnpicklingError,
    SecretFileError,
    SerializationError,
    WorkerLost,
)


def randid() -> int:
    """A random 128-bit job id, as the original cluster-workers gave."""
    return random.getrandbits(128)


def __getattr__(name):
    # The local-cluster helpers start processes; import them only when asked,
    # so that `import cw` in the master stays light.
    if name in ("allocate", "start", "stop", "LocalCluster"):
        from . import local
        return getattr(local, name)
    raise AttributeError(f"module 'cw' has no attribute {name!r}")


__all__ = ["PORT", "randid", "allocate", "start", "stop", "LocalCluster", "CwError", "BrokenCluster",
           "WorkerLost", "JobTimeout", "AuthenticationError", "SecretFileError", "ProtocolError", "SerializationError",
           "CallPicklingError", "CallUnpicklingError", "ResultPicklingError", "ResultUnpicklingError",
           "RemoteError"]
