"""The dashboard's page in a real browser: Debian's headless Chromium,
driven over the DevTools protocol, against a real cluster while jobs run.
The page must list the workers, gain task-stream bars as jobs run, show a
failure with its traceback, and update without a reload (server-sent
events).  ``.ci/run`` installs Chromium; set CW_SCREENSHOT to a path to keep
the screenshot the test takes (the docs' picture comes from there)."""
from __future__ import annotations

import asyncio
import os
import shutil
import threading

import pytest

pytest.importorskip("aiohttp")
from tests.conftest import skip_unless_required  # noqa: E402
from tests.conftest import wait_until as wait_for  # noqa: E402
from tests.dashboard_process import DashboardProcess  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def square(x):
    print("square of", x)
    return x * x


def slow_square(x):
    import time
    time.sleep(0.05)
    return x * x


def fails():
    raise RuntimeError("a failure the page must show")


@pytest.fixture
def browser():
    if CHROMIUM is None:
        skip_unless_required("Chromium is not installed (apt-get install chromium)", "CW_REQUIRE_BROWSER")
    from tests.browser import Browser
    b = Browser(CHROMIUM)
    b.start()
    yield b
    b.stop()
    assert not os.path.exists(b.profile)


def count(selector: str) -> str:
    return f"document.querySelectorAll({selector!r}).length"


def test_the_page_shows_workers_bars_and_failures_and_updates_itself(cluster, tmp_path, browser):
    from tests.browser import Page
    dash = DashboardProcess(cluster.address, str(tmp_path / "jobs.sqlite"))
    try:
        wait_for(lambda: dash.get("/health")[1]["master"], what="the dashboard to reach the master")

        async def drive():
            page = Page(browser)
            await page.open(dash.url)
            try:
                assert await page.wait_for(count("tr.worker") + " == 2", what="two worker rows")
                assert await page.evaluate(count("rect.bar")) == 0
                first = int(await page.evaluate("document.getElementById('updates').textContent"))
                # Jobs run while the page is open: bars appear without a reload.
                done = threading.Event()
                threading.Thread(target=run_jobs, args=(cluster, done), daemon=True).start()
                await page.wait_for(count("rect.bar") + " >= 20", timeout=60, what="20 task-stream bars")
                await page.wait_for(count("rect.bar.failed") + " >= 1", timeout=60, what="a failed bar")
                await page.wait_for("document.getElementById('failures').textContent"
                                    ".includes('a failure the page must show')", what="the traceback")
                later = int(await page.evaluate("document.getElementById('updates').textContent"))
                assert later > first           # pushed, not reloaded: the page kept its counter
                assert await page.evaluate("performance.getEntriesByType('navigation').length") == 1
                # A job's output on click.
                await page.evaluate("document.querySelector('rect.bar[data-outcome=ok]')"
                                    ".dispatchEvent(new MouseEvent('click'))")
                await page.wait_for("!document.getElementById('detail').hidden && "
                                    "document.getElementById('detail-output').textContent.length > 0",
                                    what="the job detail")
                assert await asyncio.get_running_loop().run_in_executor(None, done.wait, 60), "jobs unfinished"
                await page.wait_for("document.getElementById('totals').textContent.includes('40 ok')",
                                    what="every job counted")
                await page.screenshot(os.environ.get("CW_SCREENSHOT") or str(tmp_path / "dashboard.png"))
            finally:
                await page.close()

        asyncio.run(drive())
    finally:
        dash.stop()


def run_jobs(cluster, done: threading.Event) -> None:
    with cluster.executor() as ex:
        futures = [ex.submit(square, i) for i in range(20)] + [ex.submit(fails)]
        futures += [ex.submit(slow_square, i) for i in range(20)]
        for f in futures:
            f.exception()
    done.set()
