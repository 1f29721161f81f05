"""The executor's side of its connection to the master: the reader thread
that turns the master's frames into completed futures, and the ride-through
of a lost master (connect again, resubmit what is unfinished, or fail every
pending future with BrokenCluster once the window ends).  Mixed into
ClusterExecutor, whose lock, core, futures and link it uses."""
from __future__ import annotations

import concurrent.futures
import logging
import sys
import time

from cw.client.core import Closed
from cw.client.discovery import resolve_master
from cw.client.future import WorkerInfo, job_outcome
from cw.errors import BrokenCluster, CwError, ProtocolError
from cw.wire import buffers, frames, tls
from cw.wire.address import format_address
from cw.wire.auth import load_secret
from cw.wire.frames import ClientOutput, Frame, Notice, Result, Status, StatusReply
from cw.wire.link import Link, master_timeout, open_link

log = logging.getLogger("cw.client")


class MasterConnection:
    """The executor's connection: its reader thread, and riding through a
    lost master (reconnect, resubmit)."""

    _link: Link | None
    host: str
    port: int
    tls: bool
    _tls_files: tls.TlsFiles
    @staticmethod
    def _post(link, frame, wait: bool = False) -> None:
        """Sends a frame on ``link`` unless it is gone (None, or broken: the
        reader sees that and reconnects; the core keeps what must be resent)."""
        if link is None:
            return
        try:
            if wait:
                link.post_and_wait(frame, timeout=None)
            else:
                link.post(frame)
        except OSError:
            pass

    def _read_loop(self) -> None:
        link = self._link
        while True:
            reason = self._read_until_lost(link)
            if self._closing:
                return
            with self._lock:
                self._link = None
                self._connected.clear()
                unanswered = self._core.connection_lost()
                waiters = [self._status_waiters.pop(r) for r in unanswered if r in self._status_waiters]
            link.close(flush_timeout=0)
            for waiter in waiters:
                waiter.set_exception(BrokenCluster(f"the connection to the cw master at {link.address} broke "
                                                   f"before it answered ({reason})"))
            window = self._reconnect_timeout
            if window <= 0:
                self._set_broken(f"lost the connection to the cw master at {link.address}: {reason}")
                return
            log.warning("cw: lost the master at %s (%s); trying to reach it for up to %g s, keeping %d "
                        "unfinished jobs", link.address, reason, window, len(self._pending))
            link = self._reconnect(window)
            if link is None:
                self._set_broken(f"lost the connection to the cw master at {self._link_address} ({reason}) and "
                                 f"could not reach a master again within {window:g} s (reconnect_timeout)")
                return

    def _read_until_lost(self, link) -> str:
        """Reads the master's frames until the connection ends; returns why."""
        try:
            while True:
                item = link.recv(master_timeout(link))
                if item is None:
                    return "the master closed the connection"
                ftype, body = item
                if ftype == Frame.PING:
                    link.post_nowait(frames.PONG_FRAME)   # so that the master can tell a silent client
                    buffers.POOL.release_idle()           # (pings come every few seconds)
                    if self._kept.to_release:
                        self._kept.flush_releases()       # Refs and futures collected (cw.client.refs)
                    continue
                if Frame.DEPS <= ftype <= Frame.DROP:      # kept values (cw.client.refs)
                    self._kept.on_frame(ftype, body)
                    continue
                with self._lock:
                    event = self._core.receive(ftype, body)
                if isinstance(event, Result):
                    self._on_result(*event)
                elif isinstance(event, ClientOutput):
                    self._on_output(*event)
                elif isinstance(event, Notice):
                    self._on_notice(*event)
                elif isinstance(event, StatusReply):
                    waiter = self._status_waiters.pop(event.reqid, None)
                    if waiter is not None:
                        waiter.set_result(event.report)
                elif isinstance(event, Closed):
                    return "the master dropped this client: " + event.reason
        except (OSError, ProtocolError) as exc:  # TimeoutError included: the master stopped answering
            return str(exc) or type(exc).__name__
        except Exception as exc:  # a bug here must not leave the futures hanging
            log.exception("cw: internal error in the client's reader")
            return f"internal error in the client's reader: {exc!r}"

    def _reconnect(self, window: float):
        """Connects to the master again (found again: it may have moved),
        then resubmits every unfinished job; the new link, or None when no
        master answered within ``window`` seconds (or the executor closed)."""
        deadline = time.monotonic() + window
        delay = 0.1
        while not self._closing:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                address = resolve_master(*self._address, timeout=left)
                self.host, self.port = address
                self.tls = address.tls
                link = open_link(self.host, self.port, load_secret(), self._hello, min(left, 5.0),
                                 tls.context_for(address, self._tls_files))
            except (CwError, OSError, LookupError) as exc:
                log.debug("cw: no master yet: %s", exc)
                time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 2, 2.0)
                continue
            link.start_writer()
            with self._lock:
                frames_again = self._core.resubmission()
                for frame in frames_again:
                    self._post(link, frame)
                self._link = link
                self._connected.set()
            log.warning("cw: reached the master at %s again; resubmitted %d unfinished jobs", link.address,
                        len(self._core.unfinished))
            return link
        return None

    @property
    def _link_address(self) -> str:
        return format_address(self.host, self.port, self.tls)

    def _on_result(self, jobid: int, status: int, label: bytes, payload) -> None:
        """The core let this result through: the job's first and only end."""
        with self._lock:
            future = self._pending.pop(jobid, None)
        if future is None:
            return  # cancelled meanwhile
        future.worker = WorkerInfo.from_label(label)
        future.finished_at = time.time()
        ok, value = job_outcome(jobid, status, future.worker, payload)
        if status == Status.UNPLACEABLE:
            future.worker = None     # it ran nowhere
        try:
            if ok:
                future.set_result(value)
            elif status == Status.DEPENDENCY_CANCELLED:
                future.cancel()          # a future it takes as an argument was cancelled
            else:
                future.set_exception(value)
        except concurrent.futures.InvalidStateError:
            pass  # cancelled by the user at the same moment
        self._maybe_close()

    def _on_output(self, jobid: int, label: bytes, text: str) -> None:
        with self._lock:
            future = self._pending.get(jobid)
        if future is not None:
            future._output = text
        if self._echo:
            prefix = f"[job {jobid} on {label.decode('utf-8', 'replace')}] "
            lines = text.splitlines()
            sys.stderr.write("".join(prefix + line + "\n" for line in lines))
            sys.stderr.flush()

    def _running_jobids(self) -> set:
        link = self._link
        me = link.welcome.get("id") if link is not None else None
        status = self.status()
        return {job for w in status["workers"] for job in w.get("current_jobs", {}).get(str(me), [])}

    def _on_notice(self, jobid: int, text: str) -> None:
        with self._lock:
            future = self._pending.get(jobid)
        if future is not None:
            future.notice = text
        log.warning("cw: job %d cannot run yet: %s", jobid, text)

    def _set_broken(self, reason: str) -> None:
        with self._lock:
            if self._broken is not None:
                return
            self._broken = reason
            self._core.give_up()
            self._connected.set()       # a status() waiting for a reconnection fails now
            pending = list(self._pending.values())
            self._pending.clear()
            waiters = list(self._status_waiters.values())
            self._status_waiters.clear()
        for future in pending + waiters:
            try:
                future.set_exception(BrokenCluster(reason))
            except concurrent.futures.InvalidStateError:
                pass
