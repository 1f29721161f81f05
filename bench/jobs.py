"""Functions the benchmarks send to workers.

They live in an importable module (``bench.jobs``) so that every system's
workers load them by reference: cw's client sends its ``sys.path`` along, the
pools inherit or pass it.
"""
from __future__ import annotations

import time


def noop(*args):
    """Does nothing; returns None."""
    return None


def nbytes(data):
    """Returns the length of its argument (B3: a big argument)."""
    return len(data)


def make_bytes(n):
    """Returns ``n`` bytes (B3: a big result)."""
    return b"x" * n


def burn(loops):
    """A pure-Python CPU-bound loop (B4)."""
    x = 0
    for i in range(loops):
        x += i * i
    return x


def sleep(seconds):
    time.sleep(seconds)


def run_chunk(fn, chunk):
    """Runs ``fn(*args)`` for each ``args`` of a chunk: chunked map for systems
    that have no ``chunksize`` of their own (Dask)."""
    return [fn(*args) for args in chunk]


def burn_timed(loops, count, conn):
    """Runs ``burn(loops)`` ``count`` times and sends the wall time over ``conn``
    (B4's bare-process reference: what the machine gives without any pool)."""
    t0 = time.perf_counter()
    for _ in range(count):
        burn(loops)
    conn.send(time.perf_counter() - t0)
    conn.close()
