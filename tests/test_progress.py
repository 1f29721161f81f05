"""cw.client.progress: the plain display with an injected clock, thread safety, and
progress()/track() over real futures, generators and a real cluster."""
from __future__ import annotations

import concurrent.futures
import importlib.util
import io
import re
import sys
import threading

import pytest

import cw.client.progress as progress_module
from cw.client.progress import FILE_INTERVAL, TERMINAL_INTERVAL, Progress, progress, track

HAS_TQDM = importlib.util.find_spec("tqdm") is not None
WAIT = 30  # seconds; only reached if something hangs


class Clock:
    """A clock the test moves by hand."""

    def __init__(self):
        self.now = 0.0
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def plain(monkeypatch):
    """progress() and track() draw plain lines even where tqdm is installed."""
    monkeypatch.setattr(progress_module, "_load_tqdm", lambda: None)


def lines(buf: io.StringIO) -> list[str]:
    return buf.getvalue().splitlines()


def test_plain_lines_show_count_percent_rate_and_time_left():
    clock, buf = Clock(), io.StringIO()
    with Progress(total=1000, file=buf, force=True, interval=1.0, use_tqdm=False, clock=clock) as shown:
        clock.now = 0.5
        shown.update(100)
        assert buf.getvalue() == ""  # within the interval
        clock.now = 1.0
        shown.update(20)
        assert lines(buf) == ["cw: 120/1000 done (12%), 120/s, about 7 s left"]
        clock.now = 4.0
        shown.update(880)
    assert lines(buf)[-1] == "cw: 1000/1000 done (100%), 250/s, in 4 s"
    assert len(lines(buf)) == 3


def test_plain_lines_without_total_and_long_durations():
    clock, buf = Clock(), io.StringIO()
    shown = Progress(desc="jobs", file=buf, force=True, interval=1.0, use_tqdm=False, clock=clock)
    clock.now = 4.0
    shown.update(141)
    assert lines(buf) == ["jobs: 141 done, 35.2/s"]
    assert Progress(total=10_000, clock=clock).line(100.0) == "cw: 0/10000 done (0%), 0.0/s"
    slow = Progress(total=10_000, clock=clock)
    slow.update(100)
    assert slow.line(clock.now + 100) == "cw: 100/10000 done (1%), 1.0/s, about 2.8 h left"
    assert slow.line(clock.now + 10) == "cw: 100/10000 done (1%), 10.0/s, about 16 min left"
    assert slow.line(clock.now + 1000) == "cw: 100/10000 done (1%), 0.1/s, about 27.5 h left"
    assert slow.line(clock.now, final=True) == "cw: 100/10000 done (1%), in 0 s"  # no time, no rate


def test_interval_is_honoured():
    clock, buf = Clock(), io.StringIO()
    shown = Progress(total=100, file=buf, force=True, interval=5.0, use_tqdm=False, clock=clock)
    for step in range(100):
        clock.now = step * 0.5  # one line per 10 updates, at t = 5, 10, ... 45
        shown.update()
    assert len(lines(buf)) == 9
    assert lines(buf)[0].startswith("cw: 11/100 done (11%)")
    shown.close()
    shown.close()  # a second close writes nothing more
    assert len(lines(buf)) == 10
    assert lines(buf)[-1].startswith("cw: 100/100 done (100%)")


def test_default_intervals_depend_on_the_file():
    assert Progress(file=Terminal(), use_tqdm=False).interval == TERMINAL_INTERVAL
    assert Progress(file=io.StringIO(), force=True, use_tqdm=False).interval == FILE_INTERVAL
    assert TERMINAL_INTERVAL < FILE_INTERVAL


def test_a_terminal_is_shown_without_force():
    clock, buf = Clock(), Terminal()
    with Progress(total=2, file=buf, use_tqdm=False, clock=clock) as shown:
        shown.update(2)
    assert lines(buf) == ["cw: 2/2 done (100%), in 0 s"]


def test_nothing_is_written_when_not_a_terminal_and_costs_no_clock_reads():
    clock, buf = Clock(), io.StringIO()
    with Progress(total=10, file=buf, interval=0.0, clock=clock) as shown:
        for _ in range(1000):
            clock.now += 1
            shown.update()
    assert buf.getvalue() == ""
    assert shown.count == 1000
    assert clock.calls == 1  # the start only: a hidden display never reads the clock again


def test_a_closed_or_missing_isatty_counts_as_not_a_terminal():
    closed = io.StringIO()
    closed.close()
    assert not Progress(file=closed).shown
    assert not Progress(file=object()).shown


def test_updates_from_many_threads_are_all_counted():
    buf = io.StringIO()
    threads, per_thread = 16, 5000
    shown = Progress(total=threads * per_thread, file=buf, force=True, interval=0.0, use_tqdm=False)
    start = threading.Barrier(threads)

    def work():
        start.wait(WAIT)
        for _ in range(per_thread):
            shown.update()

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(WAIT)
        assert not t.is_alive()
    shown.close()
    assert shown.count == threads * per_thread
    assert lines(buf)[-1].startswith(f"cw: {threads * per_thread}/{threads * per_thread} done (100%)")
    # Lines are written whole, under the lock: none is torn by another thread.
    assert all(re.fullmatch(r"cw: \d+/80000 done \(\d+%\).*", line) for line in lines(buf))


def test_progress_yields_each_future_once_in_the_order_they_complete(plain):
    n = 8
    gates = [threading.Event() for _ in range(n)]
    order = [3, 0, 7, 1, 6, 2, 5, 4]
    buf = io.StringIO()
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(gate.wait, WAIT) for gate in gates]
        done = progress(futures + futures[:2], force=True, file=buf)  # duplicates are yielded once
        for i in order:
            gates[i].set()  # only this future can complete, so it must come next
            assert next(done) is futures[i]
        assert list(done) == []
    assert lines(buf)[-1].startswith(f"cw: {n}/{n} done (100%)")


def test_progress_takes_a_generator_and_an_explicit_total(plain):
    buf = io.StringIO()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        yielded = list(progress((pool.submit(pow, 2, i) for i in range(5)), total=10, desc="pow", force=True, file=buf))
    assert sorted(f.result() for f in yielded) == [1, 2, 4, 8, 16]
    assert lines(buf)[-1].startswith("pow: 5/10 done (50%)")


def test_track_uses_len_and_yields_every_item(plain):
    buf = io.StringIO()
    assert list(track(["a", "b", "c"], force=True, file=buf)) == ["a", "b", "c"]
    assert re.fullmatch(r"cw: 3/3 done \(100%\)(, [\d.]+/s)?, in \d+ s", lines(buf)[-1])


def test_track_is_silent_when_not_shown(plain):
    buf = io.StringIO()
    assert list(track(range(5), file=buf)) == [0, 1, 2, 3, 4]
    assert buf.getvalue() == ""


def test_track_closes_the_display_when_the_generator_raises(plain):
    def items():
        yield 1
        yield 2
        raise ValueError("boom")

    buf = io.StringIO()
    got = []
    with pytest.raises(ValueError, match="boom"):
        for item in track(items(), force=True, file=buf):
            got.append(item)
    assert got == [1, 2]
    assert re.fullmatch(r"cw: 2 done(, [\d.]+/s)?, in \d+ s", lines(buf)[-1])


def test_track_closes_the_display_and_the_iterable_when_closed_early(plain):
    finished = []

    def items():
        try:
            yield from range(100)
        finally:
            finished.append(True)

    buf = io.StringIO()
    tracked = track(items(), force=True, file=buf)
    for item in tracked:
        if item == 2:
            break
    assert buf.getvalue() == ""  # still open: the caller may go on
    tracked.close()
    assert finished == [True]
    assert re.fullmatch(r"cw: 3 done(, [\d.]+/s)?, in \d+ s", lines(buf)[-1])
    assert len(lines(buf)) == 1


def test_use_tqdm_true_without_tqdm_says_how_to_get_it(monkeypatch):
    # tqdm made unimportable (a None entry in sys.modules makes `import` fail).
    monkeypatch.setitem(sys.modules, "tqdm", None)
    progress_module._load_tqdm.cache_clear()
    try:
        with pytest.raises(ImportError, match="pip install tqdm"):
            Progress(use_tqdm=True)
    finally:
        progress_module._load_tqdm.cache_clear()


@pytest.mark.skipif(not HAS_TQDM, reason="tqdm is not installed (optional); the plain display is tested above")
def test_tqdm_draws_the_bar():
    buf = io.StringIO()
    with Progress(total=3, desc="jobs", file=buf, force=True, use_tqdm=True) as shown:
        shown.update(3)
    assert shown._bar is not None
    assert "jobs" in buf.getvalue() and "3/3" in buf.getvalue()
    hidden = io.StringIO()
    with Progress(total=3, file=hidden, use_tqdm=True) as shown:
        shown.update(3)
    assert hidden.getvalue() == ""


def test_progress_over_a_real_cluster(plain, executor):
    buf = io.StringIO()
    done = list(progress([executor.submit(pow, 2, i) for i in range(50)], force=True, file=buf))
    assert len(done) == 50 and all(f.done() for f in done)
    assert sorted(f.result() for f in done) == [2 ** i for i in range(50)]
    assert lines(buf)[-1].startswith("cw: 50/50 done (100%)")
