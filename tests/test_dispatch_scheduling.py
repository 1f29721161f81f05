"""Unit tests of the scheduling rules of cw.master.dispatch.Dispatcher (issue 6): priorities, weighted fair
share, resources and GPU ids, reservation for big jobs, unplaceable jobs, tag limits, placement on
named workers, lending a worker while its job waits, and what status() says about all of it.

Pure calls, no sockets: the outbox is decoded with cw.wire.frames, as in tests/test_dispatch.py."""
from __future__ import annotations

import json
from collections import deque

import pytest
from test_dispatch import drain, of, payload  # the same outbox decoding

from cw.errors import ProtocolError
from cw.master.dispatch import DEFAULT_RETRIES, Dispatcher
from cw.wire import options as job_options
from cw.wire.frames import Frame, Status

C1, C2, C3 = 101, 102, 103       # client peer ids
W1, W2, W3, W4, W5 = 1, 2, 3, 4, 5   # worker peer ids
GIB = 1 << 30

# --- helpers ---------------------------------------------------------------------

class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def who(job_payload):
    """(cid, jobid) back from a payload made by payload()."""
    _, cid, jobid = bytes(job_payload).split(b"-")
    return int(cid), int(jobid)


def sent(msgs):
    """[(worker, cid, jobid)] of the JOB frames, in the order sent."""
    return [(to, *who(fields[3])) for to, t, fields in msgs if t == Frame.JOB]


def gids(msgs):
    """{(cid, jobid): gid} of the JOB frames."""
    return {who(fields[3]): fields[0] for _, t, fields in msgs if t == Frame.JOB}


def envs(msgs):
    """{gid: env} of the JOB_ENV frames."""
    return dict(of(msgs, Frame.JOB_ENV))


def client(d, cid, weight=None):
    info = {"host": "c", "pid": cid}
    if weight is not None:
        info["weight"] = weight
    d.add_client(cid, info)


def worker(d, wid, **info):
    """A worker h<wid>:<100+wid>; ``info`` adds node, resources, gpu_ids."""
    d.add_worker(wid, {"host": f"h{wid}", "pid": 100 + wid, **info})
    return f"h{wid}:{100 + wid}".encode()


def options(resources=None, tag=None, workers=None):
    """The options dict the master would get: checked by cw.wire.options.check_submitted (it adds cpu=1)."""
    raw = {}
    if resources is not None:
        raw["resources"] = dict(resources)
    if tag is not None:
        raw["tag"] = tag
    if workers is not None:
        raw["workers"] = list(workers)
    return job_options.check_submitted(raw) or None


def submit(d, cid, *jobids, priority=0, retries=DEFAULT_RETRIES, resources=None, tag=None, workers=None):
    for jobid in jobids:
        d.submit(cid, jobid, retries, 0.0, payload(cid, jobid), priority, options(resources, tag, workers))


class Run:
    """Plays the workers: keeps what each was sent, in order, and finishes jobs on request.

    ``order`` lists (worker, cid, jobid) of every JOB frame seen, ``env`` the JOB_ENV of each job."""

    def __init__(self, d):
        self.d = d
        self.order = []
        self.env = {}
        self.gid = {}
        self.at = {}                 # wid -> deque of (cid, jobid) sent to it and not finished
        self.results = []            # (cid, jobid, status)
        self.notices = []            # (cid, jobid)
        self.collect()

    def collect(self):
        msgs = drain(self.d)
        by_gid = envs(msgs)
        for to, t, fields in msgs:
            if t == Frame.JOB:
                key = who(fields[3])
                self.order.append((to, *key))
                self.gid[key] = fields[0]
                self.env[key] = by_gid.get(fields[0])
                self.at.setdefault(to, deque()).append(key)
            elif t == Frame.RESULT:
                self.results.append((to, fields[0], fields[1]))
            elif t == Frame.NOTICE:
                self.notices.append((to, fields[0]))
        return msgs

    def running(self, wid):
        jobs = self.at.get(wid)
        return jobs[0] if jobs else None

    def finish(self, wid, key=None, status=Status.OK):
        """Worker wid reports its running job (or the job ``key`` it runs while lent)."""
        jobs = self.at[wid]
        key = jobs[0] if key is None else key
        jobs.remove(key)
        self.d.outcome(wid, self.gid[key], status, b"")
        return self.collect()

    def finish_oldest(self):
        """Finishes the job sent first of those still out (always the running one of its worker)."""
        for wid, cid, jobid in self.order:
            if (cid, jobid) in self.at.get(wid, ()):
                return self.finish(wid, (cid, jobid))
        raise AssertionError("no job is out")

    def until(self, n):
        """Finishes jobs, oldest first, until n JOB frames were seen; returns the order so far."""
        while len(self.order) < n:
            self.finish_oldest()
        return self.order[:n]


def status_clients(d):
    return {c["id"]: c for c in d.status()["clients"]}


def status_workers(d):
    return {w["id"]: w for w in d.status()["workers"]}


# --- 1. priorities -----------------------------------------------------------------

@pytest.mark.parametrize("slots", [1, 2])
def test_higher_priority_first_fifo_among_equal_priorities(slots):
    """Jobs of one client go highest priority first, and in submission order among equal priorities."""
    d = Dispatcher(slots=slots)
    client(d, C1)
    for jobid, priority in [(1, 0), (2, 5), (3, 0), (4, 5), (5, 1), (6, -3), (7, 5)]:
        submit(d, C1, jobid, priority=priority)
    worker(d, W1)
    run = Run(d)
    assert [jobid for _, _, jobid in run.until(7)] == [2, 4, 7, 5, 1, 3, 6]


def test_priority_orders_jobs_across_a_clients_queues_of_different_shapes():
    """A client's tagged (or resource) jobs and plain jobs sit in different queues; the most urgent head
    of all of them goes first, and the older one among equal priorities."""
    d = Dispatcher(slots=1)
    client(d, C1)
    submit(d, C1, 1)
    submit(d, C1, 2, tag="t")
    submit(d, C1, 3, priority=4)
    submit(d, C1, 4, tag="t", priority=9)
    submit(d, C1, 5, resources={"mem": 10})
    submit(d, C1, 6, tag="t", priority=4)
    worker(d, W1, resources={"cpu": 1, "mem": 100})
    run = Run(d)
    assert [jobid for _, _, jobid in run.until(6)] == [4, 3, 6, 1, 2, 5]


def test_lost_job_goes_back_to_the_head_of_its_own_priority():
    """A job lost with its worker is re-queued first among the jobs of its priority: behind jobs of a
    higher priority, ahead of those of its own and of lower ones."""
    d = Dispatcher(slots=1)
    client(d, C1)
    worker(d, W1)
    worker(d, W2)
    submit(d, C1, 1, 2, priority=1)
    run = Run(d)
    assert run.order == [(W1, C1, 1), (W2, C1, 2)]
    submit(d, C1, 3, priority=1)
    submit(d, C1, 4, priority=5)
    submit(d, C1, 5, priority=0)
    d.remove_worker(W2)                    # job 2 (priority 1) is lost: back to the head of priority 1
    del run.at[W2]
    assert run.collect() == []
    run.finish(W1)
    assert [jobid for _, _, jobid in run.until(6)] == [1, 2, 4, 2, 3, 5]


def test_a_clients_priorities_do_not_let_it_jump_another_clients_turn():
    """C1's urgent jobs go at C1's next turns, not before C2's turn that was due first, and each of them
    uses up a turn of C1 like any other job."""
    d = Dispatcher(slots=1)
    client(d, C1)
    client(d, C2)
    worker(d, W1)
    submit(d, C1, 1, 2, 3)
    submit(d, C2, 1, 2, 3, 4)
    submit(d, C1, 9, 10, priority=100)
    run = Run(d)
    assert [(cid, jobid) for _, cid, jobid in run.until(9)] == [
        (C1, 1), (C2, 1), (C1, 9), (C2, 2), (C1, 10), (C2, 3), (C1, 2), (C2, 4), (C1, 3)]


# --- 2. weighted fair share -------------------------------------------------------------

@pytest.mark.parametrize("slots", [1, 2])
def test_weights_two_to_one_split_thirty_dispatches_twenty_to_ten(slots):
    """Client weights 2 and 1, both with plenty queued, one worker: 30 dispatches split 20/10 (within one),
    and neither client waits more than two turns of the other in a row."""
    d = Dispatcher(slots=slots)
    client(d, C1, weight=2.0)
    client(d, C2, weight=1.0)
    submit(d, C1, *range(60))
    submit(d, C2, *range(60))
    worker(d, W1)
    first = [cid for _, cid, _ in Run(d).until(30)]
    assert 19 <= first.count(C1) <= 21
    assert 9 <= first.count(C2) <= 11
    runs = "".join("a" if cid == C1 else "b" for cid in first)
    assert "aaaa" not in runs and "bb" not in runs


def test_weights_split_also_with_three_clients_on_two_workers():
    """Weights 3, 2 and 1 over 60 dispatches on two workers: 30/20/10 (within two each)."""
    d = Dispatcher(slots=1)
    for cid, weight in ((C1, 3), (C2, 2), (C3, 1)):
        client(d, cid, weight=weight)
        submit(d, cid, *range(80))
    worker(d, W1)
    worker(d, W2)
    first = [cid for _, cid, _ in Run(d).until(60)]
    assert abs(first.count(C1) - 30) <= 2
    assert abs(first.count(C2) - 20) <= 2
    assert abs(first.count(C3) - 10) <= 2


def test_client_back_after_a_long_pause_gets_no_burst_of_catch_up_turns():
    """C2 ran one job, then had nothing queued while C1 ran 30; when C2 queues again it alternates with
    C1 at once (its clock starts at the current one), instead of taking ~30 turns in a row."""
    d = Dispatcher(slots=1)
    client(d, C1)
    client(d, C2)
    worker(d, W1)
    submit(d, C2, 0)
    run = Run(d)
    run.finish(W1)
    submit(d, C1, *range(100))
    run.collect()
    run.until(31)
    assert all(cid == C1 for _, cid, _ in run.order[1:31])
    submit(d, C2, *range(1, 21))
    after = [cid for _, cid, _ in run.until(41)[31:]]
    assert after.count(C2) in (5, 6)
    assert "".join("a" if cid == C1 else "b" for cid in after) in ("ababababab", "bababababa")


def test_weight_outside_the_accepted_range_counts_as_one():
    """A weight that is not a positive number up to 1e6 is taken as 1 (and status says so)."""
    d = Dispatcher(slots=1)
    client(d, C1, weight=-2)
    client(d, C2, weight="heavy")
    client(d, C3, weight=4)
    assert {cid: c["weight"] for cid, c in status_clients(d).items()} == {C1: 1.0, C2: 1.0, C3: 4.0}


# --- 3. resources ---------------------------------------------------------------------

def test_first_fit_goes_to_the_first_idle_worker_whose_machine_has_room():
    """A cpu=2 job skips the idle workers on too small machines and goes to the first that fits, in the
    order the workers became idle; a plain job still takes the first idle worker."""
    d = Dispatcher(slots=1)
    client(d, C1)
    worker(d, W1)                                        # offers cpu=1 on a machine of its own
    worker(d, W2, node="a", resources={"cpu": 1, "mem": 64 * GIB})
    worker(d, W3, node="b", resources={"cpu": 4})
    worker(d, W4, node="c", resources={"cpu": 4})
    submit(d, C1, 1, resources={"cpu": 2})
    submit(d, C1, 2, resources={"cpu": 2})
    submit(d, C1, 3)
    run = Run(d)
    assert run.order == [(W3, C1, 1), (W4, C1, 2), (W1, C1, 3)]


def test_workers_sharing_a_node_never_run_more_plain_jobs_than_its_cpus():
    """Three worker processes on node n1 (cpu=2): two plain jobs run, the third waits although a process
    is idle, and starts as soon as one of the two ends."""
    d = Dispatcher(slots=1)
    client(d, C1)
    for wid in (W1, W2, W3):
        worker(d, wid, node="n1", resources={"cpu": 2})
    submit(d, C1, 1, 2, 3)
    run = Run(d)
    assert run.order == [(W1, C1, 1), (W2, C1, 2)]
    assert status_workers(d)[W3]["state"] == "idle"
    run.finish(W2)
    assert run.order[2:] == [(W3, C1, 3)]


def test_workers_sharing_a_node_with_slots_hold_the_extra_plain_job_behind_a_running_one():
    """With slots=2 the third plain job on a cpu=2 node is sent ahead to a process that runs one (it
    costs the node nothing more), never to the node's third, idle process."""
    d = Dispatcher(slots=2)
    client(d, C1)
    for wid in (W1, W2, W3):
        worker(d, wid, node="n1", resources={"cpu": 2})
    submit(d, C1, 1, 2, 3, 4, 5)
    run = Run(d)
    assert run.order == [(W1, C1, 1), (W2, C1, 2), (W1, C1, 3), (W2, C1, 4)]
    run.finish(W1)                       # W1 starts job 3: the node still runs two jobs
    assert run.order[4:] == [(W1, C1, 5)]
    assert W3 not in run.at


@pytest.mark.parametrize("slots", [1, 2])
def test_a_job_taking_all_of_a_nodes_cpus_keeps_its_other_processes_from_plain_jobs(slots):
    """While a cpu=2 job runs on node n1 (cpu=2), n1's other process gets no plain job; with slots=2 a
    plain job may wait behind the big one on its own process."""
    d = Dispatcher(slots=slots)
    client(d, C1)
    worker(d, W1, node="n1", resources={"cpu": 2})
    worker(d, W2, node="n1", resources={"cpu": 2})
    submit(d, C1, 1, resources={"cpu": 2})
    submit(d, C1, 2, 3)
    run = Run(d)
    if slots == 1:
        assert run.order == [(W1, C1, 1)]
    else:
        assert run.order == [(W1, C1, 1), (W1, C1, 2)]
    assert W2 not in run.at
    run.finish(W1)
    if slots == 1:                        # both processes free: jobs 2 and 3 run, one on each
        assert sorted(jobid for _, _, jobid in run.order[1:]) == [2, 3]
        assert {wid for wid, _, _ in run.order[1:]} == {W1, W2}
    else:                                 # W1 starts job 2; W2 (idle) takes 3
        assert run.order[2:] == [(W2, C1, 3)]


def test_memory_in_bytes_limits_how_many_jobs_share_a_node():
    """Node n1 offers 4 CPUs and 16 GiB: two jobs of 8 GiB run, a third waits while a process and CPUs
    are idle, and runs when one ends; each job is told its memory in bytes."""
    d = Dispatcher(slots=1)
    client(d, C1)
    for wid in (W1, W2, W3):
        worker(d, wid, node="n1", resources={"cpu": 4, "mem": 16 * GIB})
    submit(d, C1, 1, 2, 3, resources={"mem": 8 * GIB})
    run = Run(d)
    assert run.order == [(W1, C1, 1), (W2, C1, 2)]
    assert run.env[(C1, 1)] == {"CW_JOB_CPUS": "1", "CW_JOB_MEM": str(8 * GIB)}
    run.finish(W1)
    assert [jobid for _, _, jobid in run.order[2:]] == [3]
    assert run.env[(C1, 3)] == {"CW_JOB_CPUS": "1", "CW_JOB_MEM": str(8 * GIB)}


def test_job_env_comes_just_before_its_job_with_cpus_and_memory():
    """A job that asks for resources is preceded by a JOB_ENV of the same gid telling it its CPUs and
    memory; a machine without GPUs says nothing about CUDA; a plain job there gets no JOB_ENV at all."""
    d = Dispatcher(slots=1)
    client(d, C1)
    worker(d, W1, node="n1", resources={"cpu": 8, "mem": 32 * GIB})
    worker(d, W2, node="n1", resources={"cpu": 8, "mem": 32 * GIB})
    submit(d, C1, 1, resources={"cpu": 3, "mem": 1536 * (1 << 20)})
    submit(d, C1, 2)
    msgs = drain(d)
    assert [(to, t) for to, t, _ in msgs] == [(W1, Frame.CONTEXT), (W1, Frame.JOB_ENV), (W1, Frame.JOB),
                                              (W2, Frame.CONTEXT), (W2, Frame.JOB)]
    (gid, env), = of(msgs, Frame.JOB_ENV)
    assert gid == gids(msgs)[(C1, 1)]
    assert env == {"CW_JOB_CPUS": "3", "CW_JOB_MEM": str(1536 * (1 << 20))}


def test_gpu_jobs_get_distinct_gpu_ids_which_come_back_when_they_end():
    """Node n1 has GPUs "0" and "1" and three processes: two gpu=1 jobs get "0" and "1", a third waits
    though a process is idle; when the job on "0" ends, the waiting job gets "0"; a gpu=2 job gets both
    once they are free."""
    d = Dispatcher(slots=1)
    client(d, C1)
    for wid in (W1, W2, W3):
        worker(d, wid, node="n1", resources={"cpu": 3, "gpu": 2}, gpu_ids=["0", "1"])
    submit(d, C1, 1, 2, 3, resources={"gpu": 1})
    submit(d, C1, 4, resources={"gpu": 2})
    run = Run(d)
    assert run.order == [(W1, C1, 1), (W2, C1, 2)]
    assert run.env[(C1, 1)]["CUDA_VISIBLE_DEVICES"] == "0"
    assert run.env[(C1, 2)]["CUDA_VISIBLE_DEVICES"] == "1"
    assert run.env[(C1, 1)]["CW_JOB_CPUS"] == "1"
    run.finish(W1)
    assert run.order[2:] == [(W3, C1, 3)]
    assert run.env[(C1, 3)]["CUDA_VISIBLE_DEVICES"] == "0"
    run.finish(W2)
    run.finish(W3)
    assert len(run.order) == 4 and run.order[3][2] == 4
    assert run.env[(C1, 4)]["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_gpu_ids_are_the_ones_the_worker_declared():
    """CUDA_VISIBLE_DEVICES names the ids of the worker's gpu_ids, not indices."""
    d = Dispatcher(slots=1)
    client(d, C1)
    worker(d, W1, node="n1", resources={"cpu": 2, "gpu": 2}, gpu_ids=["3", "7"])
    worker(d, W2, node="n1", resources={"cpu": 2, "gpu": 2}, gpu_ids=["3", "7"])
    submit(d, C1, 1, 2, resources={"gpu": 1})
    run = Run(d)
    assert sorted(env["CUDA_VISIBLE_DEVICES"] for env in run.env.values()) == ["3", "7"]


def test_plain_job_on_a_gpu_node_gets_an_empty_cuda_visible_devices():
    """A plain job on a machine with GPUs is told it has none (CUDA_VISIBLE_DEVICES=""), also while a GPU
    job runs beside it, and is not given CW_JOB_* variables."""
    d = Dispatcher(slots=1)
    client(d, C1)
    worker(d, W1, node="g", resources={"cpu": 2, "gpu": 1}, gpu_ids=["0"])
    worker(d, W2, node="g", resources={"cpu": 2, "gpu": 1}, gpu_ids=["0"])
    submit(d, C1, 1, resources={"gpu": 1})
    submit(d, C1, 2)
    run = Run(d)
    assert run.order == [(W1, C1, 1), (W2, C1, 2)]
    assert run.env[(C1, 1)] == {"CUDA_VISIBLE_DEVICES": "0", "CW_JOB_CPUS": "1"}
    assert run.env[(C1, 2)] == {"CUDA_VISIBLE_DEVICES": ""}


def test_prefetch_sends_a_plain_job_ahead_but_a_resource_job_only_to_an_idle_worker():
    """slots=2: a worker running a job is sent the next plain job ahead, but a job asking for resources
    waits until the worker is idle, even though its machine has room."""
    d = Dispatcher(slots=2)
    client(d, C1)
    client(d, C2)
    worker(d, W1, resources={"cpu": 4})
    submit(d, C1, 1, 2)
    run = Run(d)
    assert run.order == [(W1, C1, 1), (W1, C1, 2)]
    run.finish(W1)                        # W1 runs 2 and has a slot free
    submit(d, C2, 1, resources={"cpu": 2})
    run.collect()
    assert len(run.order) == 2
    run.finish(W1)
    assert run.order[2:] == [(W1, C2, 1)]
    assert run.env[(C2, 1)] == {"CW_JOB_CPUS": "2"}


def test_worker_without_declared_resources_offers_one_cpu_on_a_machine_of_its_own():
    """Two workers with no "resources" and no node: each runs a plain job (they do not share one CPU),
    and neither can ever run a cpu=2 job (status shows {"cpu": 1})."""
    d = Dispatcher(slots=1)
    client(d, C1)
    worker(d, W1)
    worker(d, W2)
    submit(d, C1, 1, 2)
    run = Run(d)
    assert sorted(run.order) == [(W1, C1, 1), (W2, C1, 2)]
    assert [w["resources"] for w in d.status()["workers"]] == [{"cpu": 1}, {"cpu": 1}]


# --- 4. reservation --------------------------------------------------------------------

@pytest.mark.parametrize("slots", [1, 2])
def test_big_job_is_not_starved_by_a_stream_of_plain_jobs(slots):
    """Node n1 (cpu=2, two processes) runs C2's plain jobs, with many more queued, when C1 queues a
    cpu=2 job: once the running ones end, the big job starts before any queued plain job, and while it
    runs, no plain job starts on the node's other process."""
    d = Dispatcher(slots=slots)
    client(d, C1)
    client(d, C2)
    worker(d, W1, node="n1", resources={"cpu": 2})
    worker(d, W2, node="n1", resources={"cpu": 2})
    submit(d, C2, *range(1, 21))
    run = Run(d)
    out = 2 * slots                        # C2's jobs already at the workers
    assert len(run.order) == out
    submit(d, C1, 1, resources={"cpu": 2})
    run.collect()
    order = run.until(out + 1)
    assert order[out][1:] == (C1, 1)
    # The big job runs alone: the node's other process starts nothing until it ends.
    big_on = order[out][0]
    other = W2 if big_on == W1 else W1
    assert run.running(other) is None
    while run.running(big_on) != (C1, 1):
        run.finish(big_on)
    assert run.running(other) is None
    run.finish(big_on)
    assert run.running(other) is not None
    run.until(21)
    assert sorted(jobid for _, cid, jobid in run.order if cid == C2) == list(range(1, 21))


def test_big_job_of_the_same_client_is_not_starved_by_its_later_plain_jobs():
    """The same with one client whose cpu=2 job is queued before more of its plain jobs."""
    d = Dispatcher(slots=1)
    client(d, C1)
    worker(d, W1, node="n1", resources={"cpu": 2})
    worker(d, W2, node="n1", resources={"cpu": 2})
    submit(d, C1, 1, 2)
    submit(d, C1, 3, resources={"cpu": 2})
    submit(d, C1, 4, 5, 6)
    run = Run(d)
    run.finish(W1)                         # one CPU free: job 3 cannot start, and job 4 may not take it
    assert len(run.order) == 2
    run.finish(W2)
    assert run.order[2:] == [(W1, C1, 3)]
    run.finish(W1)
    assert sorted(jobid for _, _, jobid in run.order[3:]) == [4, 5]


def test_reservation_does_not_stop_plain_jobs_on_other_nodes():
    """A node kept for a big job does not hold back plain jobs on another machine."""
    d = Dispatcher(slots=1)
    client(d, C1)
    client(d, C2)
    worker(d, W1, node="n1", resources={"cpu": 2})
    worker(d, W2, node="n1", resources={"cpu": 2})
    worker(d, W3, node="n2", resources={"cpu": 1})
    submit(d, C2, 1, 2, 3)
    run = Run(d)
    submit(d, C1, 1, resources={"cpu": 2})
    submit(d, C2, 4, 5)
    run.collect()
    run.finish(W3)
    assert run.order[3:] == [(W3, C2, 4)]   # n2's process keeps taking plain jobs
    run.finish(W1)
    assert len(run.order) == 4              # n1 is kept for the big job
    run.finish(W2)
    assert run.order[4][1:] == (C1, 1)


# --- 5. unplaceable jobs -------------------------------------------------------------------

def test_unplaceable_job_gets_one_notice_per_kind_is_listed_waiting_and_fails_after_the_timeout():
    """Jobs asking more than any connected machine offers: one NOTICE per kind of job (two cpu=8 jobs,
    one notice; a gpu job, another), both kinds listed in status()["waiting"], and after
    unplaceable_timeout, expire() fails each with UNPLACEABLE (reason and seconds waited); a plain job
    of the same client runs meanwhile."""
    clock = Clock()
    d = Dispatcher(slots=1, clock=clock, unplaceable_timeout=30)
    client(d, C1)
    worker(d, W1, resources={"cpu": 4})
    submit(d, C1, 1, 2, resources={"cpu": 8})
    submit(d, C1, 3, resources={"gpu": 1})
    submit(d, C1, 4)
    run = Run(d)
    assert [jobid for _, jobid in run.notices] == [1, 3]
    assert run.order == [(W1, C1, 4)]
    waiting = d.status()["waiting"]
    assert sorted((w["client"], w["count"]) for w in waiting) == [(C1, 1), (C1, 2)]
    assert any("cpu=8" in w["reason"] for w in waiting)
    clock.now += 29
    d.expire()
    run.collect()
    assert run.results == []
    assert {w["since_s"] for w in d.status()["waiting"]} == {29.0}
    clock.now += 1
    d.expire()
    msgs = run.collect()
    results = of(msgs, Frame.RESULT, C1)
    assert sorted((jobid, status) for jobid, status, _, _ in results) == [
        (1, Status.UNPLACEABLE), (2, Status.UNPLACEABLE), (3, Status.UNPLACEABLE)]
    for jobid, _, _, body in results:
        info = json.loads(bytes(body))
        assert info["waited"] == 30.0
        assert ("cpu=8" if jobid < 3 else "gpu=1") in info["reason"]
    assert d.status()["waiting"] == []
    assert d.status()["queued"] == 0
    assert status_clients(d)[C1]["failed"] == 3
    run.finish(W1)
    assert [(jobid, status) for _, jobid, status in run.results[-1:]] == [(4, Status.OK)]


def test_notice_text_says_what_the_job_needs_and_what_is_offered():
    """The NOTICE goes to the submitting client only and names the need and a machine's offer."""
    d = Dispatcher(slots=1, unplaceable_timeout=12)
    client(d, C1)
    client(d, C2)
    worker(d, W1, resources={"cpu": 4})
    submit(d, C1, 7, resources={"cpu": 16})
    msgs = drain(d)
    assert [(to, t) for to, t, _ in msgs] == [(C1, Frame.NOTICE)]
    (jobid, text), = of(msgs, Frame.NOTICE)
    assert jobid == 7 and "cpu=16" in text and "cpu=4" in text and "12" in text


def test_unplaceable_job_runs_if_a_worker_that_fits_joins_before_the_timeout():
    """A worker big enough joining before unplaceable_timeout runs the job; expire() later fails nothing."""
    clock = Clock()
    d = Dispatcher(slots=1, clock=clock, unplaceable_timeout=30)
    client(d, C1)
    worker(d, W1)
    submit(d, C1, 1, resources={"cpu": 8})
    run = Run(d)
    assert [jobid for _, jobid in run.notices] == [1] and run.order == []
    clock.now += 20
    worker(d, W2, resources={"cpu": 8})
    run.collect()
    assert run.order == [(W2, C1, 1)]
    clock.now += 100
    d.expire()
    run.collect()
    assert run.results == []
    run.finish(W2)
    assert run.results == [(C1, 1, Status.OK)]


def test_job_that_fits_a_busy_worker_gets_no_notice_and_never_expires():
    """A cpu=2 job waiting only because the one machine that fits is busy is not unplaceable."""
    clock = Clock()
    d = Dispatcher(slots=1, clock=clock, unplaceable_timeout=10)
    client(d, C1)
    worker(d, W1, resources={"cpu": 2})
    worker(d, W2)
    submit(d, C1, 1)
    submit(d, C1, 2, resources={"cpu": 2})
    run = Run(d)
    assert run.order == [(W1, C1, 1)]
    clock.now += 100
    d.expire()
    run.collect()
    assert run.notices == [] and run.results == [] and d.status()["waiting"] == []
    run.finish(W1)
    assert run.order[1:] == [(W1, C1, 2)]


def test_unplaceable_jobs_of_one_client_do_not_hold_back_other_clients():
    """C1's unplaceable job blocks neither C1's other jobs nor C2's."""
    d = Dispatcher(slots=1)
    client(d, C1)
    client(d, C2)
    worker(d, W1)
    submit(d, C1, 1, resources={"cpu": 2})
    submit(d, C2, 1, 2)
    submit(d, C1, 2)
    run = Run(d)
    run.until(3)
    assert sorted(run.order) == [(W1, C1, 2), (W1, C2, 1), (W1, C2, 2)]


# --- 6. tag limits ---------------------------------------------------------------------------

def counts_by_tag(run, tagged):
    """How many jobs in ``tagged`` (a set of (cid, jobid)) are at workers now."""
    return sum(1 for jobs in run.at.values() for key in jobs if key in tagged)


def test_tag_limit_caps_running_tagged_jobs_across_clients():
    """Limit 2 on "db": at most 2 jobs tagged "db" are at workers at once, whichever client sent them,
    while untagged jobs take the other idle workers; each end lets exactly one more tagged job go."""
    d = Dispatcher(slots=1)
    d.set_limit("db", 2)
    client(d, C1)
    client(d, C2)
    for wid in (W1, W2, W3, W4, W5):
        worker(d, wid)
    submit(d, C1, 1, 2, 3, tag="db")
    submit(d, C2, 1, 2, 3, tag="db")      # C1's two running ones count against C2's too
    tagged = {(c, j) for c in (C1, C2) for j in (1, 2, 3)}
    run = Run(d)
    assert run.order == [(W1, C1, 1), (W2, C1, 2)]
    assert d.status()["limits"] == {"db": {"limit": 2, "running": 2}}
    run.finish(W1)
    assert [(cid, jobid) for _, cid, jobid in run.order[2:]] == [(C2, 1)]
    submit(d, C1, 10, 11)
    run.collect()
    assert sorted(key for key in (tuple(o[1:]) for o in run.order) if key not in tagged) == [(C1, 10), (C1, 11)]
    while len(run.order) < 8:             # end tagged jobs one at a time: each lets exactly one more go
        before = len(run.order)
        run.finish(next(wid for wid, jobs in run.at.items() if jobs and jobs[0] in tagged))
        assert len(run.order) == before + 1
        assert counts_by_tag(run, tagged) == 2
    assert d.status()["limits"]["db"]["running"] == 2


def test_raising_the_limit_dispatches_more_at_once_and_none_lifts_it():
    d = Dispatcher(slots=1)
    d.set_limit("db", 1)
    client(d, C1)
    for wid in (W1, W2, W3, W4, W5):
        worker(d, wid)
    submit(d, C1, 1, 2, 3, 4, 5, tag="db")
    run = Run(d)
    assert len(run.order) == 1
    d.set_limit("db", 3)
    run.collect()
    assert len(run.order) == 3
    assert d.status()["limits"] == {"db": {"limit": 3, "running": 3}}
    d.set_limit("db", None)
    run.collect()
    assert len(run.order) == 5
    assert d.status()["limits"] == {}


def test_lowering_the_limit_holds_new_tagged_jobs_until_enough_end():
    """Lowered below what runs, the limit aborts nothing but starts no tagged job until under it."""
    d = Dispatcher(slots=1)
    client(d, C1)
    for wid in (W1, W2, W3, W4):
        worker(d, wid)
    submit(d, C1, 1, 2, 3, 4, 5, 6, tag="db")
    run = Run(d)
    assert len(run.order) == 4
    d.set_limit("db", 2)
    run.finish(W1)
    run.finish(W2)
    assert len(run.order) == 4             # 2 still run: at the limit
    run.finish(W3)
    assert len(run.order) == 5


def test_tag_limit_leaves_untagged_jobs_and_other_tags_alone():
    d = Dispatcher(slots=1)
    d.set_limit("db", 1)
    client(d, C1)
    for wid in (W1, W2, W3, W4):
        worker(d, wid)
    submit(d, C1, 1, 2, tag="db")
    submit(d, C1, 3, tag="web")
    submit(d, C1, 4, 5)
    run = Run(d)
    assert sorted(jobid for _, _, jobid in run.order) == [1, 3, 4, 5]


def test_limit_zero_holds_tagged_jobs_without_a_notice_or_expiry():
    """Limit 0 keeps tagged jobs queued: they are not unplaceable (no NOTICE, not waiting, never failed
    by expire()); other jobs run; raising the limit lets them go."""
    clock = Clock()
    d = Dispatcher(slots=1, clock=clock, unplaceable_timeout=5)
    d.set_limit("db", 0)
    client(d, C1)
    worker(d, W1)
    worker(d, W2)
    submit(d, C1, 1, 2, tag="db")
    submit(d, C1, 3)
    run = Run(d)
    assert run.order == [(W1, C1, 3)]
    clock.now += 60
    d.expire()
    run.collect()
    assert run.notices == [] and run.results == [] and d.status()["waiting"] == []
    assert d.status()["limits"] == {"db": {"limit": 0, "running": 0}}
    d.set_limit("db", 1)
    run.collect()
    assert run.order[1:] == [(W2, C1, 1)]


def test_tag_limit_counts_a_cancelled_running_job_until_its_worker_reports():
    """A cancelled tagged job still runs on its worker until the outcome: it still counts for the limit."""
    d = Dispatcher(slots=1)
    d.set_limit("db", 1)
    client(d, C1)
    worker(d, W1)
    worker(d, W2)
    submit(d, C1, 1, 2, tag="db")
    run = Run(d)
    d.cancel(C1, 1)
    run.collect()
    assert len(run.order) == 1
    assert d.status()["limits"]["db"]["running"] == 1
    run.finish(W1)
    assert [jobid for _, _, jobid in run.order[1:]] == [2]


# --- 7. placement ---------------------------------------------------------------------------

@pytest.mark.parametrize("slots", [1, 2])
def test_job_pinned_to_a_worker_runs_only_there_and_waits_while_it_is_busy(slots):
    """workers=[W2]: the job runs on W2 only; a second one waits for W2 to be idle (not sent ahead), even
    with W1 and W3 idle."""
    d = Dispatcher(slots=slots)
    client(d, C1)
    for wid in (W1, W2, W3):
        worker(d, wid)
    submit(d, C1, 1, 2, workers=[W2])
    run = Run(d)
    assert run.order == [(W2, C1, 1)]
    run.finish(W2)
    assert run.order[1:] == [(W2, C1, 2)]


def test_job_pinned_by_host_name_runs_on_the_worker_of_that_host():
    d = Dispatcher(slots=1)
    client(d, C1)
    for wid in (W1, W2, W3):
        worker(d, wid)
    submit(d, C1, 1, workers=["h3"])
    submit(d, C1, 2, workers=["elsewhere", W2])
    run = Run(d)
    assert sorted(run.order) == [(W2, C1, 2), (W3, C1, 1)]


def test_job_pinned_to_workers_that_left_gets_a_notice_and_fails_unplaceable():
    """workers naming only ids of workers no longer connected: NOTICE (naming them), listed waiting, and
    UNPLACEABLE after unplaceable_timeout."""
    clock = Clock()
    d = Dispatcher(slots=1, clock=clock, unplaceable_timeout=10)
    client(d, C1)
    worker(d, W1)
    worker(d, W2)
    worker(d, W3)
    d.remove_worker(W2)
    d.remove_worker(W3)
    submit(d, C1, 1, workers=[W2, W3])
    msgs = drain(d)
    (jobid, text), = of(msgs, Frame.NOTICE, C1)
    assert jobid == 1 and "2" in text and "3" in text
    assert of(msgs, Frame.JOB) == []
    assert [w["count"] for w in d.status()["waiting"]] == [1]
    clock.now += 10
    d.expire()
    (result,) = of(drain(d), Frame.RESULT, C1)
    assert result[:2] == (1, Status.UNPLACEABLE)
    assert json.loads(bytes(result[3]))["waited"] == 10.0


def test_pinned_job_does_not_block_its_clients_other_jobs():
    """A job pinned to a busy worker waits; its client's later jobs go to the other workers meanwhile."""
    d = Dispatcher(slots=1)
    client(d, C1)
    for wid in (W1, W2, W3):
        worker(d, wid)
    submit(d, C1, 1)
    submit(d, C1, 2, workers=[W1])
    submit(d, C1, 3, 4)
    run = Run(d)
    assert run.order == [(W1, C1, 1), (W2, C1, 3), (W3, C1, 4)]
    run.finish(W1)
    assert run.order[3:] == [(W1, C1, 2)]


def test_draining_worker_does_not_take_jobs_pinned_to_it():
    """A job pinned to a draining worker never goes there."""
    d = Dispatcher(slots=1)
    client(d, C1)
    worker(d, W1)
    worker(d, W2)
    submit(d, C1, 1)
    run = Run(d)
    d.drain_worker(W1, [run.gid[key] for key in run.at[W1]])
    submit(d, C1, 2, workers=[W1])
    run.finish(W1)
    assert run.order == [(W1, C1, 1)]


# --- 8. lending ------------------------------------------------------------------------------

def test_lent_worker_runs_a_second_plain_job_whose_outcome_is_accepted():
    """W1's job waits on children and lends W1: W1 gets the next plain job while still running the
    first, its outcome is accepted (a RESULT with W1's label), and W1 takes the next one after it."""
    d = Dispatcher(slots=1)
    client(d, C1)
    client(d, C2)
    label = worker(d, W1)
    submit(d, C1, 1)
    submit(d, C2, 1, 2)
    run = Run(d)
    assert run.order == [(W1, C1, 1)]
    d.lend(W1)
    run.collect()
    assert run.order[1:] == [(W1, C2, 1)]
    msgs = run.finish(W1, (C2, 1))
    assert of(msgs, Frame.RESULT, C2) == [(1, Status.OK, label, b"")]
    assert run.order[2:] == [(W1, C2, 2)]
    run.finish(W1, (C2, 2))
    d.reclaim(W1)
    assert status_workers(d)[W1]["state"] == "busy"
    submit(d, C2, 3)
    run.collect()
    assert len(run.order) == 3             # busy again: nothing more until job 1 ends
    run.finish(W1, (C1, 1))
    assert run.order[3:] == [(W1, C2, 3)]


def test_reclaim_makes_the_worker_busy_again():
    """After RECLAIM the worker gets no new job while its first one runs."""
    d = Dispatcher(slots=1)
    client(d, C1)
    worker(d, W1)
    submit(d, C1, 1)
    run = Run(d)
    d.lend(W1)
    d.reclaim(W1)
    submit(d, C1, 2)
    run.collect()
    assert run.order == [(W1, C1, 1)]
    assert status_workers(d)[W1]["state"] == "busy"


def test_lent_worker_does_not_take_a_tagged_job_but_takes_a_plain_one():
    """While lent, a worker takes only plain jobs: a tagged one waits for an idle worker."""
    d = Dispatcher(slots=1)
    client(d, C1)
    worker(d, W1)
    submit(d, C1, 1)
    run = Run(d)
    d.lend(W1)
    submit(d, C1, 3, tag="db")
    run.collect()
    assert run.order == [(W1, C1, 1)]
    submit(d, C1, 4)
    run.collect()
    assert run.order[1:] == [(W1, C1, 4)]
    run.finish(W1, (C1, 4))
    d.reclaim(W1)
    run.finish(W1, (C1, 1))
    assert run.order[2:] == [(W1, C1, 3)]


def test_lent_worker_does_not_take_a_job_that_asks_for_resources():
    """A resource job is not sent to a lent worker although its machine has room; it goes once the worker
    is idle."""
    d = Dispatcher(slots=1)
    client(d, C1)
    worker(d, W1, resources={"cpu": 4})
    submit(d, C1, 1)
    run = Run(d)
    d.lend(W1)
    submit(d, C1, 2, resources={"cpu": 2})
    run.collect()
    assert run.order == [(W1, C1, 1)]
    d.reclaim(W1)
    run.finish(W1)
    assert run.order[1:] == [(W1, C1, 2)]
    assert run.env[(C1, 2)] == {"CW_JOB_CPUS": "2"}


def test_lend_with_slots_two_accepts_the_outcome_of_the_job_held_when_it_lent():
    """slots=2: W1 runs job 1 and holds job 2; job 1 lends, so W1 starts job 2 and is sent job 3
    ahead; the outcomes of 2 and then 3 are accepted while job 1 still waits."""
    d = Dispatcher(slots=2)
    client(d, C1)
    worker(d, W1)
    submit(d, C1, 1, 2, 3, 4)
    run = Run(d)
    assert run.order == [(W1, C1, 1), (W1, C1, 2)]
    d.lend(W1)
    run.collect()
    assert run.order[2:] == [(W1, C1, 3)]
    run.finish(W1, (C1, 2))
    assert run.order[3:] == [(W1, C1, 4)]
    run.finish(W1, (C1, 3))
    run.finish(W1, (C1, 4))
    d.reclaim(W1)
    run.finish(W1, (C1, 1))
    assert sorted(jobid for _, jobid, status in run.results if status == Status.OK) == [1, 2, 3, 4]


def test_lend_without_a_running_job_and_reclaim_without_lend_are_protocol_errors():
    d = Dispatcher(slots=1)
    client(d, C1)
    worker(d, W1)
    with pytest.raises(ProtocolError):
        d.lend(W1)                         # idle: nothing to lend for
    with pytest.raises(ProtocolError):
        d.reclaim(W1)
    submit(d, C1, 1)
    drain(d)
    d.lend(W1)
    with pytest.raises(ProtocolError):
        d.lend(W1)                         # one running job lends once
    d.reclaim(W1)
    with pytest.raises(ProtocolError):
        d.reclaim(W1)


def test_outcome_of_a_held_job_is_refused_unless_the_worker_lent():
    """Not lent, a worker may only report the job it runs first, not the one held behind it."""
    d = Dispatcher(slots=2)
    client(d, C1)
    worker(d, W1)
    submit(d, C1, 1, 2)
    run = Run(d)
    with pytest.raises(ProtocolError):
        d.outcome(W1, run.gid[(C1, 2)], Status.OK, b"")


def test_worker_lost_while_lent_counts_an_attempt_for_both_running_jobs():
    """W1 runs job 1 (lent) and job 2 when it dies: both go back to the queue, each with an attempt
    counted; the same on W2 fails both LOST with two attempts (max_attempts=2)."""
    d = Dispatcher(slots=1, max_attempts=2)
    client(d, C1)
    worker(d, W1)
    submit(d, C1, 1, 2)
    run = Run(d)
    d.lend(W1)
    run.collect()
    assert run.order == [(W1, C1, 1), (W1, C1, 2)]
    d.remove_worker(W1)
    assert drain(d) == []
    assert d.status()["queued"] == 2
    worker(d, W2)
    d.lend(W2)
    msgs = drain(d)
    assert sorted(jobid for _, _, jobid in sent(msgs)) == [1, 2]
    d.remove_worker(W2)
    results = of(drain(d), Frame.RESULT, C1)
    assert sorted(jobid for jobid, status, _, _ in results if status == Status.LOST) == [1, 2]
    for _, _, _, body in results:
        assert json.loads(bytes(body)) == {"attempts": 2, "workers": ["h1:101", "h2:102"]}


def test_worker_lost_while_lent_fails_the_job_it_started_meanwhile_if_it_has_no_retries():
    """The job started while lent counts an attempt: with retries=0 it fails LOST at once, while the
    lent job (default retries) is queued again."""
    d = Dispatcher(slots=1)
    client(d, C1)
    worker(d, W1)
    submit(d, C1, 1)
    submit(d, C1, 2, retries=0)
    run = Run(d)
    d.lend(W1)
    run.collect()
    d.remove_worker(W1)
    results = of(drain(d), Frame.RESULT, C1)
    assert [(jobid, status) for jobid, status, _, _ in results] == [(2, Status.LOST)]
    worker(d, W2)
    assert [jobid for _, _, jobid in sent(drain(d))] == [1]


# --- 9. status --------------------------------------------------------------------------------

def test_status_reports_queues_by_priority_limits_and_lending():
    """status(): queued jobs per client and priority, each limit with its running count, each worker's
    resources and node, each client's weight; a lent worker is "lending" with both jobs as current."""
    d = Dispatcher(slots=1, clock=Clock())
    d.set_limit("db", 1)
    client(d, C1, weight=2.0)
    client(d, C2)
    worker(d, W1, node="n1", resources={"cpu": 2, "gpu": 1}, gpu_ids=["0"])
    worker(d, W2)
    submit(d, C1, 1, tag="db")                  # runs on W1
    submit(d, C1, 2, 3, priority=5)             # 2 runs on W2
    submit(d, C1, 4, tag="db", priority=5)      # held back by the limit
    submit(d, C1, 5, priority=-1)
    submit(d, C2, 21, 22)
    run = Run(d)
    assert run.order == [(W1, C1, 1), (W2, C1, 2)]
    s = d.status()
    assert s["queues"] == [{"client": C1, "priority": -1, "queued": 1}, {"client": C1, "priority": 5, "queued": 2},
                           {"client": C2, "priority": 0, "queued": 2}]
    assert s["limits"] == {"db": {"limit": 1, "running": 1}}
    workers = status_workers(d)
    assert workers[W1]["resources"] == {"cpu": 2, "gpu": 1} and workers[W2]["resources"] == {"cpu": 1}
    assert workers[W1]["node"] == "n1" and workers[W2]["node"] is None
    assert (workers[W1]["state"], workers[W1]["current"]) == ("busy", [1])
    assert {c["id"]: c["weight"] for c in s["clients"]} == {C1: 2.0, C2: 1.0}
    d.lend(W1)                                  # C2's turn: its job 21 runs on W1 meanwhile
    run.collect()
    assert run.order[2:] == [(W1, C2, 21)]
    s = d.status()
    w1 = status_workers(d)[W1]
    assert (w1["state"], w1["current"], w1["held"]) == ("lending", [1, 21], 0)
    assert (s["running"], s["queued"]) == (3, 4)
    assert s["queues"][-1] == {"client": C2, "priority": 0, "queued": 1}
    assert s["limits"] == {"db": {"limit": 1, "running": 1}}
    d.pause_client(C1)
    d.pause_client(C2)
    run.finish(W1, (C2, 21))
    d.reclaim(W1)
    w1 = status_workers(d)[W1]
    assert (w1["state"], w1["current"]) == ("busy", [1])


def test_status_counts_failures_per_worker_and_client_and_throughput():
    clock = Clock(5000.0)
    d = Dispatcher(slots=1, clock=clock)
    client(d, C1)
    client(d, C2)
    worker(d, W1)
    submit(d, C1, 1, 2, 3)
    submit(d, C2, 1)
    run = Run(d)
    clock.now += 100
    run.finish(W1, status=Status.RAISED)       # C1's 1
    run.finish(W1)                        # C2's 1
    run.finish(W1, status=Status.RAISED)       # C1's 2
    s = d.status()
    assert status_workers(d)[W1]["failures"] == 2
    assert {c["id"]: (c["done"], c["failed"]) for c in s["clients"]} == {C1: (2, 2), C2: (1, 0)}
    assert s["throughput"]["jobs"] == 3 and s["throughput"]["window_s"] == 60
    assert s["throughput"]["per_s"] == round(3 / 60, 2)
    clock.now += 61
    assert d.status()["throughput"]["jobs"] == 0


def test_status_waiting_lists_client_count_reason_and_age():
    clock = Clock()
    d = Dispatcher(slots=1, clock=clock, unplaceable_timeout=100)
    client(d, C1)
    client(d, C2)
    worker(d, W1)
    submit(d, C2, 1, 2, 3, resources={"mem": 5 * GIB})
    clock.now += 7
    (entry,) = d.status()["waiting"]
    assert entry["client"] == C2 and entry["count"] == 3 and entry["since_s"] == 7.0
    assert "mem=5G" in entry["reason"]


# --- regressions: each of these failed once -------------------------------------------

def test_expire_after_every_worker_left_does_not_crash():
    clock = Clock()
    d = Dispatcher(slots=1, clock=clock, unplaceable_timeout=10)
    client(d, C1)
    worker(d, W1)
    submit(d, C1, 1, resources={"cpu": 4})
    assert [t for _, t, _ in drain(d)] == [Frame.NOTICE]
    d.remove_worker(W1)
    clock.now += 10
    d.expire()
    assert of(drain(d), Frame.RESULT, C1) == []     # no worker at all: it waits for one to start


def test_next_job_of_an_expired_kind_gets_a_notice_and_expires_too():
    clock = Clock()
    d = Dispatcher(slots=1, clock=clock, unplaceable_timeout=10)
    client(d, C1)
    worker(d, W1)
    submit(d, C1, 1, resources={"cpu": 4})
    drain(d)
    clock.now += 10
    d.expire()
    assert [f[:2] for f in of(drain(d), Frame.RESULT, C1)] == [(1, Status.UNPLACEABLE)]
    submit(d, C1, 2, resources={"cpu": 4})
    assert [t for _, t, _ in drain(d)] == [Frame.NOTICE]
    assert len(d.status()["waiting"]) == 1
    clock.now += 10
    d.expire()
    assert [f[:2] for f in of(drain(d), Frame.RESULT, C1)] == [(2, Status.UNPLACEABLE)]


def test_waiting_entry_goes_once_the_job_runs():
    d = Dispatcher(slots=1, clock=Clock(), unplaceable_timeout=10)
    client(d, C1)
    worker(d, W1)
    submit(d, C1, 1, resources={"cpu": 4})
    worker(d, W2, resources={"cpu": 4})
    assert of(drain(d), Frame.JOB, W2)
    assert d.status()["waiting"] == []


def test_requeued_job_whose_queue_was_recreated_is_dispatched():
    d = Dispatcher(slots=1)
    client(d, C1)
    worker(d, W1, resources={"cpu": 2})
    worker(d, W2)
    submit(d, C1, 1, resources={"cpu": 2})   # on W1
    submit(d, C1, 2, 3)                      # 2 on W2, 3 waits
    run = Run(d)
    run.finish(W2)                           # W2 takes 3; the empty cpu=2 queue is dropped
    submit(d, C1, 4, resources={"cpu": 2})   # a new cpu=2 queue
    d.remove_worker(W1)                      # job 1 goes back, into the new queue
    worker(d, W3, resources={"cpu": 2})
    assert of(drain(d), Frame.JOB, W3)


def test_a_lent_parents_child_runs_on_a_machine_kept_for_a_big_job():
    d = Dispatcher(slots=1)
    client(d, C1)
    client(d, C2)
    worker(d, W1, node="n1", resources={"cpu": 2})
    worker(d, W2, node="n1", resources={"cpu": 2})
    submit(d, C1, 1)                          # parent on W1
    submit(d, C2, 1, resources={"cpu": 2})    # n1 kept for it
    run = Run(d)
    d.lend(W1)
    submit(d, C1, 2)                          # the parent's child
    run.collect()
    assert [j for _, c, j in run.order if c == C1] == [1, 2]


def test_lend_with_a_held_job_keeps_client_and_global_counts_equal():
    d = Dispatcher(slots=2)
    client(d, C1)
    worker(d, W1)
    submit(d, C1, 1, 2, 3)
    drain(d)                                 # 1 runs, 2 held
    d.lend(W1)                               # W1 starts 2; 3 is sent ahead
    s = d.status()
    assert (s["queued"], s["running"]) == (1, 2)
    c = status_clients(d)[C1]
    assert (c["queued"], c["running"]) == (1, 2)


def test_jobs_running_on_a_lent_worker_that_dies_go_back_in_order():
    d = Dispatcher(slots=1)
    client(d, C1)
    worker(d, W1)
    submit(d, C1, 1)
    drain(d)
    d.lend(W1)
    submit(d, C1, 2, 3)
    drain(d)                                 # 2 runs on the lent W1
    d.remove_worker(W1)
    worker(d, W2)
    assert [j for _, _, j in Run(d).order] == [1]


def test_notice_comes_at_submit_even_while_every_worker_is_busy():
    d = Dispatcher(slots=1)
    client(d, C1)
    worker(d, W1)
    submit(d, C1, 1)
    drain(d)
    submit(d, C1, 2, resources={"cpu": 4})
    assert [t for _, t, _ in drain(d)] == [Frame.NOTICE]


def test_a_paused_clients_big_job_does_not_keep_a_machine():
    d = Dispatcher(slots=1)
    client(d, C1)
    client(d, C2)
    worker(d, W1, node="n1", resources={"cpu": 2})
    worker(d, W2, node="n1", resources={"cpu": 2})
    submit(d, C2, 1)
    drain(d)
    submit(d, C1, 1, resources={"cpu": 2})   # n1 kept for it
    d.pause_client(C1)
    submit(d, C2, 2)
    assert len(of(drain(d), Frame.JOB)) == 1     # C2's second job goes to the idle W2


def test_a_fraction_of_a_gpu_is_refused_by_the_protocol():
    with pytest.raises(ProtocolError):
        job_options.check_submitted({"resources": {"gpu": 0.5}})


def test_a_job_only_a_leaving_worker_could_run_is_told_at_once_even_while_the_rest_are_busy():
    clock = Clock()
    d = Dispatcher(slots=1, clock=clock, unplaceable_timeout=10)
    client(d, C1)
    worker(d, W1)
    worker(d, W2)
    submit(d, C1, 1, 2)                          # both workers busy
    submit(d, C1, 3, workers=[W2])
    drain(d)
    d.remove_worker(W2)
    assert [t for _, t, _ in drain(d)] == [Frame.NOTICE]
    clock.now += 10
    d.expire()
    assert [f[:2] for f in of(drain(d), Frame.RESULT, C1)] == [(3, Status.UNPLACEABLE)]


def test_a_big_job_that_comes_back_ahead_of_the_one_its_machine_waits_for_still_goes():
    """A machine kept free for a big job (job 3) while a big job of the same
    queue (job 1) is re-queued ahead of it, its worker having died: the
    machine is kept for whichever comes first, and both run.  (Found by the
    protocol simulator: the reservation stayed with job 3, which the queue
    never reached, and job 1 could not go: nothing ran again.)"""
    d = Dispatcher(slots=1)
    client(d, C1)
    m = {"node": "m", "resources": {"cpu": 3}}
    for wid in (W1, W2, W3):
        worker(d, wid, **m)
    submit(d, C1, 1, resources={"cpu": 2})
    submit(d, C1, 2)
    submit(d, C1, 3, resources={"cpu": 2})
    run = Run(d)
    assert sorted(run.order) == [(W1, C1, 1), (W2, C1, 2)]   # job 3 waits: 3 CPUs, 3 in use
    d.remove_worker(W1)                                       # job 1's worker dies: job 1 goes back first
    run.at.pop(W1)
    run.collect()
    worker(d, W4, **m)
    run.collect()
    run.finish(W2)                                            # CPUs free: job 1 goes again
    resent = [(c, j) for w, c, j in run.order[2:]]
    assert resent == [(C1, 1)]
    run.finish_oldest()                                       # then job 3
    assert [(c, j) for w, c, j in run.order[2:]] == [(C1, 1), (C1, 3)]
