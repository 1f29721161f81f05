"""Progress of many jobs: ``progress(futures)``, ``track(iterable)`` and ``Progress``.

A display is drawn only when its file (standard error by default) is a
terminal, or when the caller passes ``force=True``; otherwise ``update`` is a
counter behind a lock.  tqdm draws the bar when it is installed (it is
optional); without it one plain line is written at most once per interval, and
a last one when the display closes::

    cw: 120/1000 done (12%), 35.2/s, about 25 s left
    cw: 1000/1000 done (100%), 34.9/s, in 29 s
"""
from __future__ import annotations

import concurrent.futures
import functools
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO, TypeVar

T = TypeVar("T")

#: Seconds between plain lines on a terminal.
TERMINAL_INTERVAL = 1.0
#: Seconds between plain lines in a file or pipe (a log should not fill up with them).
FILE_INTERVAL = 10.0
DEFAULT_DESC = "cw"


@functools.cache
def _load_tqdm():
    """The tqdm class, or None; imported only when a display is drawn."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm


def _isatty(file) -> bool:
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed file
        return False


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class Progress:
    """A thread-safe count of finished items, shown as it grows.

    ``interval`` is the least number of seconds between two lines (plain
    display) or redraws (tqdm; its own default when None).  The plain default
    is ``TERMINAL_INTERVAL`` on a terminal, ``FILE_INTERVAL`` elsewhere.
    ``use_tqdm``: None uses tqdm when importable, False never, True requires
    it.  ``clock`` is for tests.
    """

    def __init__(self, total: int | None = None, desc: str = DEFAULT_DESC, file: IO[str] | None = None,
                 force: bool = False, interval: float | None = None, use_tqdm: bool | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.total = total
        self.desc = desc
        self.count = 0
        self.file = sys.stderr if file is None else file
        terminal = _isatty(self.file)
        self.shown = force or terminal
        self.interval = interval if interval is not None else TERMINAL_INTERVAL if terminal else FILE_INTERVAL
        self._clock = clock
        self._lock = threading.Lock()
        self._closed = False
        self._start = self._last = clock()
        self._bar = None
        if use_tqdm or (use_tqdm is None and self.shown):
            tqdm = _load_tqdm()
            if tqdm is None and use_tqdm:
                raise ImportError("use_tqdm=True but tqdm is not installed: `pip install tqdm`, "
                                  "or leave use_tqdm=None to fall back to plain lines")
            if tqdm is not None and self.shown:
                options = {} if interval is None else {"mininterval": interval}
                self._bar = tqdm(total=total, desc=desc, file=self.file, **options)

    def update(self, n: int = 1) -> None:
        """Counts ``n`` more items done; safe from any thread."""
        with self._lock:
            self.count += n
            if not self.shown or self._closed:
                return
            if self._bar is not None:
                self._bar.update(n)
                return
            now = self._clock()
            if now - self._last >= self.interval:
                self._last = now
                self._write(self.line(now))

    def close(self) -> None:
        """Writes the last line (or closes the bar); later calls do nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._bar is not None:
                self._bar.close()
            elif self.shown:
                self._write(self.line(self._clock(), final=True))

    def line(self, now: float, final: bool = False) -> str:
        """The plain line for time ``now``: the count, the rate, and the time left (or taken, when final)."""
        elapsed = now - self._start
        if self.total is None:
            parts = [f"{self.desc}: {self.count} done"]
        elif self.total > 0:  # floor: 100% only once everything is done
            parts = [f"{self.desc}: {self.count}/{self.total} done ({100 * self.count // self.total}%)"]
        else:
            parts = [f"{self.desc}: {self.count}/{self.total} done"]
        rate = self.count / elapsed if elapsed > 0 else None
        if rate is not None:
            parts.append(f"{rate:.1f}/s" if rate < 100 else f"{rate:.0f}/s")
        if final:
            parts.append(f"in {_duration(elapsed)}")
        elif rate and self.total is not None and self.count < self.total:
            parts.append(f"about {_duration((self.total - self.count) / rate)} left")
        return ", ".join(parts)

    def _write(self, text: str) -> None:
        self.file.write(text + "\n")
        self.file.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def track(iterable: Iterable[T], *, total: int | None = None, desc: str | None = None, force: bool = False,
          file: IO[str] | None = None) -> Iterator[T]:
    """Yields the items of ``iterable``, counting each on a display.

    ``total`` defaults to ``len(iterable)`` when it has one.  The display
    closes when the items run out, when the iterable raises, or when this
    generator is closed; closing it also closes the iterable's iterator (for
    ``executor.map``'s results, that cancels the calls not yet done).
    """
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            pass
    items = iter(iterable)
    with Progress(total=total, desc=desc or DEFAULT_DESC, file=file, force=force) as shown:
        try:
            for item in items:
                shown.update()
                yield item
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()


def progress(futures: Iterable[concurrent.futures.Future], *, desc: str | None = None, total: int | None = None,
             force: bool = False, file: IO[str] | None = None) -> Iterator[concurrent.futures.Future]:
    """Yields ``futures`` as they complete (as ``concurrent.futures.as_completed``
    does, each future once), counting each on a display.

    The futures are gathered at once, so a generator of ``submit`` calls
    works; ``total`` defaults to the number of distinct futures.
    """
    futures = set(futures)
    return track(concurrent.futures.as_completed(futures), total=len(futures) if total is None else total,
                 desc=desc, force=force, file=file)
