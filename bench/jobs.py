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


#: The environment variables that size BLAS and OpenMP thread pools at load time.
BLAS_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                         "BLIS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


def one_blas_thread():
    """Worker initializer of B10's by-hand reference: one BLAS / OpenMP thread,
    through the environment (libraries loaded later) and threadpoolctl (libraries
    already loaded, e.g. inherited through fork)."""
    import os
    for name in BLAS_THREAD_VARIABLES:
        os.environ[name] = "1"
    try:
        import threadpoolctl
    except ImportError:
        return
    threadpoolctl.threadpool_limits(1)


def blas_threads():
    """The largest BLAS / OpenMP thread pool loaded in this process, or None
    when threadpoolctl is not importable."""
    try:
        import threadpoolctl
    except ImportError:
        return None
    return max((pool["num_threads"] for pool in threadpoolctl.threadpool_info()), default=0)


def slice_sum(array, i, n):
    """The sum of the ``i``-th of ``n`` slices of an array (B8: a shared input)."""
    size = len(array) // n
    return float(array[i * size:(i + 1) * size].sum())


def add(a, b):
    """B9's reduction tree."""
    return a + b


def one():
    return 1
