"""Headless Chromium driven over the DevTools protocol, for the dashboard's
browser test: started with --remote-debugging-port=0 (its readiness line on
stderr names the real port), stopped by its process group, its temporary
profile removed."""
from __future__ import annotations

import asyncio
import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import tempfile
import threading
import time

import aiohttp

READY = re.compile(r"DevTools listening on (ws://[^\s]+)")


class Browser:
    def __init__(self, executable: str = "chromium"):
        self.executable = executable
        self.profile = tempfile.mkdtemp(prefix="cw-chromium-")
        self.proc = None
        self.port = None

    def start(self, timeout: float = 60.0, attempts: int = 2) -> None:
        """Starts Chromium; one that printed no readiness line in ``timeout``
        seconds (seen once on a loaded machine) is stopped and started again."""
        for attempt in range(attempts):
            try:
                return self._start(timeout)
            except AssertionError:
                if attempt == attempts - 1:
                    raise
                self.profile = tempfile.mkdtemp(prefix="cw-chromium-")

    def _start(self, timeout: float) -> None:
        self.proc = subprocess.Popen(
            [self.executable, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-extensions", "--disable-background-networking", "--disable-breakpad",
             "--disable-dev-shm-usage", "--remote-debugging-port=0", f"--user-data-dir={self.profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            start_new_session=True)
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stderr, selectors.EVENT_READ)
        lines = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not sel.select(deadline - time.monotonic()):
                break
            line = self.proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            found = READY.search(line)
            if found:
                self.port = int(found.group(1).split(":")[2].split("/")[0])
                # Keep reading its chatter (dbus...): a full pipe would stop it.
                threading.Thread(target=self.proc.stderr.read, daemon=True).start()
                return
        self.stop()
        raise AssertionError("chromium printed no DevTools readiness line:\n" + "".join(lines[-20:]))

    def stop(self) -> None:
        """Ends Chromium's whole process group (its own session), then removes its profile."""
        if self.proc is not None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    continue
            self.proc.wait(10)
        shutil.rmtree(self.profile, ignore_errors=True)


class Page:
    """One tab, driven with Runtime.evaluate."""

    def __init__(self, browser: Browser):
        self.browser = browser
        self.session = self.ws = None
        self.ids = 0

    async def open(self, url: str) -> None:
        self.session = aiohttp.ClientSession()
        base = f"http://127.0.0.1:{self.browser.port}"
        async with self.session.put(f"{base}/json/new?{url}") as answer:
            target = await answer.json(content_type=None)
        self.ws = await self.session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0)
        await self.call("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1,
                        mobile=False)

    async def call(self, method: str, **params):
        self.ids += 1
        await self.ws.send_str(json.dumps({"id": self.ids, "method": method, "params": params}))
        while True:
            msg = json.loads((await self.ws.receive()).data)
            if msg.get("id") == self.ids:
                if "error" in msg:
                    raise AssertionError(f"DevTools {method} failed: {msg['error']}")
                return msg["result"]

    async def evaluate(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 30.0, what: str = ""):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if loop.time() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting in the page for {what or expression}")
            await asyncio.sleep(0.1)

    async def screenshot(self, path: str) -> None:
        import base64
        data = await self.call("Page.captureScreenshot", format="png")
        with open(path, "wb") as f:
            f.write(base64.b64decode(data["data"]))

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.session is not None:
            await self.session.close()
