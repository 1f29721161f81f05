"""A real ``python -m cw.dashboard`` process for tests: started on port 0,
its readiness line read for the URL and token, stopped by pid."""
from __future__ import annotations

import json
import selectors
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request

READY_PREFIX = "cw dashboard listening on "


class DashboardProcess:
    def __init__(self, master_address: str, db: str, http: str = "127.0.0.1:0", env=None, args=()):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cw.dashboard", master_address, "--http", http, "--db", db, *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True, env=env)
        self.url = self._ready_line(30.0)
        parsed = urllib.parse.urlsplit(self.url)
        self.base = f"http://127.0.0.1:{parsed.port}"
        self.token = urllib.parse.parse_qs(parsed.query)["token"][0]

    def _ready_line(self, timeout: float) -> str:
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            self.stop()
            raise AssertionError(f"the dashboard printed no readiness line within {timeout} s")
        line = self.proc.stdout.readline()
        if not line.startswith(READY_PREFIX):
            self.stop()
            raise AssertionError(f"unexpected first line from the dashboard: {line!r}")
        return line[len(READY_PREFIX):].strip()

    def request(self, method: str, path: str, body=None, token: str | None = None) -> tuple[int, object]:
        """(HTTP status, decoded JSON or text)."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as answer:
                status, raw, kind = answer.status, answer.read(), answer.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            status, raw, kind = exc.code, exc.read(), exc.headers.get("Content-Type", "")
        return status, json.loads(raw) if "json" in kind else raw.decode()

    def get(self, path: str, token: str | None = None):
        return self.request("GET", path, token=token)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc.stdout.close()

