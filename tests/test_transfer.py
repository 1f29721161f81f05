"""Big arguments and results: out-of-band buffers, the receive-buffer pool,
and the master handing a big payload on without copying it.

The end-to-end tests measure peak memory (VmHWM) of the process that would
hold an extra copy without the feature: a 200 MB copy cannot hide in the noise.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
import time

import jobs
import numpy as np
import pytest

from bench.procinfo import hwm_kib, reset_hwm
from cw.errors import CallUnpicklingError
from cw.wire import frames, payload
from cw.wire.buffers import BufferPool
from cw.wire.decoder import FrameDecoder
from cw.wire.frames import Frame, Status

MB = 1_000_000
BIG = payload.OUT_OF_BAND_MIN


# --- payloads ------------------------------------------------------------------

def test_a_big_bytes_argument_travels_out_of_band_and_comes_back_equal():
    data = os.urandom(BIG + 1)
    chunks = payload.dumps_call(len, (b"small", data), {"key": data})
    assert type(chunks) is tuple and len(chunks) == 3
    # The pickle holds no copy of the data: the bytes object itself is sent.
    assert len(chunks[0]) < 1000 and chunks[1].obj is data and chunks[2].obj is data
    func, args, kwargs = payload.loads(payload.joined(chunks))
    assert func is len and args == (b"small", data) and kwargs == {"key": data}
    assert type(args[1]) is bytes and type(kwargs["key"]) is bytes


def test_small_payloads_stay_one_plain_pickle():
    small = payload.dumps_call(len, (b"x" * (BIG - 1),), {})
    assert type(small) is bytes and small[0] == pickle.PROTO[0]
    assert payload.loads(small)[1] == (b"x" * (BIG - 1),)


def test_small_and_big_arrays_together_are_pickled_once_by_the_standard_pickler(monkeypatch):
    # A job's small numpy result is the common case: each buffer is kept in the
    # pickle or sent out of band as the standard pickler meets it, never pickled
    # again (by cloudpickle, several times slower) once one proves small.
    def no_cloudpickle(*args, **kwargs):
        raise AssertionError("cloudpickle.dumps called for plain data")

    monkeypatch.setattr(payload.cloudpickle, "dumps", no_cloudpickle)
    small, big = np.zeros(10), np.arange(BIG, dtype=np.uint8)
    assert type(payload.dumps(small)) is bytes                       # in the pickle
    chunks = payload.dumps({"small": small, "big": big, "strided": big[::2]})
    assert type(chunks) is tuple and len(chunks) == 2 and chunks[1].nbytes == big.nbytes
    back = payload.loads(bytearray(payload.joined(chunks)))
    assert np.array_equal(back["small"], small) and np.array_equal(back["big"], big)
    assert np.array_equal(back["strided"], big[::2])                  # not contiguous: in the pickle


def test_a_numpy_array_is_received_without_a_copy():
    arr = np.arange(BIG, dtype=np.int64)
    chunks = payload.dumps(arr)
    assert type(chunks) is tuple and chunks[1].nbytes == arr.nbytes
    received = bytearray(payload.joined(chunks))
    back = payload.loads(received)
    assert np.array_equal(back, arr)
    # A view of the received frame, not a copy of it.
    assert np.shares_memory(back, np.frombuffer(received, dtype=np.uint8))


def test_a_non_contiguous_array_goes_in_band():
    arr = np.arange(4 * BIG, dtype=np.int64)[::2]
    data = payload.dumps(arr)
    assert type(data) is bytes
    assert np.array_equal(payload.loads(data), arr)


def test_a_result_of_big_bytes_goes_out_of_band():
    status, data = payload.run_payload(payload.joined(payload.dumps_call(jobs.identity, (b"r" * BIG,), {})))
    assert status == Status.OK and type(data) is tuple
    assert payload.load_outcome(status, payload.joined(data)) == (True, b"r" * BIG)


@pytest.mark.parametrize("damage", ["short", "lengths", "count"])
def test_a_damaged_out_of_band_payload_fails_its_job_clearly(damage):
    good = bytearray(payload.joined(payload.dumps_call(len, (b"x" * BIG,), {})))
    if damage == "short":
        bad = good[:7]
    elif damage == "lengths":
        bad = good[:-1]
    else:
        bad = good[:1] + (10 ** 6).to_bytes(4, "big") + good[5:]
    status, data = payload.run_payload(bad)
    assert status == Status.RAISED
    ok, exc = payload.load_outcome(status, data)
    assert not ok and isinstance(exc, CallUnpicklingError)
    assert "cannot unpickle the job" in str(exc)


# --- the buffer pool -------------------------------------------------------------

def test_the_pool_reuses_a_buffer_once_nothing_views_it():
    pool = BufferPool(keep=10 * MB)
    first = pool.get(MB)
    underlying = id(first.obj)   # (not the object: a reference would keep it in use)
    again = pool.get(MB)
    assert id(again.obj) != underlying          # in use: not handed out twice
    del first
    third = pool.get(MB - 10)
    assert id(third.obj) == underlying and len(third) == MB - 10


def test_the_pool_keeps_a_buffer_viewed_by_an_unpickled_array():
    pool = BufferPool(keep=10 * MB)
    body = pool.get(MB)
    underlying = id(body.obj)
    arr = np.frombuffer(body, dtype=np.uint8)   # as an array unpickled from an out-of-band buffer
    del body
    assert id(pool.get(MB).obj) != underlying    # the array still views it
    del arr
    assert id(pool.get(MB).obj) == underlying


def test_the_pool_does_not_tie_up_a_big_buffer_for_a_small_frame():
    pool = BufferPool(keep=100 * MB)
    big = pool.get(10 * MB)
    underlying = id(big.obj)
    del big
    assert id(pool.get(MB).obj) != underlying
    assert id(pool.get(6 * MB).obj) == underlying


def test_the_pool_gives_back_idle_buffers_and_keeps_at_most_keep_bytes():
    pool = BufferPool(keep=3 * MB, idle=0.2)
    views = [pool.get(MB) for _ in range(5)]       # more than keep: the extra ones are not kept
    del views
    assert pool.free_bytes == 3 * MB
    time.sleep(0.3)
    pool.release_idle()
    assert pool.free_bytes == 0


def test_the_decoder_receives_large_frames_into_reused_buffers():
    pool = BufferPool()
    decoder = FrameDecoder(allocate=pool.get)
    body = b"y" * (2 * frames.LARGE_FRAME)
    frame = frames.frame(Frame.PING, body)
    underlying = []
    for _ in range(3):
        decoder.feed(frame[:1000])
        view = decoder.direct_buffer()
        view[:] = frame[1000:1000 + len(view)]
        decoder.direct_filled(len(view))
        ftype, got = decoder.next_frame()
        assert ftype == Frame.PING and got == body
        underlying.append(id(got.obj))
        del got, view
    assert underlying[0] == underlying[1] == underlying[2]


# --- end to end --------------------------------------------------------------------

def test_big_arguments_and_results_arrive_intact_in_order_with_small_jobs(executor):
    data = os.urandom(30 * MB)
    arr = np.random.default_rng(1).random(2 * MB)
    futures = []
    for _ in range(3):
        futures.append(executor.submit(jobs.identity, data))
        futures += [executor.submit(jobs.square, j) for j in range(20)]
        futures.append(executor.submit(jobs.identity, arr))
        futures.append(executor.submit(jobs.identity, [data[:MB], data[MB:2 * MB]]))  # in the pickle
    for future in futures:
        value = future.result(timeout=120)
        if isinstance(value, bytes):
            assert value == data
        elif isinstance(value, np.ndarray):
            assert np.array_equal(value, arr)
        elif isinstance(value, list):
            assert value == [data[:MB], data[MB:2 * MB]]
    assert [f.result() for f in futures if isinstance(f.result(), int)] == [j * j for j in range(20)] * 3


def test_the_master_holds_one_copy_of_a_payload_in_transit(master_on_each_loop):
    """Handed to asyncio whole, what the socket did not take at once would be
    copied into the transport's buffer: a second copy of the payload."""
    master = master_on_each_loop
    if not reset_hwm(master.master.pid):
        pytest.skip("this kernel does not reset VmHWM (clear_refs)")
    master.add_workers(1)
    master.wait_for_workers(1)
    size = 200 * MB
    with master.executor() as ex:
        assert ex.submit(jobs.identity, 1).result(timeout=60) == 1
        reset_hwm(master.master.pid)
        before = hwm_kib(master.master.pid)
        assert ex.submit(len, b"\0" * size).result(timeout=120) == size
        grown = hwm_kib(master.master.pid) - before
    assert grown < 1.3 * size / 1024, f"the master's peak grew by {grown / 1024:.0f} MiB for {size // MB} MB"


CLIENT = textwrap.dedent('''
    import sys
    from cw import ClusterExecutor
    size = int(sys.argv[2])
    data = b"\\0" * size
    def peak():
        return int([l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1])
    with ClusterExecutor(sys.argv[1]) as ex:
        assert ex.submit(len, b"x").result(timeout=60) == 1
        before = peak()
        assert ex.submit(len, data).result(timeout=120) == size
        print(peak() - before)
''')


def test_a_client_sends_a_big_bytes_argument_without_copying_it(cluster):
    size = 200 * MB
    out = subprocess.run([sys.executable, "-c", CLIENT, cluster.address, str(size)],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    grown = int(out.stdout)
    assert grown < 0.5 * size / 1024, f"the client's peak grew by {grown / 1024:.0f} MiB sending {size // MB} MB"


def test_a_worker_sends_a_big_bytes_result_without_copying_it(master):
    master.add_workers(1)
    master.wait_for_workers(1)
    size = 200 * MB
    with master.executor() as ex:
        before = ex.submit(hwm_kib).result(timeout=60)
        assert len(ex.submit(jobs.filled, size).result(timeout=120)) == size
        grown = ex.submit(hwm_kib).result(timeout=60) - before
    # The result itself is 200 MB; pickling it into a frame would add another 200.
    assert grown < 1.4 * size / 1024, f"the worker's peak grew by {grown / 1024:.0f} MiB for a {size // MB} MB result"


def test_an_array_changed_right_after_submit_travels_as_it_was(executor):
    """Its data is sent as it is, not copied: submit must not return before
    it has been sent, or the change would travel instead."""
    arr = np.zeros(2 * MB, dtype=np.int64)
    futures = []
    for i in range(20):
        arr[:] = i
        futures += [executor.submit(jobs.identity, j) for j in range(300)]  # the writer thread is busy
        futures.append(executor.submit(np.unique, arr))
    futures = futures[300::301]
    arr[:] = -1
    assert [list(f.result(timeout=120)) for f in futures] == [[i] for i in range(20)]


def test_an_array_a_job_returns_travels_as_it_was_when_the_job_ended(master):
    """The worker sends a returned array's data as it is, not copied: the next
    job must not start before it has left, or that job's changes to the array
    would travel instead.  The job's output goes first, so that the outcome
    comes in a burst and is queued for the writer thread rather than sent at once."""
    master.add_workers(1)
    master.wait_for_workers(1)
    with master.executor() as ex:
        ex.submit(jobs.kept_array, 64).result(timeout=60)
        for value in range(1, 21):    # the race shows in about half of the rounds without the wait
            returned = ex.submit(jobs.kept_array, 64, "output first")
            changed = ex.submit(jobs.fill_kept_array, value)     # held by the worker, runs right after
            got = returned.result(timeout=120)
            changed.result(timeout=120)
            assert got.min() == got.max() == value - 1
