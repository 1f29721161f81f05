"""Unit tests of cw.dispatch.Dispatcher, driven by plain calls; the outbox is decoded with cw.protocol."""
from __future__ import annotations

import json

import pytest

from cw import protocol as p
from cw.dispatch import DEFAULT_RETRIES, Dispatcher
from cw.errors import ProtocolError

C1, C2 = 101, 102          # client peer ids
W1, W2, W3 = 1, 2, 3       # worker peer ids
CTX1 = b'{"cwd":"/home/a","path":["/home/a"]}'

BODY_DECODERS = {
    p.JOB: p.decode_job,
    p.CONTEXT: p.decode_context_for_worker,
    p.RESULT: p.decode_result,
    p.CANCELLED: p.decode_cancelled,
}


def drain(d):
    """Empties d.outbox; returns [(peer, frame type, decoded fields)] in order."""
    dec = p.FrameDecoder()
    out = []
    for peer, f in d.outbox:
        dec.feed(b"".join(f) if isinstance(f, tuple) else f)
        ftype, body = dec.next_frame()
        assert dec.buffered == 0, "each outbox entry must be exactly one frame"
        out.append((peer, ftype, BODY_DECODERS[ftype](body)))
    d.outbox.clear()
    return out


def of(msgs, ftype, peer=None):
    """The decoded fields of the frames of one type (to one peer)."""
    return [fields for to, t, fields in msgs if t == ftype and (peer is None or to == peer)]


def worker(d, wid):
    d.add_worker(wid, {"host": f"h{wid}", "pid": 100 + wid})
    return f"h{wid}:{100 + wid}".encode()


def client(d, cid, context=None):
    d.add_client(cid, {"host": "c", "pid": cid})
    if context is not None:
        d.set_context(cid, context)


def submit(d, cid, *jobids, retries=DEFAULT_RETRIES):
    for jobid in jobids:
        d.submit(cid, jobid, retries, b"payload-%d-%d" % (cid, jobid))


def payload(cid, jobid):
    return b"payload-%d-%d" % (cid, jobid)


# --- scheduling ------------------------------------------------------------------

def test_jobs_go_to_idle_workers_in_fifo_order():
    """Queued jobs are handed out in submission order, as workers become idle."""
    d = Dispatcher()
    client(d, C1)
    submit(d, C1, 10, 11, 12)
    worker(d, W1)
    worker(d, W2)
    msgs = drain(d)
    assert [(peer, job[2]) for peer, t, job in msgs if t == p.JOB] == [(W1, payload(C1, 10)), (W2, payload(C1, 11))]
    gid = of(msgs, p.JOB, W1)[0][0]
    d.outcome(W1, gid, p.OK, b"r")
    assert [job[2] for job in of(drain(d), p.JOB, W1)] == [payload(C1, 12)]


def test_one_job_per_worker_at_a_time():
    """A busy worker gets no second job until it reports an outcome."""
    d = Dispatcher()
    client(d, C1)
    worker(d, W1)
    submit(d, C1, 1, 2, 3)
    jobs = of(drain(d), p.JOB)
    assert len(jobs) == 1
    submit(d, C1, 4)
    assert of(drain(d), p.JOB) == []
    d.outcome(W1, jobs[0][0], p.OK, b"")
    assert len(of(drain(d), p.JOB)) == 1


def test_context_sent_once_before_first_job_of_each_client():
    """A worker gets a client's CONTEXT just before its first job of that client, and never again."""
    d = Dispatcher()
    client(d, C1, CTX1)
    client(d, C2)
    worker(d, W1)
    submit(d, C1, 1)
    msgs = drain(d)
    assert [t for _, t, _ in msgs] == [p.CONTEXT, p.JOB]
    assert of(msgs, p.CONTEXT, W1) == [(C1, json.loads(CTX1))]
    gid, ctx, _ = of(msgs, p.JOB, W1)[0]
    assert ctx == C1
    d.outcome(W1, gid, p.OK, b"")
    submit(d, C1, 2)
    msgs = drain(d)
    assert of(msgs, p.CONTEXT) == [] and len(of(msgs, p.JOB, W1)) == 1
    d.outcome(W1, of(msgs, p.JOB, W1)[0][0], p.OK, b"")
    drain(d)
    submit(d, C2, 1)
    msgs = drain(d)
    assert [t for _, t, _ in msgs] == [p.CONTEXT, p.JOB]
    assert of(msgs, p.CONTEXT, W1) == [(C2, {})]


def test_client_leaving_makes_its_workers_forget_its_context():
    """When a client leaves, each worker holding its context gets an empty-context CONTEXT; others get nothing."""
    d = Dispatcher()
    client(d, C1, CTX1)
    worker(d, W1)
    worker(d, W2)
    submit(d, C1, 1)
    gid = of(drain(d), p.JOB, W1)[0][0]
    d.outcome(W1, gid, p.OK, b"")
    drain(d)
    d.remove_client(C1)
    assert d.outbox == [(W1, p.encode_context_for_worker(C1, b"{}"))]
    assert drain(d) == [(W1, p.CONTEXT, (C1, {}))]


# --- results -------------------------------------------------------------------

def test_result_goes_only_to_submitting_client_with_its_jobid_and_worker_label():
    """RESULT goes to the job's own client, with that client's jobid, the status and b"host:pid"."""
    d = Dispatcher()
    client(d, C1)
    client(d, C2)
    label1, label2 = worker(d, W1), worker(d, W2)
    submit(d, C1, 7)
    submit(d, C2, 7)      # the same jobid in another client is another job
    jobs = {peer: fields for peer, t, fields in drain(d) if t == p.JOB}
    d.outcome(W2, jobs[W2][0], p.RAISED, b"boom")
    assert drain(d) == [(C2, p.RESULT, (7, p.RAISED, label2, b"boom"))]
    d.outcome(W1, jobs[W1][0], p.OK, b"fine")
    assert drain(d) == [(C1, p.RESULT, (7, p.OK, label1, b"fine"))]
    assert label1 == b"h1:101"


def test_result_is_sent_exactly_once():
    """A second outcome for the same gid raises ProtocolError and sends no second RESULT."""
    d = Dispatcher()
    client(d, C1)
    worker(d, W1)
    submit(d, C1, 1)
    gid = of(drain(d), p.JOB)[0][0]
    d.outcome(W1, gid, p.OK, b"x")
    assert len(of(drain(d), p.RESULT, C1)) == 1
    with pytest.raises(ProtocolError):
        d.outcome(W1, gid, p.OK, b"x")
    assert of(drain(d), p.RESULT) == []


def test_outcome_for_a_job_the_worker_does_not_run_raises():
    """A worker reporting on another worker's job is a protocol error."""
    d = Dispatcher()
    client(d, C1)
    worker(d, W1)
    worker(d, W2)
    submit(d, C1, 1, 2)
    gid1 = of(drain(d), p.JOB, W1)[0][0]
    with pytest.raises(ProtocolError):
        d.outcome(W2, gid1, p.OK, b"")
    assert drain(d) == []


# --- lost workers ------------------------------------------------------------

def test_lost_worker_puts_job_back_at_head_of_queue():
    """A job whose worker leaves is re-queued ahead of jobs submitted before it, and goes to the next worker."""
    d = Dispatcher()
    client(d, C1, CTX1)
    worker(d, W1)
    submit(d, C1, 1, 2)
    gid = of(drain(d), p.JOB, W1)[0][0]
    d.remove_worker(W1)
    assert drain(d) == []
    worker(d, W2)
    msgs = drain(d)
    assert of(msgs, p.CONTEXT, W2) == [(C1, json.loads(CTX1))]
    assert of(msgs, p.JOB, W2) == [(gid, C1, payload(C1, 1))]


def test_lost_worker_job_goes_to_idle_worker_at_once():
    """If a worker is idle when another dies, the orphaned job is handed to it right away."""
    d = Dispatcher()
    client(d, C1)
    worker(d, W1)
    submit(d, C1, 1)
    gid = of(drain(d), p.JOB, W1)[0][0]
    worker(d, W2)
    d.remove_worker(W1)
    assert of(drain(d), p.JOB, W2) == [(gid, C1, payload(C1, 1))]


@pytest.mark.parametrize("retries, attempts", [(DEFAULT_RETRIES, 3), (0, 1), (1, 2)])
def test_job_fails_lost_after_max_attempts(retries, attempts):
    """After its allowed attempts all lost their worker, the client gets RESULT LOST listing attempts and workers."""
    d = Dispatcher()
    client(d, C1)
    submit(d, C1, 5, retries=retries)
    labels = []
    for wid in range(1, attempts + 1):
        assert of(drain(d), p.RESULT) == []
        labels.append(worker(d, wid).decode())
        assert len(of(drain(d), p.JOB, wid)) == 1
        d.remove_worker(wid)
    msgs = drain(d)
    assert len(msgs) == 1
    peer, ftype, (jobid, status, _label, body) = msgs[0]
    assert (peer, ftype, jobid, status) == (C1, p.RESULT, 5, p.LOST)
    assert json.loads(body) == {"attempts": attempts, "workers": labels}
    worker(d, 99)
    assert of(drain(d), p.JOB) == []
    assert d.status()["queued"] == 0 and d.status()["running"] == 0


def test_dispatcher_max_attempts_is_the_default_for_submits():
    """Dispatcher(max_attempts=N) fails a default-retries job after N lost workers."""
    d = Dispatcher(max_attempts=1)
    client(d, C1)
    submit(d, C1, 1)
    worker(d, W1)
    d.remove_worker(W1)
    assert [status for _, status, _, _ in of(drain(d), p.RESULT, C1)] == [p.LOST]


# --- cancel -----------------------------------------------------------------

def test_cancel_queued_job_answers_true_and_never_dispatches_it():
    """Cancelling a queued job answers CANCELLED(jobid, True); no worker ever sees it."""
    d = Dispatcher()
    client(d, C1)
    submit(d, C1, 1, 2)
    d.cancel(C1, 1)
    assert drain(d) == [(C1, p.CANCELLED, (1, True))]
    worker(d, W1)
    worker(d, W2)
    jobs = of(drain(d), p.JOB)
    assert [job[2] for job in jobs] == [payload(C1, 2)]


def test_cancel_running_job_answers_false():
    """Cancelling a running job answers CANCELLED(jobid, False); its result still comes."""
    d = Dispatcher()
    client(d, C1)
    worker(d, W1)
    submit(d, C1, 1)
    gid = of(drain(d), p.JOB)[0][0]
    d.cancel(C1, 1)
    assert drain(d) == [(C1, p.CANCELLED, (1, False))]
    d.outcome(W1, gid, p.OK, b"r")
    assert of(drain(d), p.RESULT, C1) == [(1, p.OK, b"h1:101", b"r")]


# --- clients leaving --------------------------------------------------------

def test_client_leaving_drops_queued_jobs_and_later_outcome():
    """A departed client's queued jobs are never dispatched and its running job's outcome is dropped silently."""
    d = Dispatcher()
    client(d, C1)
    worker(d, W1)
    submit(d, C1, 1, 2, 3)
    gid = of(drain(d), p.JOB, W1)[0][0]
    d.remove_client(C1)
    drain(d)
    d.outcome(W1, gid, p.OK, b"late")
    worker(d, W2)
    msgs = drain(d)
    assert of(msgs, p.RESULT) == [] and of(msgs, p.JOB) == []
    assert d.status()["queued"] == 0 and d.status()["running"] == 0


def test_client_leaving_then_worker_lost_does_not_requeue():
    """A departed client's running job is not re-queued when its worker dies."""
    d = Dispatcher()
    client(d, C1)
    worker(d, W1)
    submit(d, C1, 1)
    drain(d)
    d.remove_client(C1)
    drain(d)
    d.remove_worker(W1)
    worker(d, W2)
    assert drain(d) == []
    assert d.status()["queued"] == 0


def test_duplicate_jobid_from_a_client_raises():
    """A client submitting a jobid it already has pending is a protocol error."""
    d = Dispatcher()
    client(d, C1)
    submit(d, C1, 1)
    with pytest.raises(ProtocolError):
        submit(d, C1, 1)


# --- status and a whole run ------------------------------------------------

def test_status_counts_workers_clients_queued_running():
    """status() reports each worker's and client's state and the global queued/running counts."""
    now = [1000.0]
    d = Dispatcher(clock=lambda: now[0])
    client(d, C1)
    client(d, C2)
    worker(d, W1)
    worker(d, W2)
    submit(d, C1, 1, 2, 3)
    submit(d, C2, 1)
    now[0] += 2.5
    s = d.status()
    assert (s["queued"], s["running"]) == (2, 2)
    assert [(w["id"], w["state"], w["connected_s"]) for w in s["workers"]] == [(W1, "busy", 2.5), (W2, "busy", 2.5)]
    clients = {c["id"]: (c["submitted"], c["done"], c["queued"], c["running"]) for c in s["clients"]}
    assert clients == {C1: (3, 0, 1, 2), C2: (1, 0, 1, 0)}
    assert s["uptime_s"] == 2.5
    jobs = {peer: fields for peer, t, fields in drain(d) if t == p.JOB}
    d.outcome(W1, jobs[W1][0], p.OK, b"")
    d.remove_worker(W2)
    s = d.status()
    assert (s["queued"], s["running"]) == (2, 1)
    assert [(w["id"], w["state"], w["jobs_done"]) for w in s["workers"]] == [(W1, "busy", 1)]
    clients = {c["id"]: (c["submitted"], c["done"], c["queued"], c["running"]) for c in s["clients"]}
    assert clients == {C1: (3, 1, 1, 1), C2: (1, 0, 1, 0)}
    d.cancel(C2, 1)
    d.remove_client(C1)
    s = d.status()
    assert (s["queued"], s["running"]) == (0, 1)
    assert [c["id"] for c in s["clients"]] == [C2]


def test_two_clients_all_jobs_complete_each_gets_only_its_results():
    """Interleaved jobs of two clients on two workers all finish; each client gets exactly its own results."""
    d = Dispatcher()
    client(d, C1)
    client(d, C2)
    for jobid in range(10):
        submit(d, C1, jobid)
        submit(d, C2, jobid)
    worker(d, W1)
    worker(d, W2)
    results = {C1: {}, C2: {}}
    for _ in range(100):
        msgs = drain(d)
        for peer, ftype, fields in msgs:
            if ftype == p.RESULT:
                jobid, status, _, body = fields
                assert status == p.OK and jobid not in results[peer]
                results[peer][jobid] = body
        running = [(peer, fields) for peer, ftype, fields in msgs if ftype == p.JOB]
        if not running:
            break
        for wid, (gid, _ctx, job_payload) in running:
            d.outcome(wid, gid, p.OK, b"done:" + job_payload)
    for cid in (C1, C2):
        assert results[cid] == {jobid: b"done:" + payload(cid, jobid) for jobid in range(10)}
    assert d.status()["queued"] == 0 and d.status()["running"] == 0
