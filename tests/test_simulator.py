"""The whole protocol under random interleavings (tests/simulator.py):
hypothesis chooses the order in which frames arrive and jobs run, and when
workers die, are cut off, drain or join, clients cancel or leave, and the
master restarts.  After every step the invariants hold (each job ends at
most once, with its own answer; no machine gives out more than it has; tag
limits hold); at the end everything settles and every job of a client
still there has ended.

CI runs a bounded number of examples; ``CW_SIM_EXAMPLES=2000 pytest
tests/test_simulator.py`` runs more.
"""
from __future__ import annotations

import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from simulator import KINDS, Sim, Spec

EXAMPLES = int(os.environ.get("CW_SIM_EXAMPLES", "60"))


class Cluster(RuleBasedStateMachine):
    @initialize(slots=st.sampled_from([1, 2, 3]), machines=st.lists(st.tuples(st.integers(1, 3), st.integers(0, 2)),
                                                                      min_size=1, max_size=3),
                clients=st.integers(1, 3))
    def start(self, slots, machines, clients):
        self.sim = Sim(slots=slots)
        for processes, gpus in machines:
            self.sim.add_machine(processes, gpus)
        for _ in range(clients):
            self.sim.add_client()
        self.sim.limit("c1", "db", 1)
        self.sim.deliver_all_from("c1")   # the master knows the limit before any db job comes

    def _client(self, data):
        names = [n for n, c in self.sim.clients.items() if not getattr(c, "gone", False)]
        return data.draw(st.sampled_from(names)) if names else None

    def _worker(self, data):
        wids = sorted(w.wid for w in self.sim.workers.values() if not w.gone)
        return data.draw(st.sampled_from(wids)) if wids else None

    @rule(data=st.data(), kind=st.sampled_from(KINDS), value=st.integers(0, 1000),
          need=st.sampled_from([None, None, None, {"cpu": 2}, {"gpu": 1}, {"cpu": 1, "gpu": 2}]),
          tag=st.sampled_from([None, None, None, "db"]), retries=st.sampled_from([None, None, 0, 1]),
          func=st.sampled_from([None, None, 0, 1, 2, 3, 4]),
          deps=st.sampled_from([(), (), (), (1,), (-1,), (-1, -2), (1, -3)]))
    def submit(self, data, kind, value, need, tag, retries, func, deps):
        client = self._client(data)
        if client is not None:
            count = len(self.sim.clients[client].specs)     # deps: earlier jobs, from the start or the end
            deps = tuple(d if d > 0 else count + 1 + d for d in deps)
            self.sim.submit(client, Spec(kind, value, need, tag, retries, func, deps))

    @rule(data=st.data())
    def deliver(self, data):
        links = self.sim.deliverable()
        if links:
            self.sim.deliver(data.draw(st.sampled_from(links)))

    @rule(data=st.data())
    def deliver_many(self, data):
        for _ in range(data.draw(st.integers(1, 20))):
            links = self.sim.deliverable()
            if not links:
                break
            self.sim.deliver(data.draw(st.sampled_from(links)))
            self.sim.check()

    @rule(data=st.data())
    def run_job(self, data):
        jobs = self.sim.runnable()
        if jobs:
            self.sim.step_job(*data.draw(st.sampled_from(jobs)))

    @rule(data=st.data())
    def cancel(self, data):
        client = self._client(data)
        if client is not None and self.sim.clients[client].specs:
            jobid = data.draw(st.sampled_from(sorted(self.sim.clients[client].specs)))
            self.sim.cancel(client, jobid)

    @rule(data=st.data())
    def kill_worker(self, data):
        wid = self._worker(data)
        if wid is not None:
            self.sim.kill(wid)

    @rule(processes=st.integers(1, 2), gpus=st.integers(0, 2))
    def add_machine(self, processes, gpus):
        if len(self.sim.machines) < 5:
            self.sim.add_machine(processes, gpus)

    @rule(data=st.data())
    def drain_worker(self, data):
        wid = self._worker(data)
        if wid is not None:
            self.sim.drain(wid)

    @rule(data=st.data(), outcome=st.sampled_from(["heal", "time out"]), steps=st.integers(0, 10))
    def cut_worker(self, data, outcome, steps):
        wid = self._worker(data)
        if wid is None or getattr(self.sim.workers[wid], "detached", False):
            return
        self.sim.cut(wid)
        for _ in range(steps):        # the rest of the cluster goes on meanwhile
            links = self.sim.deliverable()
            if links:
                self.sim.deliver(data.draw(st.sampled_from(links)))
                self.sim.check()
        if outcome == "heal":
            self.sim.heal(wid)
        else:
            self.sim.time_out(wid)

    @precondition(lambda self: len(self.sim.clients) < 5)
    @rule()
    def add_client(self):
        self.sim.add_client()

    @rule(data=st.data())
    def disconnect_client(self, data):
        client = self._client(data)
        if client is not None and data.draw(st.integers(0, 3)) == 0:    # rarer than the rest
            self.sim.disconnect(client)

    @rule(data=st.data())
    def restart_master(self, data):
        if data.draw(st.integers(0, 4)) == 0:
            self.sim.restart_master()

    @invariant()
    def holds(self):
        if hasattr(self, "sim"):
            self.sim.check()

    def teardown(self):
        if hasattr(self, "sim"):
            self.sim.settle()


Cluster.TestCase.settings = settings(max_examples=EXAMPLES, stateful_step_count=40, deadline=None,
                                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_the_protocol_under_random_interleavings = Cluster.TestCase


def test_a_simple_run_settles_with_every_answer():
    sim = Sim(slots=2)
    sim.add_machine(2)
    sim.add_client()
    ids = [sim.submit("c1", Spec("ok", i)) for i in range(20)]
    sim.settle()
    assert [sim.clients["c1"].results[i][0].payload for i in ids] == [b"value:%d" % i for i in range(20)]


def test_fair_share_between_two_busy_clients_stays_within_its_bound():
    """Two clients with 200 jobs each on 3 worker processes: at every moment
    the jobs each has had started differ by at most what the workers hold."""
    sim = Sim(slots=2)
    sim.add_machine(3)
    for _ in range(2):
        sim.add_client()
    for i in range(200):
        sim.submit("c1", Spec("ok", i))
        sim.submit("c2", Spec("ok", i))
    while sim.deliverable() or sim.runnable():
        if sim.deliverable():
            sim.deliver(sim.deliverable()[0])
        else:
            sim.step_job(*sim.runnable()[0])
        started = {name: sum(1 for (c, _), n in sim.runs.items() if c == name) for name in ("c1", "c2")}
        if min(started.values()) < 200:
            assert abs(started["c1"] - started["c2"]) <= 3 * 2 + 1, started
    sim.settle()


def test_a_master_restart_loses_no_job():
    sim = Sim(slots=2)
    sim.add_machine(2)
    sim.add_client()
    ids = [sim.submit("c1", Spec("ok", i)) for i in range(30)]
    for _ in range(40):
        links = sim.deliverable()
        if links:
            sim.deliver(links[0])
        jobs = sim.runnable()
        if jobs:
            sim.step_job(*jobs[0])
    sim.restart_master()
    sim.settle()
    assert all(len(sim.clients["c1"].results[i]) == 1 for i in ids)


def test_jobs_naming_functions_settle_through_need_forget_and_a_master_restart():
    """Five functions, workers that keep two, a client that announces three:
    workers ask for what they let go (NEED), the client forgets to make room
    (FORGET) or sends a job with its function, and a new master learns them again."""
    sim = Sim(slots=2)
    sim.add_machine(2)
    sim.add_client()
    ids = [sim.submit("c1", Spec("ok", i, func=i % 5)) for i in range(40)]
    for _ in range(60):
        if sim.deliverable():
            sim.deliver(sim.deliverable()[0])
        if sim.runnable():
            sim.step_job(*sim.runnable()[0])
    sim.restart_master()
    ids += [sim.submit("c1", Spec("ok", i, func=i % 5)) for i in range(40, 60)]
    sim.settle()
    ids += [sim.submit("c1", Spec("ok", i, func=3 + i % 2)) for i in range(60, 70)]   # room made by FORGET
    sim.settle()
    assert all(len(sim.clients["c1"].results[i]) == 1 for i in ids)
    kinds = {line.split()[1] for line in sim.log}
    assert {"FUNC", "NEED", "FORGET"} <= kinds, kinds
