"""Where a master is: ``HOST:PORT`` strings and the address file.

A master started with ``--address-file PATH`` publishes its reachable
address there; the SLURM helpers, workers and clients read it.  Both sides
go through this module, so the file's format lives in one place::

    {"host": "node7", "port": 40123, "pid": 4711, "job": "1234", "node": "node7", "restarts": 0,
     "scheme": "tls"}

``scheme`` is "tls" for a master that speaks only TLS (``cw master --tls``)
and "tcp" (or absent, from an older master) otherwise: a reader connects the
way the master listens, so ``file:`` and ``slurm:`` addresses need no
``tls://`` of their own.  An address given as text says it with a
``tls://`` prefix (``tls://node7:40123``).

``job`` is the SLURM job id of the master (null outside SLURM), so that a
reader can ignore a file left behind by a master job that has ended.
``node`` is the SLURM node the master ran on and ``restarts`` how often
SLURM had requeued its job then ($SLURMD_NODENAME, $SLURM_RESTART_COUNT;
null outside SLURM): a job requeued after its node failed runs elsewhere,
and until its new master replaces the file, the file still names the dead
node, whose address would hang a connect rather than refuse it (issue 13).

The file is replaced atomically (written beside it, then renamed), so a
reader sees the old file or the new one, never half of one.  A file that is
nevertheless not a record (written by hand, cut short by a full disk) is
refused with ``AddressFileError`` rather than taken for "no master".

Imports nothing above the wire: the master uses it without loading the client.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import NamedTuple

from cw import PORT
from cw.errors import AddressFileError

__all__ = ["AddressFileError", "AddressRecord", "MasterAddress", "TLS_PREFIX", "format_address", "parse_address",
           "read_address_file", "remove_address_file", "write_address_file"]


TLS_PREFIX = "tls://"


class AddressRecord(NamedTuple):
    """What an address file says."""
    host: str
    port: int
    pid: int | None
    job: str | None      # the master's SLURM job id, if it ran as one
    node: str | None = None      # the SLURM node it ran on
    restarts: int | None = None  # SLURM's requeue count of its job then
    tls: bool = False            # the master speaks TLS only


class MasterAddress(tuple):
    """A master's ``(host, port)``, and whether it speaks TLS (``.tls``).

    It unpacks and compares as the pair it always was, so code that only
    wants the host and port keeps ``host, port = resolve_master(...)``; what
    connects reads ``.tls`` too, and the scheme is never silently lost."""

    tls: bool

    def __new__(cls, host: str, port: int, tls: bool = False):
        self = super().__new__(cls, (host, port))
        self.tls = bool(tls)
        return self

    @property
    def host(self) -> str:
        return self[0]

    @property
    def port(self) -> int:
        return self[1]

    def __str__(self) -> str:
        return format_address(self[0], self[1], self.tls)


def format_address(host: str, port: int, tls: bool = False) -> str:
    """``host:port`` (``[v6]:port``), with ``tls://`` in front for a TLS master."""
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return TLS_PREFIX + shown if tls else shown


def parse_address(address: str | None, default_port: int = PORT) -> MasterAddress:
    """'host', 'host:port', '[v6]:port', any of them after 'tls://', or None
    -> MasterAddress(host, port, tls)."""
    if address and address.startswith(TLS_PREFIX):
        host, port = parse_address(address[len(TLS_PREFIX):], default_port)
        return MasterAddress(host, port, tls=True)
    return MasterAddress(*_host_port(address, default_port))


def _host_port(address: str | None, default_port: int) -> tuple[str, int]:
    if not address:
        return "localhost", default_port
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    if address.count(":") == 1:
        host, port = address.split(":")
        try:
            return host or "localhost", int(port)
        except ValueError:
            raise ValueError(f"bad port in master address {address!r}; expected HOST:PORT") from None
    return address, default_port


def write_address_file(path: str | os.PathLike, host: str, port: int, job: str | None = None,
                       tls: bool = False) -> None:
    """Publishes (host, port) of this process's master at ``path``, creating
    its directory; atomic: readers never see half a file."""
    path = os.fspath(path)
    record = {"host": host, "port": port, "pid": os.getpid(), "job": job, "scheme": "tls" if tls else "tcp"}
    if job is not None and os.environ.get("SLURMD_NODENAME"):
        # Read here rather than passed by the master: they describe the job
        # the master runs in, as its id does.  SLURM sets the count only
        # once the job has been requeued.
        restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
        record.update(node=os.environ["SLURMD_NODENAME"], restarts=int(restarts) if restarts.isdigit() else None)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # Beside the target (a rename is atomic only within one file system), and
    # named after it so that an OSError's filename still points at the target.
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())   # or a crash right after the rename could leave an empty file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_address_file(path: str | os.PathLike) -> AddressRecord | None:
    """The record at ``path``; None when there is no file.  Raises
    AddressFileError when the file holds something else."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(data)
        host, port = record["host"], int(record["port"])
        pid, job, node, restarts = record.get("pid"), record.get("job"), record.get("node"), record.get("restarts")
        if not isinstance(host, str) or not host:
            raise ValueError(f"bad host {host!r}")
        if not 0 < port < 65536:
            raise ValueError(f"bad port {port}")
        scheme = record.get("scheme", "tcp")
        if scheme not in ("tcp", "tls"):
            raise ValueError(f"unknown scheme {scheme!r} (this cw knows tcp and tls; a newer master?)")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        shown = data[:80].decode("utf-8", "replace")
        raise AddressFileError(
            f"the master address file {os.fspath(path)} is not a master's address record ({exc}; it holds "
            f"{shown!r}); a running master rewrites it when it starts: remove it, or restart the master") from None
    return AddressRecord(host, port, pid if isinstance(pid, int) else None, None if job is None else str(job),
                         node if isinstance(node, str) and node else None,
                         restarts if isinstance(restarts, int) else None, scheme == "tls")


def remove_address_file(path: str | os.PathLike) -> None:
    """Removes the address file if this process published it (a newer master
    may have replaced it since)."""
    try:
        record = read_address_file(path)
        if record is not None and record.pid == os.getpid():
            os.unlink(path)
    except (OSError, AddressFileError):
        pass
