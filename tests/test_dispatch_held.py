"""Unit tests of held jobs (issue 13 item 5): a job sent ahead and not started is never held hostage.

A more urgent job of the same client takes its place (cw.master.outrank), and a worker that does not
answer a REVOKE within revoke_timeout loses the job to another worker (cw.master.slots), its late word
about it dropped.  Pure calls, a fake clock, no sockets."""
from __future__ import annotations

import json

import pytest
from test_dispatch import drain, of
from test_dispatch_scheduling import Clock, client, options, sent, who, worker

from cw.master.dispatch import DEFAULT_RETRIES, Dispatcher
from cw.wire.frames import Frame, Status

C1, C2 = 101, 102
W1, W2, W3 = 1, 2, 3
LO, HI = 0, 10


def submit(d, cid, jobid, priority=LO, **opts):
    d.submit(cid, jobid, DEFAULT_RETRIES, 0.0, b"payload-%d-%d" % (cid, jobid), priority, options(**opts))


class Workers:
    """Plays the workers: each runs what it was sent in order, one at a time, and gives back
    a job it was asked for if it has not started it (as cw.worker.session does)."""

    def __init__(self, d, answer=True):
        self.d = d
        self.answer = answer           # False: REVOKEs are left unanswered (a frozen worker)
        self.at = {}                   # wid -> [(gid, (cid, jobid))] in the order sent
        self.started = []              # (wid, cid, jobid) in the order they started
        self.revokes = []              # (wid, (cid, jobid)) asked back
        self.results = []              # (cid, jobid, status)
        self.pending = []              # (wid, gid) REVOKEs not answered yet

    def collect(self):
        while True:
            msgs = drain(self.d)
            if not msgs:
                return
            for to, t, fields in msgs:
                if t == Frame.JOB:
                    self.at.setdefault(to, []).append((fields[0], who(fields[3])))
                elif t == Frame.RESULT:
                    self.results.append((to, fields[0], fields[1]))
                elif t == Frame.REVOKE:
                    self.revokes.append((to, self.key(to, fields)))
                    self.pending.append((to, fields))
            if self.answer:
                self.answer_revokes()

    def key(self, wid, gid):
        return next(key for g, key in self.at.get(wid, ()) if g == gid)

    def answer_revokes(self):
        pending, self.pending = self.pending, []
        for wid, gid in pending:
            jobs = self.at[wid]
            index = next(i for i, (g, _) in enumerate(jobs) if g == gid)
            given_back = index > 0      # the first one has started
            if given_back:
                del jobs[index]
            self.d.revoked(wid, gid, given_back)
        self.collect()

    def finish(self, wid, status=Status.OK):
        """The worker starts (if it had not) and finishes its first job."""
        gid, key = self.at[wid].pop(0)
        self.d.outcome(wid, gid, status, b"")
        self.collect()
        return key

    def run_all(self, wid):
        """The worker runs everything it is sent until it has nothing; the order they started in."""
        order = []
        while self.at.get(wid):
            order.append(self.finish(wid)[1])
        return order


# --- priorities hold with prefetch ---------------------------------------------------------

def test_urgent_jobs_take_the_place_of_held_ones_and_start_in_priority_order():
    """Issue 13's case: lo0, lo1, lo2 then hi0, hi1, hi2 on one worker that holds two.  hi0 takes
    lo1's place (one REVOKE); the jobs start lo0 (it had started), hi0, hi1, hi2, lo1, lo2."""
    d = Dispatcher(slots=2)
    client(d, C1)
    worker(d, W1)
    run = Workers(d)
    for jobid in (0, 1, 2):
        submit(d, C1, jobid)
    run.collect()
    assert [key for _, key in run.at[W1]] == [(C1, 0), (C1, 1)]
    for jobid in (10, 11, 12):
        submit(d, C1, jobid, priority=HI)
        run.collect()
    assert run.revokes == [(W1, (C1, 1))]           # one place to take: one REVOKE
    assert run.run_all(W1) == [0, 10, 11, 12, 1, 2]
    assert sorted(jobid for _, jobid, status in run.results if status == Status.OK) == [0, 1, 2, 10, 11, 12]


def test_the_least_urgent_held_job_is_the_one_asked_back_on_any_worker():
    """Held jobs of priorities 5 and 1 on two workers: a priority 9 job takes the place of the
    priority 1 one; one of priority 3 then takes nothing (only the priority 5 one is left)."""
    d = Dispatcher(slots=2)
    client(d, C1)
    worker(d, W1)
    worker(d, W2)
    run = Workers(d, answer=False)
    submit(d, C1, 1, priority=5)
    submit(d, C1, 2, priority=5)
    submit(d, C1, 3, priority=5)
    submit(d, C1, 4, priority=1)
    run.collect()
    assert {wid: [k for _, k in jobs] for wid, jobs in run.at.items()} == {
        W1: [(C1, 1), (C1, 3)], W2: [(C1, 2), (C1, 4)]}
    submit(d, C1, 5, priority=9)
    run.collect()
    assert run.revokes == [(W2, (C1, 4))]
    submit(d, C1, 6, priority=3)
    run.collect()
    assert run.revokes == [(W2, (C1, 4))]
    run.answer_revokes()
    assert [k for _, k in run.at[W2]] == [(C1, 2), (C1, 5)]


def test_a_held_job_of_another_client_is_never_asked_back_for_this_clients_priority():
    """W1 runs C1's job and holds C2's: C1's urgent job waits for its turn; nothing is revoked."""
    d = Dispatcher(slots=2)
    client(d, C1)
    client(d, C2)
    worker(d, W1)
    run = Workers(d)
    submit(d, C1, 1)
    submit(d, C2, 1)
    run.collect()
    assert [k for _, k in run.at[W1]] == [(C1, 1), (C2, 1)]
    submit(d, C1, 2, priority=HI)
    run.collect()
    assert run.revokes == []
    assert [run.finish(W1) for _ in range(3)] == [(C1, 1), (C2, 1), (C1, 2)]


def test_a_swap_uses_up_no_turn_of_the_client_and_takes_none_from_another():
    """One worker, C2 and C1 taking turns; W1 runs C2's job and holds C1's.  C1's urgent job takes the
    place of C1's held job: the clients take turns exactly as they would without the urgent job."""
    def starts(urgent):
        d = Dispatcher(slots=2)
        client(d, C1)
        client(d, C2)
        worker(d, W1)
        run = Workers(d)
        submit(d, C2, 1)
        for jobid in (1, 2):
            submit(d, C1, jobid)
            submit(d, C2, jobid + 1)
        if urgent:
            submit(d, C1, 9, priority=HI)
        run.collect()
        return [run.finish(W1) for _ in range(5 + urgent)], run.revokes
    assert starts(urgent=False) == ([(C2, 1), (C1, 1), (C2, 2), (C1, 2), (C2, 3)], [])
    assert starts(urgent=True) == ([(C2, 1), (C1, 9), (C2, 2), (C1, 1), (C2, 3), (C1, 2)], [(W1, (C1, 1))])


def test_the_swap_goes_to_the_clients_most_urgent_job_when_the_held_one_comes_back():
    """REVOKE(lo1) for hi; before lo1 comes back a still more urgent job arrives (no second place to
    take): the place goes to the most urgent, then hi, then lo1."""
    d = Dispatcher(slots=2)
    client(d, C1)
    worker(d, W1)
    run = Workers(d, answer=False)
    submit(d, C1, 0)
    submit(d, C1, 1)
    submit(d, C1, 10, priority=HI)
    submit(d, C1, 20, priority=2 * HI)
    run.collect()
    assert run.revokes == [(W1, (C1, 1))]
    run.answer_revokes()
    assert run.run_all(W1) == [0, 20, 10, 1]


def test_a_held_job_that_had_started_stays_and_is_not_asked_again():
    """REVOKED(lo1, False): lo1 had started (the outcome of lo0 was on its way).  It stays, the urgent
    job waits for the next free slot, and later urgent jobs ask nothing more of it."""
    d = Dispatcher(slots=2)
    client(d, C1)
    worker(d, W1)
    run = Workers(d, answer=False)
    submit(d, C1, 0)
    submit(d, C1, 1)
    submit(d, C1, 10, priority=HI)
    run.collect()
    (wid, gid), = run.pending
    run.pending.clear()
    d.revoked(W1, gid, False)
    run.collect()
    submit(d, C1, 11, priority=HI)
    run.collect()
    assert run.revokes == [(W1, (C1, 1))] and run.pending == []
    assert run.run_all(W1) == [0, 1, 10, 11]


def test_only_a_plain_job_takes_a_held_ones_place():
    """A job that asks for resources is never sent ahead, so it cannot take a held job's place."""
    d = Dispatcher(slots=2)
    client(d, C1)
    worker(d, W1, resources={"cpu": 2, "mem": 100})
    run = Workers(d)
    submit(d, C1, 0)
    submit(d, C1, 1)
    submit(d, C1, 10, priority=HI, resources={"mem": 10})
    run.collect()
    assert run.revokes == []


def test_a_client_of_one_priority_keeps_no_index_of_its_held_jobs():
    """The usual client submits at one priority: it pays nothing for the rule (no index is kept)."""
    d = Dispatcher(slots=2)
    client(d, C1)
    worker(d, W1)
    for jobid in range(50):
        submit(d, C1, jobid, priority=3)
    assert d.clients[C1].held is None
    submit(d, C1, 99, priority=1)      # two priorities now: the index starts with the jobs held now
    assert d.clients[C1].held is not None


def test_a_paused_clients_urgent_job_takes_no_place():
    """A client behind on its results gets no job sent: its urgent job revokes nothing either."""
    d = Dispatcher(slots=2)
    client(d, C1)
    worker(d, W1)
    run = Workers(d)
    submit(d, C1, 0)
    submit(d, C1, 1)
    run.collect()
    d.pause_client(C1)
    submit(d, C1, 10, priority=HI)
    run.collect()
    assert run.revokes == []


# --- a REVOKE left unanswered ----------------------------------------------------------

def frozen_with_held_job(timeout=3.0, max_attempts=3):
    """W1 runs job 1 and holds job 2; W2 runs job 3.  W2 finishes: REVOKE(2) to W1, which is frozen."""
    clock = Clock()
    d = Dispatcher(slots=2, clock=clock, revoke_timeout=timeout, max_attempts=max_attempts)
    client(d, C1)
    for jobid in (1, 2, 3):
        submit(d, C1, jobid)
    worker(d, W1)
    worker(d, W2)
    run = Workers(d, answer=False)
    run.collect()
    assert {wid: [k for _, k in jobs] for wid, jobs in run.at.items()} == {W1: [(C1, 1), (C1, 2)], W2: [(C1, 3)]}
    run.finish(W2)
    assert run.revokes == [(W1, (C1, 2))]
    return d, clock, run


def test_a_held_job_whose_revoke_goes_unanswered_is_given_to_another_worker():
    d, clock, run = frozen_with_held_job(timeout=3.0)
    clock.now += 2.9
    d.expire()
    run.collect()
    assert W2 not in run.at or run.at[W2] == []        # still W1's: it has a little longer to answer
    clock.now += 0.2
    d.expire()
    run.collect()
    assert [k for _, k in run.at[W2]] == [(C1, 2)]
    assert run.finish(W2) == (C1, 2)
    assert [(jobid, status) for _, jobid, status in run.results] == [(3, Status.OK), (2, Status.OK)]


def test_the_frozen_worker_gets_no_job_until_it_answers():
    """Past the timeout W1 holds a stand-in: no new job goes to it, even with jobs queued."""
    d, clock, run = frozen_with_held_job()
    clock.now += 3.1
    d.expire()
    run.collect()
    for jobid in (4, 5, 6):
        submit(d, C1, jobid)
    run.collect()
    assert [k for _, k in run.at[W1]] == [(C1, 1), (C1, 2)]     # what W1 itself believes it holds
    assert [k for _, k in run.at[W2]] == [(C1, 2), (C1, 4)]
    # It thaws: it gives job 2 back; nothing comes of that but a free slot, which job 5 takes.
    run.answer_revokes()
    assert [k for _, k in run.at[W1]] == [(C1, 1), (C1, 5)]
    assert d.status()["workers"][0]["held"] == 1


def test_with_three_slots_the_frozen_worker_gets_no_job_into_its_free_slot():
    """slots=3: W1 runs job 1 and holds job 3, a slot still free; W2 falls idle and asks for job 3.  W1
    lets the REVOKE go unanswered: job 3 goes to W2, and new jobs go to W2 only, though W1 has room."""
    clock = Clock()
    d = Dispatcher(slots=3, clock=clock, revoke_timeout=3.0)
    client(d, C1)
    worker(d, W1)
    worker(d, W2)
    run = Workers(d, answer=False)
    for jobid in (1, 2, 3):
        submit(d, C1, jobid)
    run.collect()
    assert {wid: [k for _, k in jobs] for wid, jobs in run.at.items()} == {W1: [(C1, 1), (C1, 3)], W2: [(C1, 2)]}
    run.finish(W2)
    assert run.revokes == [(W1, (C1, 3))]
    clock.now += 3.1
    d.expire()
    for jobid in (4, 5, 6):
        submit(d, C1, jobid)
    run.collect()
    assert [k for _, k in run.at[W1]] == [(C1, 1), (C1, 3)]
    assert [k for _, k in run.at[W2]] == [(C1, 3), (C1, 4), (C1, 5)]
    run.answer_revokes()                 # it thaws and gives job 3 back: job 6 takes the room
    assert [k for _, k in run.at[W1]] == [(C1, 1), (C1, 6)]


@pytest.mark.parametrize("order", ["late_first", "rerun_first"])
def test_a_late_start_on_the_thawed_worker_is_dropped_and_the_client_gets_one_result(order):
    """W1 thaws after the timeout and had started job 2 anyway (REVOKED(2, False), then its output and
    outcome): no protocol error, nothing reaches the client from it, and W1 works on."""
    d, clock, run = frozen_with_held_job()
    clock.now += 3.1
    d.expire()
    run.collect()
    late_gid = run.at[W1][1][0]
    run.finish(W1)                               # job 1's outcome
    d.revoked(W1, late_gid, False)               # it had started job 2
    if order == "rerun_first":
        run.finish(W2)
    d.output(W1, late_gid, b"printed late\n")
    d.outcome(W1, late_gid, Status.OK, b"late")
    run.at[W1].pop(0)
    run.collect()
    if order == "late_first":
        run.finish(W2)
    assert sorted((jobid, status) for _, jobid, status in run.results) == [
        (1, Status.OK), (2, Status.OK), (3, Status.OK)]
    submit(d, C1, 4)
    submit(d, C1, 5)
    run.collect()
    assert sorted((wid, [k for _, k in jobs]) for wid, jobs in run.at.items() if jobs) in (
        [(W1, [(C1, 4)]), (W2, [(C1, 5)])], [(W1, [(C1, 5)]), (W2, [(C1, 4)])])   # W1 takes jobs again


def test_an_unanswered_swap_gives_the_urgent_job_the_next_free_place():
    """The worker asked to swap is frozen: its held lo job goes back to the queue after the timeout,
    and a worker that joins takes the urgent job first, then lo."""
    clock = Clock()
    d = Dispatcher(slots=2, clock=clock, revoke_timeout=3.0)
    client(d, C1)
    worker(d, W1)
    run = Workers(d, answer=False)
    submit(d, C1, 0)
    submit(d, C1, 1)
    submit(d, C1, 10, priority=HI)
    run.collect()
    assert run.revokes == [(W1, (C1, 1))]
    clock.now += 3.5
    d.expire()
    run.collect()
    worker(d, W2)
    run.collect()
    assert [k for _, k in run.at[W2]] == [(C1, 10), (C1, 1)]


def test_a_frozen_worker_that_leaves_costs_its_stand_in_nothing():
    """W1 is dropped (peer timeout) after its held job went elsewhere: only its running job counts an
    attempt and is re-run; job 2, not started there, is neither re-run again nor failed."""
    d, clock, run = frozen_with_held_job(max_attempts=1)
    clock.now += 3.1
    d.expire()
    run.collect()
    d.remove_worker(W1)
    del run.at[W1]
    run.collect()
    assert [k for _, k in run.at[W2]] == [(C1, 2)]
    run.finish(W2)
    assert sorted((jobid, status) for _, jobid, status in run.results) == [
        (1, Status.LOST), (2, Status.OK), (3, Status.OK)]


def test_the_job_taken_from_a_frozen_worker_counts_no_attempt():
    """max_attempts=1: job 2 went to W2 after W1 let its REVOKE go unanswered; W2 dying running it is
    its first real attempt, and its last: LOST names W2 only."""
    d, clock, run = frozen_with_held_job(max_attempts=1)
    clock.now += 3.1
    d.expire()
    msgs = drain(d)
    assert [(to, key) for to, *key in sent(msgs)] == [(W2, [C1, 2])]
    d.remove_worker(W2)
    results = of(drain(d), Frame.RESULT, C1)
    assert [(r[0], r[1]) for r in results] == [(2, Status.LOST)]
    assert json.loads(bytes(results[0][3])) == {"attempts": 1, "workers": ["h2:102"]}


def test_a_revoke_answered_in_time_is_not_overdue():
    d, clock, run = frozen_with_held_job()
    run.answer_revokes()                 # W1 gives job 2 back at once: W2 runs it
    assert [k for _, k in run.at[W2]] == [(C1, 2)]
    clock.now += 60
    d.expire()
    run.collect()
    assert run.finish(W2) == (C1, 2)
    assert run.finish(W1) == (C1, 1)
    assert sorted(jobid for _, jobid, _ in run.results) == [1, 2, 3]
