"""The dashboard's connection to the master: a client that subscribes to
job events (cw.master.events) and asks for the status once a second.

A status costs the master time in proportion to its queued jobs (2.5 ms for
20,000 here), so the next request waits for the answer to the last one, and
at least 20 times as long as that answer took: the dashboard never takes
more than about 5% of the master's time, however long its queues.

Two threads: one reads (EVENTS, STATUS, PING), one asks for the status.
A lost master is looked for again every few seconds; meanwhile the
dashboard shows the last status it had and says the master is gone.
"""
from __future__ import annotations

import logging
import threading
import time

from cw.errors import CwError, ProtocolError
from cw.wire import frames
from cw.wire.auth import load_secret
from cw.wire.frames import Frame
from cw.wire.link import open_link, peer_info

log = logging.getLogger("cw.dashboard")

#: Seconds between two status requests (the page is redrawn once a second).
STATUS_EVERY = 1.0
#: Seconds between two attempts to reach a lost master.
RECONNECT_EVERY = 2.0


class MasterWatch:
    """Calls ``on_status(dict)`` with each status and ``on_events(dict)``
    with each EVENTS message (frames.decode_events), from its threads."""

    def __init__(self, host: str, port: int, on_status, on_events, on_lost=None, secret: bytes | None = None):
        self.host, self.port = host, port
        self.on_status, self.on_events, self.on_lost = on_status, on_events, on_lost
        self.secret = secret
        self.link = None
        self.connected = threading.Event()
        self.stopping = threading.Event()
        self.error: str | None = None
        self.answered = threading.Event()   # the last status request was answered
        self.round_trip = 0.0               # seconds the last status took to come
        self._asked_at = 0.0
        self._reader = threading.Thread(target=self._read_forever, name="cw-dashboard-reader", daemon=True)
        self._asker = threading.Thread(target=self._ask_forever, name="cw-dashboard-status", daemon=True)

    def start(self) -> None:
        self._reader.start()
        self._asker.start()

    def stop(self) -> None:
        self.stopping.set()
        link = self.link
        if link is not None:
            link.close(flush_timeout=0)

    def _connect(self):
        secret = self.secret if self.secret is not None else load_secret()
        link = open_link(self.host, self.port, secret, {**peer_info("client"), "name": "dashboard"},
                         connect_timeout=RECONNECT_EVERY)
        link.send(frames.SUBSCRIBE_FRAME)
        return link

    def _read_forever(self) -> None:
        while not self.stopping.is_set():
            try:
                self.link = self._connect()
            except (CwError, OSError) as exc:
                self.error = f"cannot reach the cw master at {self.host}:{self.port}: {exc}"
                self.stopping.wait(RECONNECT_EVERY)
                continue
            self.error = None
            self.connected.set()
            reason = self._read(self.link)
            self.connected.clear()
            self.link.close(flush_timeout=0)
            self.link = None
            if not self.stopping.is_set():
                self.error = f"lost the cw master at {self.host}:{self.port} ({reason}); looking for it again"
                log.warning("%s", self.error)
                if self.on_lost is not None:
                    self.on_lost()

    def _read(self, link) -> str:
        while not self.stopping.is_set():
            try:
                item = link.recv(timeout=60)
            except (OSError, TimeoutError, ProtocolError) as exc:
                return str(exc)
            if item is None:
                return "it closed the connection"
            ftype, body = item
            try:
                if ftype == Frame.EVENTS:
                    self.on_events(decode_events(body))
                elif ftype == Frame.STATUS:
                    self.round_trip = time.monotonic() - self._asked_at
                    self.answered.set()
                    self.on_status(frames.decode_status(body).report)
                elif ftype == Frame.PING:
                    link.try_send(frames.PONG_FRAME)
                elif ftype == Frame.ERROR:
                    return frames.decode_error(body)
            except ProtocolError as exc:
                return str(exc)
            except Exception:  # noqa: BLE001 - a bug in the page's books must not stop the watch
                log.exception("internal error handling a %s frame", frames.kind_name(ftype))
        return "stopped"

    def _ask_forever(self) -> None:
        reqid = 0
        while not self.stopping.is_set():
            if not self.connected.wait(0.5):
                continue
            link = self.link
            reqid += 1
            self.answered.clear()
            self._asked_at = time.monotonic()
            try:
                if link is not None:
                    link.send(frames.encode_status_request(reqid))
            except OSError:
                pass              # the reader sees the broken link and reconnects
            self.answered.wait(STATUS_EVERY * 10)
            self.stopping.wait(max(STATUS_EVERY - self.round_trip, 20 * self.round_trip))


def decode_events(body) -> dict:
    """An EVENTS frame's JSON object, checked, its ``events`` left as rows
    (frames.decode_events also makes a dict of each: work the dashboard does
    not need, for up to 500 events a second)."""
    msg = frames.decode_json(body, "EVENTS")
    fields, rows = msg.get("fields"), msg.get("events")
    if not isinstance(fields, list) or not isinstance(rows, list) or \
            not all(isinstance(row, list) and len(row) == len(fields) for row in rows):
        raise ProtocolError("EVENTS frame needs a list of fields and events of that many values each")
    return msg


def wait_connected(watch: MasterWatch, timeout: float) -> bool:
    """Waits up to ``timeout`` seconds for the first connection."""
    deadline = time.monotonic() + timeout
    while not watch.connected.wait(0.1):
        if time.monotonic() > deadline or watch.stopping.is_set():
            return False
    return True
