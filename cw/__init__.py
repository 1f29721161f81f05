"""cw (cluster-workers): spread Python function calls over many machines.

A master routes jobs between long-lived workers and the clients that submit
them.  See README.rst.
"""
from __future__ import annotations

import random

PORT = 5494
__version__ = "0.3.0"

from cw.errors import (  # noqa: E402
    AuthenticationError,
    BrokenCluster,
    CallPicklingError,
    CallUnpicklingError,
    CwError,
    JobTimeout,
    ProtocolError,
    RemoteError,
    RemoteTraceback,
    ResultPicklingError,
    ResultUnpicklingError,
    SecretFileError,
    SerializationError,
    Unplaceable,
    WorkerLost,
)


def randid() -> int:
    """A random 128-bit job id, as the original cluster-workers gave."""
    return random.getrandbits(128)


_LAZY = {"allocate": "launch.local", "start": "launch.local", "stop": "launch.local", "LocalCluster": "launch.local",
         "ClusterExecutor": "client", "ClientThread": "client", "get_executor": "client",
         "command": "ops.commands", "CommandResult": "ops.commands",
         "progress": "client.progress", "track": "client.progress", "Progress": "client.progress"}


def __getattr__(name):
    # Imported only when asked, so that `import cw` in the master stays light
    # (no pickling machinery, no process helpers).
    module = _LAZY.get(name)
    if module is not None:
        import importlib
        return getattr(importlib.import_module(f"cw.{module}"), name)
    raise AttributeError(f"module 'cw' has no attribute {name!r}")


__all__ = ["PORT", "randid", "allocate", "start", "stop", "LocalCluster", "ClusterExecutor", "ClientThread",
           "get_executor", "command", "CommandResult", "progress", "track", "Progress",
           "CwError", "BrokenCluster", "WorkerLost", "Unplaceable", "JobTimeout", "AuthenticationError",
           "SecretFileError", "ProtocolError", "SerializationError", "CallPicklingError", "CallUnpicklingError",
           "ResultPicklingError", "ResultUnpicklingError", "RemoteError", "RemoteTraceback"]
