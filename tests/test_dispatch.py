"""Unit tests of cw.master.dispatch.Dispatcher, driven by plain calls; the outbox is decoded with cw.wire.frames."""
from __future__ import annotations

import json

import pytest

from cw.errors import ProtocolError
from cw.master.dispatch import DEFAULT_RETRIES, Dispatcher
from cw.wire import frames
from cw.wire.decoder import FrameDecoder
from cw.wire.frames import Frame, Status

C1, C2 = 101, 102          # client peer ids
W1, W2, W3 = 1, 2, 3       # worker peer ids
CTX1 = b'{"cwd":"/home/a","path":["/home/a"]}'

BODY_DECODERS = {
    Frame.JOB: frames.decode_job,
    Frame.JOB_ENV: frames.decode_job_env,
    Frame.CONTEXT: frames.decode_context_for_worker,
    Frame.RESULT: frames.decode_result,
    Frame.CANCELLED: frames.decode_cancelled,
    Frame.ABORT: frames.decode_abort,
    Frame.REVOKE: frames.decode_revoke,
    Frame.NOTICE: frames.decode_notice,
}


def drain(d):
    """Empties d.outbox; returns [(peer, frame type, decoded fields)] in order."""
    dec = FrameDecoder()
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


def resent(jobs, old_gid):
    """The JOB frames' fields but the id, after checking that each job sent
    again has a new id: a late word about its earlier sending cannot match it."""
    assert all(fields[0] != old_gid for fields in jobs)
    return [fields[1:] for fields in jobs]


def worker(d, wid):
    d.add_worker(wid, {"host": f"h{wid}", "pid": 100 + wid})
    return f"h{wid}:{100 + wid}".encode()


def client(d, cid, context=None):
    d.add_client(cid, {"host": "c", "pid": cid})
    if context is not None:
        d.set_context(cid, context)


def submit(d, cid, *jobids, retries=DEFAULT_RETRIES):
    for jobid in jobids:
        d.submit(cid, jobid, retries, 0.0, b"payload-%d-%d" % (cid, jobid))


def payload(cid, jobid):
    return b"payload-%d-%d" % (cid, jobid)


# --- scheduling ------------------------------------------------------------------

def test_jobs_go_to_idle_workers_in_fifo_order():
    """Queued jobs are handed out in submission order, as workers become idle."""
    d = Dispatcher(slots=1)
    client(d, C1)
    submit(d, C1, 10, 11, 12)
    worker(d, W1)
    worker(d, W2)
    msgs = drain(d)
    assert [(peer, job[3]) for peer, t, job in msgs if t == Frame.JOB] == [(W1, payload(C1, 10)), (W2, payload(C1, 11))]
    gid = of(msgs, Frame.JOB, W1)[0][0]
    d.outcome(W1, gid, Status.OK, b"r")
    assert [job[3] for job in of(drain(d), Frame.JOB, W1)] == [payload(C1, 12)]


def test_one_job_per_worker_at_a_time():
    """A busy worker gets no second job until it reports an outcome."""
    d = Dispatcher(slots=1)
    client(d, C1)
    worker(d, W1)
    submit(d, C1, 1, 2, 3)
    jobs = of(drain(d), Frame.JOB)
    assert len(jobs) == 1
    submit(d, C1, 4)
    assert of(drain(d), Frame.JOB) == []
    d.outcome(W1, jobs[0][0], Status.OK, b"")
    assert len(of(drain(d), Frame.JOB)) == 1


def test_context_sent_once_before_first_job_of_each_client():
    """A worker gets a client's CONTEXT just before its first job of that client, and never again."""
    d = Dispatcher(slots=1)
    client(d, C1, CTX1)
    client(d, C2)
    worker(d, W1)
    submit(d, C1, 1)
    msgs = drain(d)
    assert [t for _, t, _ in msgs] == [Frame.CONTEXT, Frame.JOB]
    assert of(msgs, Frame.CONTEXT, W1) == [(C1, json.loads(CTX1))]
    gid, ctx, _, _ = of(msgs, Frame.JOB, W1)[0]
    assert ctx == C1
    d.outcome(W1, gid, Status.OK, b"")
    submit(d, C1, 2)
    msgs = drain(d)
    assert of(msgs, Frame.CONTEXT) == [] and len(of(msgs, Frame.JOB, W1)) == 1
    d.outcome(W1, of(msgs, Frame.JOB, W1)[0][0], Status.OK, b"")
    drain(d)
    submit(d, C2, 1)
    msgs = drain(d)
    assert [t for _, t, _ in msgs] == [Frame.CONTEXT, Frame.JOB]
    assert of(msgs, Frame.CONTEXT, W1) == [(C2, {})]


def test_client_leaving_makes_its_workers_forget_its_context():
    """When a client leaves, each worker holding its context gets an empty-context CONTEXT; others get nothing."""
    d = Dispatcher(slots=1)
    client(d, C1, CTX1)
    worker(d, W1)
    worker(d, W2)
    submit(d, C1, 1)
    gid = of(drain(d), Frame.JOB, W1)[0][0]
    d.outcome(W1, gid, Status.OK, b"")
    drain(d)
    d.remove_client(C1)
    assert d.outbox == [(W1, frames.encode_context_for_worker(C1, b"{}"))]
    assert drain(d) == [(W1, Frame.CONTEXT, (C1, {}))]


def run_one_worker(d, wid):
    """Has worker wid finish every job it gets, until none is left; returns [(ctx, payload)] in dispatch order,
    starting with any JOB already in the outbox."""
    order = []
    msgs = drain(d)
    while True:
        jobs = of(msgs, Frame.JOB, wid)
        if not jobs:
            return order
        assert len(jobs) == 1
        gid, ctx, _timeout, job_payload = jobs[0]
        order.append((ctx, job_payload))
        d.outcome(wid, gid, Status.OK, b"")
        msgs = drain(d)


def rr_expected():
    a = [(C1, payload(C1, jobid)) for jobid in range(100)]
    b = [(C2, payload(C2, jobid)) for jobid in range(3)]
    return [a[0], b[0], a[1], b[1], a[2], b[2]] + a[3:]


def test_round_robin_between_clients_while_a_job_runs():
    """Client A queues 100 jobs (its first one running), then B queues 3: B's first job goes right after
    A's running one, then the clients alternate while both have jobs; each client's jobs go FIFO."""
    d = Dispatcher(slots=1)
    client(d, C1)
    client(d, C2)
    worker(d, W1)
    submit(d, C1, *range(100))
    submit(d, C2, 0, 1, 2)
    assert run_one_worker(d, W1) == rr_expected()
    assert d.status()["queued"] == 0


def test_round_robin_between_clients_queued_before_any_worker():
    """The same alternation when both clients queued their jobs before the first worker came."""
    d = Dispatcher(slots=1)
    client(d, C1)
    client(d, C2)
    submit(d, C1, *range(100))
    submit(d, C2, 0, 1, 2)
    worker(d, W1)
    assert run_one_worker(d, W1) == rr_expected()


def test_lost_job_goes_back_to_the_head_of_its_own_clients_queue():
    """A lost job is re-queued at the head of its client's queue: ahead of that client's later jobs,
    but it waits for the turn of its client (another client's turn comes first)."""
    d = Dispatcher(slots=1)
    client(d, C1)
    client(d, C2)
    worker(d, W1)
    worker(d, W2)
    submit(d, C1, 1, 2)
    jobs = {peer: fields for peer, t, fields in drain(d) if t == Frame.JOB}
    assert jobs[W2][3] == payload(C1, 2)
    submit(d, C2, 1, 2)        # C2's turn comes before C1's next one
    submit(d, C1, 3)
    d.remove_worker(W2)
    assert drain(d) == []
    d.outcome(W1, jobs[W1][0], Status.OK, b"")
    order = run_one_worker(d, W1)
    assert order == [(C2, payload(C2, 1)), (C1, payload(C1, 2)), (C2, payload(C2, 2)), (C1, payload(C1, 3))]


def test_pause_client_holds_its_jobs_while_others_run_and_resume_releases_them():
    """A paused client's queued jobs wait (also ones submitted while paused) while other clients' jobs still
    go out; once the worker is idle, resume_client dispatches the paused client's next job (FIFO) at once."""
    d = Dispatcher(slots=1)
    client(d, C1)
    client(d, C2)
    worker(d, W1)
    submit(d, C1, 1, 2)
    gid = of(drain(d), Frame.JOB, W1)[0][0]
    d.pause_client(C1)
    submit(d, C2, 1, 2)
    submit(d, C1, 3)
    assert drain(d) == []
    assert {c["id"]: c["paused"] for c in d.status()["clients"]} == {C1: True, C2: False}
    d.outcome(W1, gid, Status.OK, b"")
    msgs = drain(d)
    assert of(msgs, Frame.RESULT, C1) == [(1, Status.OK, b"h1:101", b"")]
    assert [(job[1], job[3]) for job in of(msgs, Frame.JOB, W1)] == [(C2, payload(C2, 1))]
    d.outcome(W1, of(msgs, Frame.JOB, W1)[0][0], Status.OK, b"")
    assert run_one_worker(d, W1) == [(C2, payload(C2, 2))]
    assert drain(d) == [] and d.status()["queued"] == 2
    d.resume_client(C1)
    assert {c["id"]: c["paused"] for c in d.status()["clients"]} == {C1: False, C2: False}
    assert run_one_worker(d, W1) == [(C1, payload(C1, 2)), (C1, payload(C1, 3))]


def test_resume_client_with_no_idle_worker_releases_jobs_at_next_outcome():
    """Resuming while every worker is busy sends nothing; the client's job goes out when a worker frees up."""
    d = Dispatcher(slots=1)
    client(d, C1)
    client(d, C2)
    worker(d, W1)
    d.pause_client(C1)
    submit(d, C1, 1)
    submit(d, C2, 1)
    gid = of(drain(d), Frame.JOB, W1)[0][0]
    d.resume_client(C1)
    assert drain(d) == []
    d.outcome(W1, gid, Status.OK, b"")
    assert [job[3] for job in of(drain(d), Frame.JOB, W1)] == [payload(C1, 1)]


def test_paused_clients_lost_job_waits_for_resume():
    """A paused client's job whose worker dies is re-queued but held back until the client resumes."""
    d = Dispatcher(slots=1)
    client(d, C1)
    worker(d, W1)
    submit(d, C1, 1)
    gid = of(drain(d), Frame.JOB, W1)[0][0]
    d.pause_client(C1)
    d.remove_worker(W1)
    worker(d, W2)
    assert drain(d) == [] and d.status()["queued"] == 1
    d.resume_client(C1)
    assert resent(of(drain(d), Frame.JOB, W2), gid) == [(C1, 0.0, payload(C1, 1))]


def test_draining_worker_finishes_its_job_and_gets_no_other():
    """After drain_worker its current job's result is delivered, but no new job goes to it though jobs wait;
    its status state is 'draining'."""
    d = Dispatcher(slots=1)
    client(d, C1)
    worker(d, W1)
    worker(d, W2)
    submit(d, C1, 1, 2, 3)
    jobs = {peer: fields for peer, t, fields in drain(d) if t == Frame.JOB}
    d.drain_worker(W1, [jobs[W1][0]])
    assert {w["id"]: w["state"] for w in d.status()["workers"]} == {W1: "draining", W2: "busy"}
    d.outcome(W1, jobs[W1][0], Status.OK, b"r")
    msgs = drain(d)
    assert of(msgs, Frame.RESULT, C1) == [(1, Status.OK, b"h1:101", b"r")]
    assert of(msgs, Frame.JOB) == []
    assert d.status()["queued"] == 1
    assert {w["id"]: w["state"] for w in d.status()["workers"]} == {W1: "draining", W2: "busy"}
    d.outcome(W2, jobs[W2][0], Status.OK, b"")
    assert [(peer, job[3]) for peer, t, job in drain(d) if t == Frame.JOB] == [(W2, payload(C1, 3))]


def test_draining_idle_worker_gets_no_job():
    """An idle worker that drains gets no job submitted afterwards."""
    d = Dispatcher(slots=1)
    client(d, C1)
    worker(d, W1)
    d.drain_worker(W1)
    submit(d, C1, 1)
    assert drain(d) == []
    assert [w["state"] for w in d.status()["workers"]] == ["draining"]
    worker(d, W2)
    assert [(peer, job[3]) for peer, t, job in drain(d) if t == Frame.JOB] == [(W2, payload(C1, 1))]


def test_timeout_given_at_submit_is_carried_in_the_job_frame():
    """Each JOB carries the timeout its SUBMIT gave (0.0 for none), also when a lost job is sent again."""
    d = Dispatcher(slots=1)
    client(d, C1)
    d.submit(C1, 1, DEFAULT_RETRIES, 12.5, b"a")
    d.submit(C1, 2, DEFAULT_RETRIES, 0.0, b"b")
    worker(d, W1)
    worker(d, W2)
    jobs = {peer: fields for peer, t, fields in drain(d) if t == Frame.JOB}
    assert jobs[W1][1:] == (C1, 12.5, b"a")
    assert jobs[W2][1:] == (C1, 0.0, b"b")
    d.remove_worker(W1)
    worker(d, W3)
    assert resent(of(drain(d), Frame.JOB, W3), jobs[W1][0]) == [(C1, 12.5, b"a")]


# --- results -------------------------------------------------------------------

def test_result_goes_only_to_submitting_client_with_its_jobid_and_worker_label():
    """RESULT goes to the job's own client, with that client's jobid, the status and b"host:pid"."""
    d = Dispatcher(slots=1)
    client(d, C1)
    client(d, C2)
    label1, label2 = worker(d, W1), worker(d, W2)
    submit(d, C1, 7)
    submit(d, C2, 7)      # the same jobid in another client is another job
    jobs = {peer: fields for peer, t, fields in drain(d) if t == Frame.JOB}
    d.outcome(W2, jobs[W2][0], Status.RAISED, b"boom")
    assert drain(d) == [(C2, Frame.RESULT, (7, Status.RAISED, label2, b"boom"))]
    d.outcome(W1, jobs[W1][0], Status.OK, b"fine")
    assert drain(d) == [(C1, Frame.RESULT, (7, Status.OK, label1, b"fine"))]
    assert label1 == b"h1:101"


def test_result_is_sent_exactly_once():
    """A second outcome for the same gid raises ProtocolError and sends no second RESULT."""
    d = Dispatcher(slots=1)
    client(d, C1)
    worker(d, W1)
    submit(d, C1, 1)
    gid = of(drain(d), Frame.JOB)[0][0]
    d.outcome(W1, gid, Status.OK, b"x")
    assert len(of(drain(d), Frame.RESULT, C1)) == 1
    with pytest.raises(ProtocolError):
        d.outcome(W1, gid, Status.OK, b"x")
    assert of(drain(d), Frame.RESULT) == []


def test_outcome_for_a_job_the_worker_does_not_run_raises():
    """A worker reporting on another worker's job is a protocol error."""
    d = Dispatcher(slots=1)
    client(d, C1)
    worker(d, W1)
    worker(d, W2)
    submit(d, C1, 1, 2)
    gid1 = of(drain(d), Frame.JOB, W1)[0][0]
    with pytest.raises(ProtocolError):
        d.outcome(W2, gid1, Status.OK, b"")
    assert drain(d) == []


# --- lost workers ------------------------------------------------------------

def test_lost_worker_puts_job_back_at_head_of_queue():
    """A job whose worker leaves is re-queued ahead of jobs submitted before it, and goes to the next worker."""
    d = Dispatcher(slots=1)
    client(d, C1, CTX1)
    worker(d, W1)
    submit(d, C1, 1, 2)
    gid = of(drain(d), Frame.JOB, W1)[0][0]
    d.remove_worker(W1)
    assert drain(d) == []
    worker(d, W2)
    msgs = drain(d)
    assert of(msgs, Frame.CONTEXT, W2) == [(C1, json.loads(CTX1))]
    assert resent(of(msgs, Frame.JOB, W2), gid) == [(C1, 0.0, payload(C1, 1))]


def test_lost_worker_job_goes_to_idle_worker_at_once():
    """If a worker is idle when another dies, the orphaned job is handed to it right away."""
    d = Dispatcher(slots=1)
    client(d, C1)
    worker(d, W1)
    submit(d, C1, 1)
    gid = of(drain(d), Frame.JOB, W1)[0][0]
    worker(d, W2)
    d.remove_worker(W1)
    assert resent(of(drain(d), Frame.JOB, W2), gid) == [(C1, 0.0, payload(C1, 1))]


@pytest.mark.parametrize("retries, attempts", [(DEFAULT_RETRIES, 3), (0, 1), (1, 2)])
def test_job_fails_lost_after_max_attempts(retries, attempts):
    """After its allowed attempts all lost their worker, the client gets RESULT LOST listing attempts and workers."""
    d = Dispatcher(slots=1)
    client(d, C1)
    submit(d, C1, 5, retries=retries)
    labels = []
    for wid in range(1, attempts + 1):
        assert of(drain(d), Frame.RESULT) == []
        labels.append(worker(d, wid).decode())
        assert len(of(drain(d), Frame.JOB, wid)) == 1
        d.remove_worker(wid)
    msgs = drain(d)
    assert len(msgs) == 1
    peer, ftype, (jobid, status, _label, body) = msgs[0]
    assert (peer, ftype, jobid, status) == (C1, Frame.RESULT, 5, Status.LOST)
    assert json.loads(body) == {"attempts": attempts, "workers": labels}
    worker(d, 99)
    assert of(drain(d), Frame.JOB) == []
    assert d.status()["queued"] == 0 and d.status()["running"] == 0


def test_dispatcher_max_attempts_is_the_default_for_submits():
    """Dispatcher(max_attempts=N, slots=1) fails a default-retries job after N lost workers."""
    d = Dispatcher(max_attempts=1, slots=1)
    client(d, C1)
    submit(d, C1, 1)
    worker(d, W1)
    d.remove_worker(W1)
    assert [status for _, status, _, _ in of(drain(d), Frame.RESULT, C1)] == [Status.LOST]


# --- cancel -----------------------------------------------------------------

def test_cancel_queued_job_answers_true_and_never_dispatches_it():
    """Cancelling a queued job answers CANCELLED(jobid, True); no worker ever sees it."""
    d = Dispatcher(slots=1)
    client(d, C1)
    submit(d, C1, 1, 2)
    d.cancel(C1, 1)
    assert drain(d) == [(C1, Frame.CANCELLED, (1, True))]
    worker(d, W1)
    worker(d, W2)
    jobs = of(drain(d), Frame.JOB)
    assert [job[3] for job in jobs] == [payload(C1, 2)]


def test_cancel_running_job_answers_true_aborts_it_and_drops_its_outcome():
    """Cancelling a running job answers CANCELLED(jobid, True) and sends ABORT(gid) to its worker only;
    an outcome the worker still sends is dropped, and the worker is free for the next job."""
    d = Dispatcher(slots=1)
    client(d, C1)
    worker(d, W1)
    worker(d, W2)
    submit(d, C1, 1, 2)
    jobs = {peer: fields for peer, t, fields in drain(d) if t == Frame.JOB}
    gid = jobs[W1][0]
    d.cancel(C1, 1)
    msgs = drain(d)
    assert sorted(msgs) == sorted([(C1, Frame.CANCELLED, (1, True)), (W1, Frame.ABORT, gid)])
    submit(d, C1, 3)
    assert drain(d) == []     # W1 still holds the aborted job until it reports or leaves
    d.outcome(W1, gid, Status.OK, b"r")
    msgs = drain(d)
    assert of(msgs, Frame.RESULT) == []
    assert [job[3] for job in of(msgs, Frame.JOB, W1)] == [payload(C1, 3)]
    d.outcome(W2, jobs[W2][0], Status.OK, b"two")
    assert of(drain(d), Frame.RESULT, C1) == [(2, Status.OK, b"h2:102", b"two")]


def test_cancel_after_result_answers_false():
    """Cancelling a job whose RESULT was already sent answers CANCELLED(jobid, False) and aborts nothing."""
    d = Dispatcher(slots=1)
    client(d, C1)
    worker(d, W1)
    submit(d, C1, 1)
    gid = of(drain(d), Frame.JOB)[0][0]
    d.outcome(W1, gid, Status.OK, b"r")
    drain(d)
    d.cancel(C1, 1)
    assert drain(d) == [(C1, Frame.CANCELLED, (1, False))]


def test_cancelled_running_job_is_not_requeued_when_its_worker_dies():
    """A cancelled running job whose worker then leaves (e.g. replaced after ABORT) is not run again."""
    d = Dispatcher(slots=1)
    client(d, C1)
    worker(d, W1)
    submit(d, C1, 1)
    drain(d)
    d.cancel(C1, 1)
    drain(d)
    d.remove_worker(W1)
    worker(d, W2)
    assert drain(d) == []
    assert d.status()["queued"] == 0 and d.status()["running"] == 0


# --- clients leaving --------------------------------------------------------

def test_client_leaving_drops_queued_jobs_and_later_outcome():
    """A departed client's queued jobs are never dispatched, its running job gets ABORT on its worker,
    and that job's outcome, if the worker still sends one, is dropped silently."""
    d = Dispatcher(slots=1)
    client(d, C1)
    worker(d, W1)
    submit(d, C1, 1, 2, 3)
    gid = of(drain(d), Frame.JOB, W1)[0][0]
    d.remove_client(C1)
    msgs = drain(d)
    assert of(msgs, Frame.ABORT) == [gid] and of(msgs, Frame.ABORT, W1) == [gid]
    d.outcome(W1, gid, Status.OK, b"late")
    worker(d, W2)
    msgs = drain(d)
    assert of(msgs, Frame.RESULT) == [] and of(msgs, Frame.JOB) == []
    assert d.status()["queued"] == 0 and d.status()["running"] == 0


def test_client_leaving_aborts_each_running_job_on_its_worker():
    """A client leaving sends one ABORT(gid) to each worker running one of its jobs, and nothing to others."""
    d = Dispatcher(slots=1)
    client(d, C1)
    client(d, C2)
    worker(d, W1)
    worker(d, W2)
    worker(d, W3)
    submit(d, C1, 1)
    submit(d, C2, 1)
    submit(d, C1, 2, 3)
    jobs = {peer: fields for peer, t, fields in drain(d) if t == Frame.JOB}
    assert {peer: fields[1] for peer, fields in jobs.items()} == {W1: C1, W2: C2, W3: C1}
    d.remove_client(C1)
    msgs = drain(d)
    assert of(msgs, Frame.ABORT, W1) == [jobs[W1][0]]
    assert of(msgs, Frame.ABORT, W3) == [jobs[W3][0]]
    assert of(msgs, Frame.ABORT, W2) == []
    assert [t for to, t, _ in msgs if to == W2] == []
    d.outcome(W2, jobs[W2][0], Status.OK, b"ok")
    assert of(drain(d), Frame.RESULT, C2) == [(1, Status.OK, b"h2:102", b"ok")]


def test_client_leaving_then_worker_lost_does_not_requeue():
    """A departed client's running job is aborted, and not re-queued when its worker then dies."""
    d = Dispatcher(slots=1)
    client(d, C1)
    worker(d, W1)
    submit(d, C1, 1)
    gid = of(drain(d), Frame.JOB, W1)[0][0]
    d.remove_client(C1)
    assert of(drain(d), Frame.ABORT, W1) == [gid]
    d.remove_worker(W1)
    worker(d, W2)
    assert drain(d) == []
    assert d.status()["queued"] == 0 and d.status()["running"] == 0


def test_duplicate_jobid_from_a_client_raises():
    """A client submitting a jobid it already has pending is a protocol error."""
    d = Dispatcher(slots=1)
    client(d, C1)
    submit(d, C1, 1)
    with pytest.raises(ProtocolError):
        submit(d, C1, 1)


# --- status and a whole run ------------------------------------------------

def test_status_counts_workers_clients_queued_running():
    """status() reports each worker's and client's state and the global queued/running counts."""
    now = [1000.0]
    d = Dispatcher(clock=lambda: now[0], slots=1)
    client(d, C1)
    client(d, C2)
    worker(d, W1)
    worker(d, W2)
    submit(d, C1, 1, 2)
    submit(d, C2, 1)      # queued before C1's job 3, so it goes next under any round-robin
    submit(d, C1, 3)
    now[0] += 2.5
    s = d.status()
    assert (s["queued"], s["running"]) == (2, 2)
    assert [(w["id"], w["state"], w["connected_s"]) for w in s["workers"]] == [(W1, "busy", 2.5), (W2, "busy", 2.5)]
    clients = {c["id"]: (c["submitted"], c["done"], c["queued"], c["running"]) for c in s["clients"]}
    assert clients == {C1: (3, 0, 1, 2), C2: (1, 0, 1, 0)}
    assert s["uptime_s"] == 2.5
    jobs = {peer: fields for peer, t, fields in drain(d) if t == Frame.JOB}
    d.outcome(W1, jobs[W1][0], Status.OK, b"")
    d.remove_worker(W2)
    s = d.status()
    assert (s["queued"], s["running"]) == (2, 1)
    assert [(w["id"], w["state"], w["jobs_done"]) for w in s["workers"]] == [(W1, "busy", 1)]
    clients = {c["id"]: (c["submitted"], c["done"], c["queued"], c["running"]) for c in s["clients"]}
    assert clients == {C1: (3, 1, 2, 0), C2: (1, 0, 0, 1)}
    d.cancel(C2, 1)
    d.remove_client(C1)
    s = d.status()
    assert (s["queued"], s["running"]) == (0, 1)
    assert [c["id"] for c in s["clients"]] == [C2]


def counts(d):
    """(global queued, global running, {cid: (queued, running)}) from status(); the per-client queued
    counts must add up to the global one."""
    s = d.status()
    clients = {c["id"]: (c["queued"], c["running"]) for c in s["clients"]}
    assert sum(q for q, _ in clients.values()) == s["queued"]
    return s["queued"], s["running"], clients


def test_status_queued_counts_through_submit_dispatch_cancel_leave_and_lost_worker():
    """status()'s queued counts, global and per client, are right after each event that changes them."""
    d = Dispatcher(slots=1)
    client(d, C1)
    client(d, C2)
    submit(d, C1, 1, 2, 3)
    assert counts(d) == (3, 0, {C1: (3, 0), C2: (0, 0)})
    submit(d, C2, 1, 2)
    assert counts(d) == (5, 0, {C1: (3, 0), C2: (2, 0)})
    worker(d, W1)                                   # dispatches C1's job 1
    assert counts(d) == (4, 1, {C1: (2, 1), C2: (2, 0)})
    d.cancel(C1, 2)                                 # a queued job
    assert counts(d) == (3, 1, {C1: (1, 1), C2: (2, 0)})
    d.cancel(C1, 1)                                 # the running job: W1 stays busy until it reports
    assert counts(d) == (3, 1, {C1: (1, 0), C2: (2, 0)})
    worker(d, W2)                                   # dispatches C2's job 1
    assert counts(d) == (2, 2, {C1: (1, 0), C2: (1, 1)})
    jobs = {peer: fields for peer, t, fields in drain(d) if t == Frame.JOB}
    d.outcome(W1, jobs[W1][0], Status.OK, b"")           # aborted job's outcome, dropped; W1 takes C1's job 3
    assert counts(d) == (1, 2, {C1: (0, 1), C2: (1, 1)})
    d.remove_worker(W1)                             # C1's job 3 is re-queued
    assert counts(d) == (2, 1, {C1: (1, 0), C2: (1, 1)})
    d.remove_client(C2)                             # drops C2's job 2, aborts C2's job 1 on W2
    assert counts(d) == (1, 1, {C1: (1, 0)})
    d.outcome(W2, jobs[W2][0], Status.OK, b"")           # dropped; W2 takes C1's job 3
    assert counts(d) == (0, 1, {C1: (0, 1)})
    msgs = drain(d)
    assert [job[3] for job in of(msgs, Frame.JOB, W2)] == [payload(C1, 3)]
    d.outcome(W2, of(msgs, Frame.JOB, W2)[0][0], Status.OK, b"")
    assert counts(d) == (0, 0, {C1: (0, 0)})
    assert [fields[0] for fields in of(drain(d), Frame.RESULT, C1)] == [3]


def test_two_clients_all_jobs_complete_each_gets_only_its_results():
    """Interleaved jobs of two clients on two workers all finish; each client gets exactly its own results."""
    d = Dispatcher(slots=1)
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
            if ftype == Frame.RESULT:
                jobid, status, _, body = fields
                assert status == Status.OK and jobid not in results[peer]
                results[peer][jobid] = body
        running = [(peer, fields) for peer, ftype, fields in msgs if ftype == Frame.JOB]
        if not running:
            break
        for wid, (gid, _ctx, _timeout, job_payload) in running:
            d.outcome(wid, gid, Status.OK, b"done:" + job_payload)
    for cid in (C1, C2):
        assert results[cid] == {jobid: b"done:" + payload(cid, jobid) for jobid in range(10)}
    assert d.status()["queued"] == 0 and d.status()["running"] == 0


# --- slots (a held next job per worker) and work stealing --------------------



def jobs_by_worker(msgs):
    """[(worker, client jobid)] of the JOB frames, in the order sent (payload b"payload-<cid>-<jobid>")."""
    return [(to, int(fields[3].rsplit(b"-", 1)[1])) for to, t, fields in msgs if t == Frame.JOB]


def gids_by_jobid(msgs):
    """{client jobid: gid} of the JOB frames."""
    return {int(fields[3].rsplit(b"-", 1)[1]): fields[0] for _, t, fields in msgs if t == Frame.JOB}


def test_slots_two_queued_jobs_fill_idle_workers_first_then_one_held_each():
    """With 2 idle workers and 4 jobs becoming runnable at once, jobs 1 and 2 go one to each worker
    (idle first), then 3 and 4 one to each as held jobs; no worker is sent a third while it holds 2."""
    d = Dispatcher(slots=2)
    client(d, C1)
    worker(d, W1)
    worker(d, W2)
    d.pause_client(C1)
    submit(d, C1, 1, 2, 3, 4)
    assert of(drain(d), Frame.JOB) == []
    d.resume_client(C1)
    msgs = drain(d)
    assert jobs_by_worker(msgs) == [(W1, 1), (W2, 2), (W1, 3), (W2, 4)]
    gids = gids_by_jobid(msgs)
    submit(d, C1, 5, 6)
    worker(d, W3)                      # an idle worker takes a queued job; W1 and W2 get nothing
    msgs = drain(d)
    assert jobs_by_worker(msgs) == [(W3, 5), (W3, 6)]
    submit(d, C1, 7)
    assert of(drain(d), Frame.JOB) == []   # every worker holds 2
    d.outcome(W1, gids[1], Status.OK, b"")  # W1 runs 3 now, with a free slot: it takes 7 as held
    assert jobs_by_worker(drain(d)) == [(W1, 7)]
    d.outcome(W2, gids[2], Status.OK, b"")
    assert of(drain(d), Frame.JOB) == []   # nothing queued


def test_slots_two_jobs_submitted_to_busy_workers_are_sent_as_held_jobs():
    """Jobs submitted one by one while both workers run one get sent at once as held jobs, one to
    each, so neither worker waits a round trip for its next job; a third is never sent."""
    d = Dispatcher(slots=2)
    client(d, C1)
    worker(d, W1)
    worker(d, W2)
    submit(d, C1, 1, 2)
    assert jobs_by_worker(drain(d)) == [(W1, 1), (W2, 2)]
    submit(d, C1, 3, 4)
    assert jobs_by_worker(drain(d)) == [(W1, 3), (W2, 4)]
    submit(d, C1, 5)
    assert of(drain(d), Frame.JOB) == []


def test_slots_held_job_counts_as_queued_until_the_worker_reports_the_one_before():
    """status() counts a held job as queued, not running, globally and per client; it becomes
    running when the worker's outcome for the job before it arrives."""
    d = Dispatcher(slots=2)
    client(d, C1)
    client(d, C2)
    submit(d, C1, 1, 2, 3)
    submit(d, C2, 1)
    worker(d, W1)                      # C1's 1 runs, C2's 1 is held (the clients take turns)
    msgs = drain(d)
    jobs = [(fields[1], fields[3]) for fields in of(msgs, Frame.JOB, W1)]
    assert jobs == [(C1, payload(C1, 1)), (C2, payload(C2, 1))]
    gids = {(fields[1], fields[3]): fields[0] for fields in of(msgs, Frame.JOB, W1)}
    assert counts(d) == (3, 1, {C1: (2, 1), C2: (1, 0)})
    s = d.status()
    assert [(w["id"], w["state"], w["held"]) for w in s["workers"]] == [(W1, "busy", 1)]
    d.outcome(W1, gids[(C1, payload(C1, 1))], Status.OK, b"")   # C2's 1 runs, C1's 2 is held
    msgs = drain(d)
    assert [fields[3] for fields in of(msgs, Frame.JOB, W1)] == [payload(C1, 2)]
    assert counts(d) == (2, 1, {C1: (2, 0), C2: (0, 1)})
    d.outcome(W1, gids[(C2, payload(C2, 1))], Status.OK, b"")   # C1's 2 runs, C1's 3 is held
    assert [fields[3] for fields in of(drain(d), Frame.JOB, W1)] == [payload(C1, 3)]
    assert counts(d) == (1, 1, {C1: (1, 1), C2: (0, 0)})
    assert [(w["state"], w["held"]) for w in d.status()["workers"]] == [("busy", 1)]


@pytest.mark.parametrize("slots", [2, 3])
def test_slots_lost_worker_requeues_held_jobs_in_order_without_an_attempt(slots):
    """A worker lost while holding [running, held...] counts an attempt (and its label) for the
    running job only; the held ones go back to the head of the queue in the order they were sent,
    ahead of jobs still queued, and a job only ever held on dying workers never fails LOST."""
    d = Dispatcher(max_attempts=2, slots=slots)
    client(d, C1)
    submit(d, C1, *range(1, 7))
    labels = {}
    held = list(range(2, slots + 1))
    # Twice: job 1 runs and the next ones are held on a worker that dies.
    for wid in (W1, W2):
        labels[wid] = worker(d, wid).decode()
        assert jobs_by_worker(drain(d)) == [(wid, 1)] + [(wid, j) for j in held]
        d.remove_worker(wid)
    msgs = drain(d)
    assert [(jobid, status, json.loads(body)) for jobid, status, _, body in of(msgs, Frame.RESULT, C1)] == [
        (1, Status.LOST, {"attempts": 2, "workers": [labels[W1], labels[W2]]})]
    assert counts(d) == (5, 0, {C1: (5, 0)})
    # Job 2 was held on both dead workers: it has had no attempt yet, so it survives two more.
    for wid in (W3, 4):
        labels[wid] = worker(d, wid).decode()
        assert jobs_by_worker(drain(d)) == [(wid, j) for j in range(2, slots + 2)]
        d.remove_worker(wid)
    msgs = drain(d)
    assert [(jobid, status, json.loads(body)) for jobid, status, _, body in of(msgs, Frame.RESULT, C1)] == [
        (2, Status.LOST, {"attempts": 2, "workers": [labels[W3], labels[4]]})]
    worker(d, 5)
    assert jobs_by_worker(drain(d)) == [(5, j) for j in range(3, slots + 3)]


def test_slots_idle_worker_steals_held_job_given_back():
    """W1 holds [A running, B held]; W2 finishes its job and is idle with nothing queued: the
    dispatcher sends REVOKE(B) to W1, once; REVOKED(B, True) hands B to W2 at once."""
    d = Dispatcher(slots=2)
    client(d, C1)
    submit(d, C1, 1, 2, 3)
    worker(d, W1)
    worker(d, W2)
    msgs = drain(d)
    assert jobs_by_worker(msgs) == [(W1, 1), (W1, 2), (W2, 3)]
    gids = gids_by_jobid(msgs)
    assert of(msgs, Frame.REVOKE) == []    # W2 is not idle
    d.outcome(W2, gids[3], Status.OK, b"three")
    msgs = drain(d)
    assert of(msgs, Frame.RESULT, C1) == [(3, Status.OK, b"h2:102", b"three")]
    assert [(to, t, fields) for to, t, fields in msgs if t != Frame.RESULT] == [(W1, Frame.REVOKE, gids[2])]
    # Later events send no second REVOKE while the first awaits its answer.
    client(d, C2)
    worker(d, W3)
    d.remove_worker(W3)
    d.pause_client(C1)
    d.resume_client(C1)
    d.status()
    assert drain(d) == []
    d.revoked(W1, gids[2], True)
    msgs = drain(d)
    assert [t for _, t, _ in msgs] == [Frame.JOB] and jobs_by_worker(msgs) == [(W2, 2)]
    assert counts(d) == (0, 2, {C1: (0, 2), C2: (0, 0)})
    with pytest.raises(ProtocolError, match="not running"):
        d.outcome(W2, gids[2], Status.OK, b"two")     # the id of its first sending means nothing now
    d.outcome(W2, gids_by_jobid(msgs)[2], Status.OK, b"two")
    d.outcome(W1, gids[1], Status.OK, b"one")
    msgs = drain(d)
    assert of(msgs, Frame.RESULT, C1) == [(2, Status.OK, b"h2:102", b"two"), (1, Status.OK, b"h1:101", b"one")]
    assert of(msgs, Frame.REVOKE) == [] and of(msgs, Frame.JOB) == []


def test_slots_steal_refused_leaves_held_job_on_its_worker():
    """REVOKED(B, False) (B had started: its outcome follows, after A's) leaves B on W1: no other
    worker gets it, no second REVOKE goes out, and B's outcome is accepted later."""
    d = Dispatcher(slots=2)
    client(d, C1)
    submit(d, C1, 1, 2, 3)
    worker(d, W1)
    worker(d, W2)
    gids = gids_by_jobid(drain(d))
    d.outcome(W2, gids[3], Status.OK, b"three")
    assert of(drain(d), Frame.REVOKE, W1) == [gids[2]]
    d.outcome(W1, gids[1], Status.OK, b"one")
    d.revoked(W1, gids[2], False)
    msgs = drain(d)
    assert of(msgs, Frame.RESULT, C1) == [(1, Status.OK, b"h1:101", b"one")]
    assert of(msgs, Frame.JOB) == [] and of(msgs, Frame.REVOKE) == []
    assert counts(d) == (0, 1, {C1: (0, 1)})
    d.outcome(W1, gids[2], Status.OK, b"two")
    assert of(drain(d), Frame.RESULT, C1) == [(2, Status.OK, b"h1:101", b"two")]
    assert counts(d) == (0, 0, {C1: (0, 0)})


def test_slots_steal_refused_before_the_previous_outcome_arrives_is_not_asked_again():
    """The worker answers REVOKE from its reader thread while the outcome of the job before is still
    in its writer's queue, so REVOKED(B, False) may arrive before OUTCOME(A): B has started all
    the same, and the dispatcher must not send REVOKE(B) again."""
    d = Dispatcher(slots=2)
    client(d, C1)
    submit(d, C1, 1, 2, 3)
    worker(d, W1)
    worker(d, W2)
    gids = gids_by_jobid(drain(d))
    d.outcome(W2, gids[3], Status.OK, b"three")
    assert of(drain(d), Frame.REVOKE, W1) == [gids[2]]
    d.revoked(W1, gids[2], False)
    assert of(drain(d), Frame.REVOKE) == []
    d.outcome(W1, gids[1], Status.OK, b"one")
    d.outcome(W1, gids[2], Status.OK, b"two")
    msgs = drain(d)
    assert [fields[0] for fields in of(msgs, Frame.RESULT, C1)] == [1, 2]
    assert of(msgs, Frame.REVOKE) == [] and of(msgs, Frame.JOB) == []


def test_slots_cancel_held_job_aborts_it_and_the_worker_gives_it_back():
    """Cancelling a held job sends ABORT to its worker; REVOKED(gid, True) removes it without
    re-queueing it (no worker ever runs it, its client gets no result), and the worker's next
    job is the next queued one."""
    d = Dispatcher(slots=2)
    client(d, C1)
    submit(d, C1, 1, 2, 3)
    worker(d, W1)
    msgs = drain(d)
    assert jobs_by_worker(msgs) == [(W1, 1), (W1, 2)]
    gids = gids_by_jobid(msgs)
    d.cancel(C1, 2)
    assert sorted(drain(d)) == sorted([(C1, Frame.CANCELLED, (2, True)), (W1, Frame.ABORT, gids[2])])
    d.revoked(W1, gids[2], True)
    msgs = drain(d)
    assert jobs_by_worker(msgs) == [(W1, 3)]
    gids.update(gids_by_jobid(msgs))
    assert counts(d) == (1, 1, {C1: (1, 1)})   # job 3 held; job 2 is gone, not re-queued
    d.outcome(W1, gids[1], Status.OK, b"one")
    d.outcome(W1, gids[3], Status.OK, b"three")
    worker(d, W3)
    d.remove_worker(W1)
    msgs = drain(d)
    assert [fields[0] for fields in of(msgs, Frame.RESULT, C1)] == [1, 3]
    assert of(msgs, Frame.JOB) == []
    assert counts(d) == (0, 0, {C1: (0, 0)})


def test_slots_worker_giving_back_a_job_it_does_not_hold_raises():
    """REVOKED(gid, True) for another worker's job or for an unknown gid is a protocol error."""
    d = Dispatcher(slots=2)
    client(d, C1)
    submit(d, C1, 1, 2, 3)
    worker(d, W1)
    worker(d, W2)
    gids = gids_by_jobid(drain(d))     # W1: [1 running, 2 held], W2: [3 running]
    with pytest.raises(ProtocolError):
        d.revoked(W2, gids[2], True)
    with pytest.raises(ProtocolError):
        d.revoked(W1, 999, True)


def test_slots_the_worker_may_give_back_the_job_we_took_for_its_running_one():
    """Its outcome for job 1 arrives first, so job 2 looks running; but the worker had not started it
    when a REVOKE reached it: the give-back is accepted and job 2 runs elsewhere, no attempt counted."""
    d = Dispatcher(slots=2, max_attempts=1)
    client(d, C1)
    submit(d, C1, 1, 2)
    worker(d, W1)
    gids = gids_by_jobid(drain(d))     # W1: [1 running, 2 held]
    worker(d, W2)                      # idle: REVOKE(2) to W1
    assert of(drain(d), Frame.REVOKE, W1) == [gids[2]]
    d.outcome(W1, gids[1], Status.OK, b"")
    drain(d)
    d.revoked(W1, gids[2], True)
    assert jobs_by_worker(drain(d)) == [(W2, 2)]
    d.remove_worker(W2)                # it dies running job 2: the first real attempt, and the last
    results = of(drain(d), Frame.RESULT, C1)
    assert [(r[0], r[1]) for r in results] == [(2, Status.LOST)]
    assert json.loads(bytes(results[0][3]))["attempts"] == 1


def test_slots_one_never_sends_a_second_job_or_revoke():
    """With slots=1 a busy worker is never sent another job and nothing is ever revoked."""
    d = Dispatcher(slots=1)
    client(d, C1)
    worker(d, W1)
    worker(d, W2)
    d.pause_client(C1)
    submit(d, C1, 1, 2, 3, 4)
    d.resume_client(C1)
    msgs = drain(d)
    assert jobs_by_worker(msgs) == [(W1, 1), (W2, 2)]
    gids = gids_by_jobid(msgs)
    submit(d, C1, 5)
    assert of(drain(d), Frame.JOB) == []
    d.outcome(W2, gids[2], Status.OK, b"")
    msgs = drain(d)
    assert jobs_by_worker(msgs) == [(W2, 3)]
    gids.update(gids_by_jobid(msgs))
    d.outcome(W2, gids[3], Status.OK, b"")
    msgs = drain(d)
    assert jobs_by_worker(msgs) == [(W2, 4)]
    gids.update(gids_by_jobid(msgs))
    d.outcome(W2, gids[4], Status.OK, b"")
    msgs = drain(d)
    assert jobs_by_worker(msgs) == [(W2, 5)]
    gids.update(gids_by_jobid(msgs))
    d.outcome(W2, gids[5], Status.OK, b"")  # W2 idle, W1 still runs 1, nothing queued
    worker(d, W3)
    msgs = drain(d)
    assert of(msgs, Frame.JOB) == [] and of(msgs, Frame.REVOKE) == []
    assert counts(d) == (0, 1, {C1: (0, 1)})


def test_slots_draining_worker_keeps_its_held_job_until_it_leaves():
    """A draining worker gets no new job and keeps its held job; when it disconnects while running
    its job, the held job goes back to the head of the queue with no attempt counted."""
    d = Dispatcher(slots=2)
    client(d, C1)
    submit(d, C1, 1)
    submit(d, C1, 2, retries=0)        # one attempt allowed: counting one would fail it LOST
    submit(d, C1, 3)
    worker(d, W1)
    gids = gids_by_jobid(drain(d))
    assert sorted(gids) == [1, 2]
    d.drain_worker(W1, [gids[1]])
    worker(d, W2)                      # takes the queued job 3, not W1's held job
    msgs = drain(d)
    assert jobs_by_worker(msgs) == [(W2, 3)]
    gids.update(gids_by_jobid(msgs))
    d.outcome(W2, gids[3], Status.OK, b"")
    assert of(drain(d), Frame.JOB) == []
    d.remove_worker(W1)                # lost running job 1: an attempt; job 2 was only held
    msgs = drain(d)
    assert of(msgs, Frame.RESULT) == []
    assert jobs_by_worker(msgs) == [(W2, 1), (W2, 2)]
    gids.update(gids_by_jobid(msgs))
    d.outcome(W2, gids[1], Status.OK, b"")
    d.outcome(W2, gids[2], Status.OK, b"two")
    assert of(drain(d), Frame.RESULT, C1) == [(1, Status.OK, b"h2:102", b""), (2, Status.OK, b"h2:102", b"two")]


def test_slots_draining_worker_gets_no_job_into_its_free_slot():
    """Once a draining worker reports its running job, its free slot is not filled: queued jobs
    wait for other workers."""
    d = Dispatcher(slots=2)
    client(d, C1)
    submit(d, C1, 1, 2, 3)
    worker(d, W1)
    gids = gids_by_jobid(drain(d))
    assert sorted(gids) == [1, 2]
    d.drain_worker(W1, [gids[1]])
    d.outcome(W1, gids[1], Status.OK, b"one")
    msgs = drain(d)
    assert of(msgs, Frame.RESULT, C1) == [(1, Status.OK, b"h1:101", b"one")]
    assert of(msgs, Frame.JOB) == []
    worker(d, W2)
    assert jobs_by_worker(drain(d)) == [(W2, 3)]

def test_slots_draining_worker_leaving_after_its_last_outcome_requeues_held_job_without_an_attempt():
    """A draining worker reports its running job, then disconnects without starting its held job:
    that job was never run, so it is re-queued with no attempt counted (not failed LOST)."""
    d = Dispatcher(slots=2)
    client(d, C1)
    submit(d, C1, 1)
    submit(d, C1, 2, retries=0)
    worker(d, W1)
    gids = gids_by_jobid(drain(d))
    d.drain_worker(W1, [gids[1]])
    d.outcome(W1, gids[1], Status.OK, b"one")
    msgs = drain(d)
    assert of(msgs, Frame.RESULT, C1) == [(1, Status.OK, b"h1:101", b"one")]
    assert of(msgs, Frame.JOB) == []
    d.remove_worker(W1)
    assert drain(d) == []
    assert counts(d) == (1, 0, {C1: (1, 0)})
    worker(d, W2)
    msgs = drain(d)
    assert jobs_by_worker(msgs) == [(W2, 2)]
    d.outcome(W2, gids_by_jobid(msgs)[2], Status.OK, b"two")
    assert of(drain(d), Frame.RESULT, C1) == [(2, Status.OK, b"h2:102", b"two")]


def test_a_job_that_crossed_a_drain_goes_back_without_an_attempt():
    """The master sends a JOB as the worker says DRAIN, having started
    nothing; the worker is gone before it reads the JOB.  The job was never
    run: it goes back to its queue, and even a job that may run only once
    runs (found by tests/test_simulator.py: it used to fail as LOST)."""
    d = Dispatcher(slots=1)
    client(d, C1)
    worker(d, W1)
    submit(d, C1, 1, retries=0)
    assert jobs_by_worker(drain(d)) == [(W1, 1)]
    d.drain_worker(W1, [])               # it had started nothing when it said DRAIN
    d.remove_worker(W1)
    assert of(drain(d), Frame.RESULT) == []
    worker(d, W2)
    assert jobs_by_worker(drain(d)) == [(W2, 1)]
