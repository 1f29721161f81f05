"""Unit tests of the master's kept values (cw.master.kept) through the
dispatcher and its inbox, with plain calls and no sockets: jobs held for the
outcomes they take, MISSING for an outcome the master no longer has,
failures and cancellations passed on, pins and releases, the bound."""
from __future__ import annotations

from cw.master import inbox
from cw.master.dispatch import Dispatcher
from cw.wire import frames
from cw.wire import kept as wire
from cw.wire.decoder import FrameDecoder
from cw.wire.frames import Frame, Status

C1 = 101
W1 = 1


def sent(d) -> list[tuple[int, int, bytes]]:
    """Empties the outbox: [(peer, frame type, body)]."""
    out = []
    for peer, frame in d.outbox:
        dec = FrameDecoder()
        dec.feed(b"".join(bytes(c) for c in frame) if isinstance(frame, tuple) else frame)
        ftype, body = dec.next_frame()
        out.append((peer, ftype, bytes(body)))
    d.outbox.clear()
    return out


def kinds(out) -> list:
    return [Frame(t).name for _, t, _ in out]


def setup(limit: int = 1 << 30) -> Dispatcher:
    d = Dispatcher(kept_bytes=limit)
    d.add_client(C1, {"host": "c", "pid": 1})
    d.add_worker(W1, {"host": "h", "pid": 2})
    sent(d)
    return d


def body(frame) -> bytes:
    """An encoded frame's body (its header cut off)."""
    data = b"".join(bytes(c) for c in frame) if isinstance(frame, tuple) else bytes(frame)
    return data[frames.HEADER_SIZE:]


def submit(d, jobid: int, deps=(), payload=b"call") -> None:
    if deps:
        inbox.client_frame(d, C1, Frame.DEPS, body(wire.encode_deps(jobid, deps)))
    inbox.client_frame(d, C1, Frame.SUBMIT, body(frames.encode_submit(jobid, 255, 0.0, payload)))


def put(d, key: int, data: bytes, status=Status.OK) -> None:
    inbox.client_frame(d, C1, Frame.PUT, body(wire.encode_put(key, status, False, data)))


def finish(d, status=Status.OK, payload=b"value") -> None:
    gid = d.workers[W1].jobs[0].gid
    d.outcome(W1, gid, status, payload)


def test_a_job_waits_for_the_outcome_it_takes_then_runs_with_it_pushed_along():
    d = setup()
    submit(d, 1)
    submit(d, 2, [(77, 1)])
    assert d.kept.report()["waiting"] == [{"client": C1, "job": 2, "waits_for": [1]}]
    assert kinds(sent(d)) == ["CONTEXT", "JOB"]             # job 1 only
    finish(d)
    out = sent(d)
    assert kinds(out) == ["RESULT", "KEPT", "JOB"]            # the small outcome goes with job 2
    assert wire.decode_kept(out[1][2]) == (77, b"value")
    assert d.kept.report()["held_jobs"] == 0


def test_an_outcome_the_master_no_longer_has_is_asked_of_the_client():
    d = setup()
    submit(d, 1)
    finish(d)
    sent(d)
    submit(d, 2, [(77, 1)])
    out = sent(d)
    assert kinds(out) == ["MISSING"] and wire.decode_key(out[0][2], "MISSING").key == 77
    put(d, 77, b"value")
    assert kinds(sent(d)) == ["KEPT", "JOB"]


def test_a_failure_fails_the_jobs_down_the_chain_and_a_cancellation_cancels_them():
    d = setup()
    submit(d, 1)
    submit(d, 2, [(77, 1)])
    submit(d, 3, [(78, 2)])
    sent(d)
    finish(d, Status.RAISED, b"exception")
    results = [frames.decode_result(body) for _, t, body in sent(d) if t == Frame.RESULT]
    assert [(r.jobid, r.status) for r in results] == [(1, Status.RAISED), (2, Status.DEPENDENCY),
                                                      (3, Status.DEPENDENCY)]
    assert wire.decode_dependency(results[1].payload)[:2] == (1, Status.RAISED)
    assert wire.decode_dependency(results[2].payload)[:2] == (2, Status.DEPENDENCY)
    submit(d, 4)
    submit(d, 5, [(79, 4)])
    sent(d)
    d.cancel(C1, 4)
    results = [frames.decode_result(body) for _, t, body in sent(d) if t == Frame.RESULT]
    assert [(r.jobid, r.status) for r in results] == [(5, Status.DEPENDENCY_CANCELLED)]


def test_a_released_value_leaves_once_no_job_pins_it_and_workers_that_fetched_it_drop_it():
    d = setup()
    big = b"x" * 100_000
    put(d, 5, big)
    assert kinds(sent(d)) == ["PUT_ACK"]
    submit(d, 1, [(5, 0)])
    assert kinds(sent(d)) == ["CONTEXT", "JOB"]               # big: the worker fetches it
    inbox.worker_frame(d, W1, Frame.FETCH, body(wire.encode_key(Frame.FETCH, 5)))
    assert kinds(sent(d)) == ["KEPT"]
    d.kept.release(C1, 5)
    assert d.kept.report()["values"] == 1                     # job 1 still uses it
    finish(d)
    assert kinds(sent(d)) == ["RESULT", "DROP"]
    assert d.kept.report()["values"] == 0 and d.kept.bytes == 0
    submit(d, 2, [(5, 0)])                                    # a released put: a clear error
    result = frames.decode_result(sent(d)[0][2])
    assert result.status == Status.KEPT_ERROR and b"released" in bytes(result.payload)


def test_a_put_beyond_the_bound_is_refused_and_a_client_that_leaves_takes_its_values():
    d = setup(limit=1000)
    data = b"x" * 2000
    put(d, 5, data)
    out = sent(d)
    assert kinds(out) == ["PUT_ACK"] and "--kept-bytes" in wire.decode_key(out[0][2], "PUT_ACK").text
    put(d, 6, b"small")
    submit(d, 1)
    submit(d, 2, [(6, 0), (77, 1)])
    sent(d)
    d.remove_client(C1)
    report = d.kept.report()
    assert (report["values"], report["held_jobs"], d.kept.bytes) == (0, 0, 0)
    assert not d.kept.pins and not d.kept.uses and not d.kept.wanted
