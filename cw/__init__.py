"""cw (cluster-workers): spread Python function calls over many machines.

A master routes jobs between long-lived workers and the clients that submit
them.  See README.rst.
"""
from __future__ import annotations

import random

PORT = 5494

from cw.errors import (  # noqa: E402
    AuthenticationError,
    BrokenCluster,
    CallPicklingError,
    CallUnpicklingError,
    CwError,
    DependencyFailed,
    JobTimeout,
    KeptValueError,
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
         "ClusterExecutor": "client", "Ref": "client.refs", "ClientThread": "client", "get_executor": "client",
         "command": "ops.commands", "CommandResult": "ops.commands",
         "progress": "client.progress", "track": "client.progress", "Progress": "client.progress"}


def __getattr__(name):
    # Imported only when asked, so that `import cw` in the master stays light
    # (no pickling machinery, no process helpers).
    if name == "__version__":
        return _version()
    module = _LAZY.get(name)
    if module is not None:
        import importlib
        return getattr(importlib.import_module(f"cw.{module}"), name)
    raise AttributeError(f"module 'cw' has no attribute {name!r}")


def _version() -> str:
    """The installed distribution's version (setup.py holds the only copy).
    Asked for when needed: importlib.metadata costs ~20 ms at import."""
    from importlib import metadata
    try:
        return metadata.version("cluster-workers")
    except metadata.PackageNotFoundError:   # run from a checkout that was never installed
        return "0+unknown"


def add_version_option(parser) -> None:
    """Gives an argparse parser ``--version``; the version is looked up only
    when asked for, so that starting a worker process costs nothing more."""
    import argparse

    class Version(argparse.Action):
        def __init__(self, option_strings, dest, **kwargs):
            super().__init__(option_strings, dest, nargs=0, help="print cw's version and exit")

        def __call__(self, parser, namespace, values, option_string=None):
            print(f"{parser.prog} (cluster-workers) {_version()}")
            parser.exit()

    parser.add_argument("--version", action=Version)


__all__ = ["PORT", "randid", "allocate", "start", "stop", "LocalCluster", "ClusterExecutor", "ClientThread",
           "get_executor", "command", "CommandResult", "progress", "track", "Progress",
           "CwError", "BrokenCluster", "WorkerLost", "Unplaceable", "JobTimeout", "AuthenticationError",
           "SecretFileError", "ProtocolError", "SerializationError", "CallPicklingError", "CallUnpicklingError",
           "ResultPicklingError", "ResultUnpicklingError", "RemoteError", "RemoteTraceback", "Ref",
           "DependencyFailed", "KeptValueError"]
