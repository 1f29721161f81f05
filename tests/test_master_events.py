"""The master's job events (cw.master.events): what the dispatcher reports,
coalesced and bounded, and how subscribers that do not keep up are treated;
then a real master and workers feeding a real subscriber."""
from __future__ import annotations

import itertools
import json
import time

import pytest

from cw.master import events
from cw.master.dispatch import Dispatcher
from cw.wire import frames, payload
from cw.wire.decoder import FrameDecoder
from cw.wire.frames import Frame, Status
from tests.conftest import wait_until

C1, W1, W2 = 101, 1, 2


def square(x):
    return x * x


def fails():
    raise ValueError("boom in a job")


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        self.now += 1.0
        return self.now


def watched(max_pending=events.MAX_PENDING, slots=1):
    d = Dispatcher(slots=slots)
    d.events = feed = events.EventFeed(d.functions, Clock(), max_pending)
    d.add_client(C1, {"host": "c", "pid": 1})
    return d, feed


def sent_gids(d, wid):
    dec = FrameDecoder()
    gids = []
    for peer, f in d.outbox:
        dec.feed(b"".join(f) if isinstance(f, tuple) else f)
        ftype, body = dec.next_frame()
        if peer == wid and ftype == Frame.JOB:
            gids.append(frames.decode_job(body).gid)
    d.outbox.clear()
    return gids


def test_a_job_that_starts_and_ends_between_two_frames_is_one_event():
    d, feed = watched()
    d.add_worker(W1, {"host": "h", "pid": 5})
    d.submit(C1, 7, 0, 0.0, payload.dumps_call(square, (3,), {}))
    (gid,) = sent_gids(d, W1)
    d.output(W1, gid, b"printed\n")
    d.outcome(W1, gid, Status.OK, b"result")
    evs, dropped = feed.take()
    assert dropped == 0
    assert [dict(zip(events.FIELDS, e, strict=True)) for e in evs] == [{
        "job": 7, "client": C1, "worker": W1, "function": f"{__name__}.square", "start": 1001.0, "end": 1002.0,
        "outcome": "ok", "traceback": None, "output": "printed\n"}]
    assert feed.counts == {"ok": 1}


def test_start_and_end_in_different_frames_are_two_events_with_the_same_start():
    d, feed = watched()
    d.add_worker(W1, {"host": "h", "pid": 5})
    d.submit(C1, 1, 0, 0.0, payload.dumps_call(square, (3,), {}))
    (gid,) = sent_gids(d, W1)
    (started,), _ = feed.take()
    assert started[4:7] == [1001.0, None, None]
    try:
        fails()
    except ValueError as exc:
        status, body = payload.error_outcome(exc)
    d.outcome(W1, gid, status, payload.joined(body))
    (ended,), _ = feed.take()
    assert ended[4:7] == [1001.0, 1002.0, "raised"]
    assert ended[7].startswith("Traceback (most recent call last)") and "boom in a job" in ended[7]


def test_a_job_sent_ahead_starts_when_the_one_before_it_ends():
    d, feed = watched(slots=2)
    d.add_worker(W1, {"host": "h", "pid": 5})
    d.submit(C1, 1, 0, 0.0, b"p1")
    d.submit(C1, 2, 0, 0.0, b"p2")
    first, second = sent_gids(d, W1)
    assert [e[0] for e in feed.take()[0]] == [1]        # the second waits behind the first: not started
    d.outcome(W1, first, Status.OK, b"")
    evs = {e[0]: e for e in feed.take()[0]}
    assert evs[1][6] == "ok" and evs[2][4] >= evs[1][5] and evs[2][5] is None


def test_a_started_job_given_back_and_run_elsewhere_is_reported_once_where_it_ran():
    d, feed = watched(slots=2)
    d.add_worker(W1, {"host": "h", "pid": 5})
    d.submit(C1, 1, 0, 0.0, b"p1")
    d.submit(C1, 2, 0, 0.0, b"p2")
    first, second = sent_gids(d, W1)
    feed.take()
    d.outcome(W1, first, Status.OK, b"")       # job 2 starts on W1, as far as the master knows...
    d.revoked(W1, second, True)                # ...but W1 gives it back: it had not started it
    d.add_worker(W2, {"host": "h", "pid": 6})
    (gid,) = [j.gid for j in d.workers[W2].jobs] or [j.gid for j in d.workers[W1].jobs]
    wid = W2 if d.workers[W2].jobs else W1
    d.outcome(wid, gid, Status.OK, b"")        # its client has its result: the job's payload is gone
    evs, _ = feed.take()
    assert sorted((e[0], e[2], e[6]) for e in evs) == [(1, W1, "ok"), (2, wid, "ok")]


def test_events_beyond_the_bound_are_dropped_with_a_count_and_counts_stay_exact():
    d, feed = watched(max_pending=3)
    for wid in range(1, 6):
        d.add_worker(wid, {"host": "h", "pid": wid})
    for jobid in range(5):
        d.submit(C1, jobid, 0, 0.0, b"p")
    gids = {wid: [j.gid for j in d.workers[wid].jobs] for wid in range(1, 6)}
    for wid, (gid,) in gids.items():
        d.outcome(wid, gid, Status.OK, b"")
    evs, dropped = feed.take()
    assert len(evs) == 3 and dropped == 2
    assert feed.counts == {"ok": 5}
    assert feed.take() == ([], 0)


def test_a_lost_worker_ends_its_job_as_lost_and_a_cancelled_one_as_cancelled():
    d, feed = watched()
    d.add_worker(W1, {"host": "h", "pid": 5})
    d.add_worker(W2, {"host": "h", "pid": 6})
    d.submit(C1, 1, 0, 0.0, b"p")
    d.submit(C1, 2, 0, 0.0, b"p")
    d.outbox.clear()
    d.remove_worker(W1)
    d.cancel(C1, 2)
    (gid,) = [j.gid for j in d.workers[W2].jobs]
    d.outcome(W2, gid, Status.OK, b"")
    outcomes = sorted(e[6] for e in feed.take()[0])
    assert outcomes == ["cancelled", "lost"]


def test_an_unwatched_dispatcher_has_no_feed():
    d = Dispatcher()
    assert d.events is None


@pytest.mark.parametrize("make", [
    lambda: payload.dumps_call(square, (2,), {}),
    lambda: payload.dumps_batch(square, [(1,), (2,)]),
])
def test_function_names_are_read_from_a_pickle_without_unpickling(make):
    assert events.function_name(payload.joined(make())) == f"{__name__}.square"


def test_a_function_sent_by_value_is_named_by_its_qualname():
    data = payload.pickle_by_value(lambda: 1)
    assert events.function_name(data, limit=1 << 16).endswith(".<locals>.<lambda>")
    assert events.function_name(b"\x80\x05garbage\x8c") is None
    assert events.traceback_text(b"no traceback here") is None


# --- subscribers -------------------------------------------------------------------

class FakeTransport:
    def __init__(self):
        self.buffered = 0

    def is_closing(self):
        return False

    def get_write_buffer_size(self):
        return self.buffered


class FakePeer:
    def __init__(self):
        self.transport = FakeTransport()
        self.reading_paused = False
        self.frames = []

    def write(self, chunks):
        dec = FrameDecoder()
        dec.feed(b"".join(chunks))
        ftype, body = dec.next_frame()
        assert ftype == Frame.EVENTS
        self.frames.append(json.loads(body))


class FakeLoop:
    def create_task(self, coro):
        coro.close()
        return self


def test_a_slow_subscriber_gets_nothing_until_it_catches_up_then_the_count_of_what_it_missed(monkeypatch):
    monkeypatch.setattr(events.asyncio, "get_running_loop", FakeLoop)
    FakeLoop.cancel = lambda self: None
    d = Dispatcher(slots=1)
    w = events.Watchers(d, clock=itertools.count(1).__next__)
    fast, slow = FakePeer(), FakePeer()
    w.subscribe(fast)
    w.subscribe(slow)
    assert d.events is w.feed
    d.add_client(C1, {})
    d.add_worker(W1, {"host": "h", "pid": 5})
    slow.reading_paused = True                 # the master stopped writing to it (flow control)
    d.submit(C1, 1, 0, 0.0, b"p")
    w.send()
    assert len(fast.frames) == 1 and fast.frames[0]["missed"] == 0 and slow.frames == []
    slow.reading_paused = False
    d.submit(C1, 2, 0, 0.0, b"p")              # queued behind job 1: nothing new to say yet
    (gid,) = [j.gid for j in d.workers[W1].jobs]
    d.outcome(W1, gid, Status.OK, b"")
    w.send()
    assert slow.frames[0]["missed"] == 1 and fast.frames[1]["missed"] == 0
    assert slow.frames[0]["counts"] == {"ok": 1}
    w.unsubscribe(fast)
    w.unsubscribe(slow)
    assert d.events is None and w.task is None


# --- a real master --------------------------------------------------------------------

def test_a_subscriber_of_a_real_master_sees_each_job_start_and_end(cluster):
    from cw.wire.auth import load_secret
    from cw.wire.link import open_link, peer_info
    link = open_link(cluster.host, cluster.port, load_secret(), peer_info("client"))
    try:
        link.send(frames.SUBSCRIBE_FRAME)
        seen: dict = {}
        counts: dict = {}
        with cluster.executor() as ex:
            futures = [ex.submit(square, i) for i in range(20)] + [ex.submit(fails)]
            deadline = time.monotonic() + 60
            while sum(counts.values()) < 21:
                assert time.monotonic() < deadline, f"events stopped coming: {counts}"
                ftype, body = link.recv(timeout=30)
                if ftype == Frame.PING:
                    link.send(frames.PONG_FRAME)
                elif ftype == Frame.EVENTS:
                    msg = frames.decode_json(body, "EVENTS")
                    counts = msg["counts"]
                    for e in msg["events"]:
                        seen.setdefault(e[0], {}).update({k: v for k, v in zip(msg["fields"], e, strict=True)
                                                          if v is not None})
            assert [f.result() for f in futures[:20]] == [i * i for i in range(20)]
        assert counts == {"ok": 20, "raised": 1}
        assert len(seen) == 21
        assert {e["function"] for e in seen.values()} == {f"{__name__}.square", f"{__name__}.fails"}
        failed = [e for e in seen.values() if e["outcome"] == "raised"]
        assert len(failed) == 1 and "boom in a job" in failed[0]["traceback"]
        assert all(e["start"] <= e["end"] for e in seen.values())
    finally:
        link.close()
    wait_until(lambda: "running" in (s := cluster_status(cluster)) and s["running"] == 0, what="idle cluster")


def prints(i):
    print("x" * 4000)
    return i


def test_a_subscriber_that_does_not_read_is_skipped_then_told_what_it_missed(cluster):
    """The master stops writing to a subscriber that does not read (flow
    control), keeps running jobs, and tells it how many events it missed
    once it reads again: events are dropped with a count, never queued."""
    import socket

    from cw.wire.auth import load_secret
    from cw.wire.link import open_link, peer_info
    link = open_link(cluster.host, cluster.port, load_secret(), peer_info("client"))
    try:
        link.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        link.send(frames.SUBSCRIBE_FRAME)
        n = 20_000
        with cluster.executor() as ex:     # ~4 KB of output an event: 2 MB a frame, beyond the master's 8 MB soon
            assert sorted(ex.map(prints, range(n), chunksize=1)) == list(range(n))
        # Reading again, it gets what was written before the master held back,
        # then a frame that says how many events it was not sent.
        missed, counts = 0, {}
        deadline = time.monotonic() + 120
        while not (missed and sum(counts.values()) == n):
            assert time.monotonic() < deadline, f"no word of missed events; counts {counts}"
            ftype, body = link.recv(timeout=60)
            if ftype == Frame.PING:
                link.send(frames.PONG_FRAME)
            elif ftype == Frame.EVENTS:
                msg = frames.decode_events(body)
                counts = msg["counts"]
                missed += msg["missed"]
        assert counts == {"ok": n} and missed > 0
    finally:
        link.close()


def cluster_status(cluster):
    with cluster.executor() as ex:
        return ex.status()


def test_while_the_events_are_full_a_start_is_timed_from_when_they_filled_if_it_runs_on():
    # Under load the feed records no start once this frame's events are full
    # (the master's cost of being watched); a job that started then and still
    # runs at the frame gets the time the events filled up.
    d = Dispatcher(slots=1)
    workers = d.workers
    d.events = feed = events.EventFeed(d.functions, Clock(), max_pending=1,
                                       running=lambda: ((j, w) for w in workers.values() for j in w.running()))
    d.add_client(C1, {"host": "c", "pid": 1})
    d.add_worker(W1, {"host": "h", "pid": 5})
    d.submit(C1, 1, 0, 0.0, b"p1")                  # starts at 1001 on W1...
    (first,) = sent_gids(d, W1)
    d.outcome(W1, first, Status.OK, b"")            # ...ends at 1002: the events are full (1003)
    d.submit(C1, 2, 0, 0.0, b"p2")                  # starts on W1 too, not timed
    (second,) = sent_gids(d, W1)
    assert not feed.fresh
    assert [e[0] for e in feed.take()[0]] == [1]
    d.outcome(W1, second, Status.OK, b"")
    (ended,), _ = feed.take()
    assert ended[0] == 2 and 1002.0 < ended[4] < ended[5]   # from when the events filled (after job 1's end)
