"""What a job prints, caught on its worker and sent back to its client.

A worker process replaces ``sys.stdout`` and ``sys.stderr`` with routers:
text written by a thread that runs a job goes to that job's ``Capture``;
anything else (the worker's own messages, threads a job started) goes to the
real streams.  A logging handler does the same for log records, so a job's
``logging`` output comes back too.  Output written straight to file
descriptors 1 and 2 (C code, child processes) is not caught: run programs
with ``cw.command``, which captures theirs.

A capture keeps the first and the last ``limit // 2`` characters and counts
what it drops in between, so a job that prints gigabytes costs its worker,
the master and the client at most ``limit`` characters.
"""
from __future__ import annotations

import io
import logging
import sys
import threading

from cw import settings

_current = threading.local()     # .capture: the Capture of the job this thread runs (or PENDING)
#: The capture of a job that has printed nothing yet: most jobs never print,
#: so a Capture is made at the first write, not for every job.
PENDING = object()


def _capture():
    """The Capture of the job this thread runs (made now if it is PENDING), or None."""
    capture = getattr(_current, "capture", None)
    if capture is PENDING:
        capture = _current.capture = Capture()
    return capture


class Capture:
    def __init__(self, limit: int = settings.MAX_JOB_OUTPUT):
        self.half = max(1, limit // 2)
        self.head: list[str] = []
        self.head_size = 0
        self.tail: list[str] = []
        self.tail_size = 0
        self.dropped = 0

    def write(self, text: str) -> None:
        if self.head_size < self.half:
            take = text[:self.half - self.head_size]
            self.head.append(take)
            self.head_size += len(take)
            text = text[len(take):]
            if not text:
                return
        self.tail.append(text)
        self.tail_size += len(text)
        if self.tail_size > 2 * self.half:       # trim now and then, not on every write
            self._trim()

    def _trim(self) -> None:
        joined = "".join(self.tail)
        self.dropped += len(joined) - self.half
        self.tail = [joined[-self.half:]]
        self.tail_size = self.half

    def text(self) -> str:
        if self.tail_size > self.half:
            self._trim()
        middle = f"\n[... cw dropped {self.dropped} characters of this job's output here ...]\n" if self.dropped else ""
        return "".join(self.head) + middle + "".join(self.tail)


class _Router(io.TextIOBase):
    """sys.stdout / sys.stderr of a worker process (see the module docstring)."""

    def __init__(self, real):
        self.real = real
        self.buffer = _BinaryRouter(getattr(real, "buffer", None))

    def write(self, text) -> int:
        capture = _capture()
        if capture is None:
            return self.real.write(text)
        capture.write(str(text))
        return len(text)

    def flush(self) -> None:
        self.real.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.real.fileno()

    @property
    def encoding(self):
        return getattr(self.real, "encoding", "utf-8")

    @property
    def errors(self):
        return getattr(self.real, "errors", "strict")


class _BinaryRouter(io.RawIOBase):
    """``sys.stdout.buffer`` of a worker: bytes a job writes are decoded into its capture."""

    def __init__(self, real):
        self.real = real

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        capture = _capture()
        if capture is None:
            if self.real is None:
                return len(data)
            return self.real.write(data)
        capture.write(bytes(data).decode("utf-8", "replace"))
        return len(data)

    def flush(self) -> None:
        if self.real is not None:
            self.real.flush()


class _LogHandler(logging.Handler):
    """Sends the log records of a job's thread to its capture (not cw's own)."""

    def emit(self, record) -> None:
        if record.name.startswith("cw."):
            return
        capture = _capture()
        if capture is not None:
            try:
                capture.write(self.format(record) + "\n")
            except Exception:  # noqa: BLE001 - a bad record must not fail the job
                self.handleError(record)


def install() -> None:
    """Routes this process's output by job (called once by a worker process)."""
    if not isinstance(sys.stdout, _Router):
        sys.stdout = _Router(sys.stdout)
        sys.stderr = _Router(sys.stderr)
        root = logging.getLogger()
        for other in root.handlers:
            other.addFilter(_not_a_jobs)     # the job's records go to its client instead
        handler = _LogHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:%(name)s:%(message)s"))
        root.addHandler(handler)


def _not_a_jobs(record) -> bool:
    return getattr(_current, "capture", None) is None or record.name.startswith("cw.")


def begin() -> None:
    """A job starts on this thread: what it writes is caught from now on."""
    _current.capture = PENDING


def end() -> str:
    """The job on this thread ended: what it wrote (and this thread's output goes to the real streams again)."""
    capture = getattr(_current, "capture", None)
    _current.capture = None
    return capture.text() if type(capture) is Capture else ""
