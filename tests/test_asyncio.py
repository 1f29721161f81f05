"""cw from asyncio programs: ``await future``, ``submit_async``, ``async with``,
and cancellation of the awaiting task.  Jobs are lambdas and closures."""
from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import time

import pytest
from conftest import wait_until

from cw.client import ClusterExecutor


def test_await_a_future_gives_its_result_or_its_exception(cluster):
    async def main():
        async with ClusterExecutor(cluster.host, cluster.port) as ex:
            base = 40
            assert await ex.submit(lambda x: x + base, 2) == 42
            with pytest.raises(ZeroDivisionError):
                await ex.submit(lambda: 1 / 0)
    asyncio.run(main())


def test_gather_over_ten_thousand_futures_needs_no_thread_per_await(cluster):
    async def main(ex):
        futures = [ex.submit(lambda i=i: i * 2) for i in range(10_000)]
        threads = []

        async def watch():
            while True:
                threads.append(threading.active_count())
                await asyncio.sleep(0.05)
        watcher = asyncio.create_task(watch())
        results = await asyncio.gather(*futures)
        watcher.cancel()
        return results, threads

    with ClusterExecutor(cluster.host, cluster.port) as ex:
        before = threading.active_count()
        results, threads = asyncio.run(main(ex))
    assert results == [i * 2 for i in range(10_000)]
    assert max(threads) <= before + 2          # (asyncio's own, at most): not one per awaited future


def test_cancelling_the_awaiting_task_cancels_the_running_job(cluster, tmp_path):
    started = tmp_path / "started"

    def long_job():
        started.write_text(str(os.getpid()))
        time.sleep(60)

    async def main(ex):
        future = ex.submit(long_job)
        task = asyncio.create_task(_await(future))
        await asyncio.to_thread(wait_until, started.exists, what="the job to start")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return future

    async def _await(future):
        return await future

    with ClusterExecutor(cluster.host, cluster.port) as ex:
        future = asyncio.run(main(ex))
        assert future.cancelled()
        # The running job was aborted: its worker process was replaced, and the cluster runs jobs again.
        pid = int(started.read_text())
        wait_until(lambda: pid not in {w.pid for w in ex.workers()}, what="the aborted job's worker to go")
        assert ex.submit(lambda: 7).result(timeout=60) == 7


def test_submit_async_keeps_the_order_and_returns_futures(cluster):
    async def main():
        async with ClusterExecutor(cluster.host, cluster.port) as ex:
            futures = [await ex.submit_async(lambda i=i: (i, time.monotonic_ns()), i) for i in range(50)]
            assert [f.jobid for f in futures] == sorted(f.jobid for f in futures)
            return [r[0] for r in await asyncio.gather(*futures)]
    assert asyncio.run(main()) == list(range(50))


def test_jobs_that_finished_together_wake_the_loop_once(cluster):
    # A busy loop (here: one that waited without awaiting) finds many jobs done:
    # they reach it in one wake-up, not a self-pipe write and a wake-up each.
    async def main(ex):
        loop = asyncio.get_running_loop()
        wakeups = []
        threadsafe = loop.call_soon_threadsafe

        def counted(*args, **kwargs):
            wakeups.append(args[0])
            return threadsafe(*args, **kwargs)

        loop.call_soon_threadsafe = counted
        futures = [ex.submit(lambda i=i: i, i) for i in range(1000)]
        concurrent.futures.wait(futures, timeout=120)
        results = await asyncio.gather(*futures)
        return results, len(wakeups)

    with ClusterExecutor(cluster.host, cluster.port) as ex:
        results, wakeups = asyncio.run(main(ex))
    assert results == list(range(1000))
    assert wakeups <= 2, wakeups
