"""The worker's rules (cw/worker/core.py), driven with plain calls: no
socket, no thread, no clock.  Each test feeds events and reads the actions
returned and the frames left in the outbox."""
from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cw.errors import JobTimeout, ProtocolError
from cw.wire import frames as f
from cw.wire import payload
from cw.wire.decoder import FrameDecoder
from cw.wire.frames import Frame, Status
from cw.worker.channel import ExitChannel
from cw.worker.core import (
    READY,
    RUNNING,
    WAITING,
    End,
    Exit,
    Flush,
    Idle,
    Pong,
    Read,
    Resume,
    Run,
    Spawn,
    Stop,
    WorkerCore,
)


def frames(core: WorkerCore) -> list:
    """Takes the frames out of the outbox, decoded: (NAME, fields)."""
    decoder = FrameDecoder()
    while core.outbox:
        frame = core.outbox.popleft()
        decoder.feed(b"".join(bytes(c) for c in frame) if type(frame) is tuple else frame)
    out = []
    while (item := decoder.next_frame()) is not None:
        ftype, body = item
        if ftype == Frame.OUTCOME:
            gid, status, data = f.decode_outcome(body)
            out.append(("OUTCOME", gid, status))
        elif ftype == Frame.REVOKED:
            out.append(("REVOKED", *f.decode_revoked(body)))
        elif ftype == Frame.DRAIN:
            out.append(("DRAIN", *f.decode_drain(body)))
        elif ftype == Frame.OUTPUT:
            gid, text = f.decode_output(body)
            out.append(("OUTPUT", gid, bytes(text).decode()))
        else:
            out.append((Frame(ftype).name,))
    return out


def started() -> WorkerCore:
    core = WorkerCore(pid=42)
    assert core.start() == [Spawn(0), Read(0), Spawn(1)]
    return core


def job(core: WorkerCore, gid: int, timeout: float = 0.0, ctx: int = 1) -> list:
    return core.job(gid, ctx, timeout, b"payload %d" % gid)


def finish(core: WorkerCore, runner: int, gid: int) -> list:
    """The job ends and the shell sends its outcome: the actions that follow."""
    assert core.finished(runner, gid, Status.OK, b"result") == [Flush(runner, gid)]
    return core.sent(runner, gid)


def run_of(actions: list) -> Run:
    (run,) = [a for a in actions if type(a) is Run]
    return run


def OUTCOME(gid):   # noqa: N802 - reads like the frame it stands for
    return ("OUTCOME", gid, Status.OK)


# --- running jobs ---------------------------------------------------------------------


def test_a_job_reaching_an_idle_worker_runs_on_the_reader_which_hands_reading_to_a_free_runner():
    core = started()
    actions = job(core, 7)
    assert actions == [Run(0, core.jobs[7]), Read(1)]
    assert core.reader == 1 and core.holder == 7 and core.jobs[7].state == RUNNING
    assert finish(core, 0, 7) == [Idle(0)]          # the former reader is now the free runner
    assert frames(core) == [OUTCOME(7)]
    assert job(core, 8) == [Run(1, core.jobs[8]), Read(0)]   # and it takes the reading next


def test_with_no_free_runner_a_new_one_is_spawned_to_read():
    core = started()
    job(core, 1)                     # reader 0 runs it, 1 reads
    core.lend(0, 1)                  # job 1 lends: runner 0 is taken, 2 is spawned as the free one
    assert core.free == [2]
    job(core, 2)                     # 1 runs it, 2 reads
    assert core.free == [] and core.reader == 2
    core.lend(1, 2)
    core.free.clear()                # (as if the spare were used up)
    assert job(core, 3)[1:] == [Spawn(4), Read(4)]


def test_jobs_run_one_at_a_time_in_the_order_they_came():
    core = started()
    job(core, 1)
    assert job(core, 2) == [] and job(core, 3) == []
    assert [j.gid for j in core.queue] == [2, 3]
    # The runner that ends a job runs the next one itself: no thread wakes for it.
    assert finish(core, 0, 1) == [Run(0, core.jobs[2])]
    assert finish(core, 0, 2) == [Run(0, core.jobs[3])]
    assert finish(core, 0, 3) == [Idle(0)]
    assert frames(core) == [OUTCOME(1), OUTCOME(2), OUTCOME(3)]


def test_output_goes_just_before_its_outcome():
    core = started()
    job(core, 1)
    assert core.finished(0, 1, Status.RAISED, b"exc", printed="hello\n") == [Flush(0, 1)]
    assert frames(core) == [("OUTPUT", 1, "hello\n"), ("OUTCOME", 1, Status.RAISED)]


def test_job_env_and_context_travel_with_their_job():
    core = started()
    core.context(5, {"cwd": "/a"})
    core.job_env(1, {"CUDA_VISIBLE_DEVICES": "0"})
    j1 = run_of(core.job(1, 5, 0.0, b"x")).job
    core.context(5, {"cwd": "/b"})   # a changed context goes with the jobs that come after it
    core.job(2, 5, 0.0, b"y")
    j2 = core.queue[0]
    assert (j1.env, j1.context) == ({"CUDA_VISIBLE_DEVICES": "0"}, {"cwd": "/a"})
    assert (j2.env, j2.context) == (None, {"cwd": "/b"})
    core.context(5, {})              # the client left: forgotten
    assert 5 not in core.contexts


def test_a_finished_job_keeps_the_token_until_its_outcome_was_sent():
    # (An outcome may view memory the next job changes; and a JOB read while
    # the outcome goes out is queued, so the runner runs it next, no thread woken.)
    core = started()
    job(core, 1)
    assert core.finished(0, 1, Status.OK, b"") == [Flush(0, 1)]
    assert core.holder == 1
    assert job(core, 2) == []                 # queued, not run on the reader
    assert frames(core) == [OUTCOME(1)]
    assert core.sent(0, 1) == [Run(0, core.jobs[2])]


def test_ping_is_answered_outside_the_outbox():
    core = started()
    assert core.receive(Frame.PING, b"") == [Pong()]
    assert frames(core) == []


# --- REVOKE and ABORT -----------------------------------------------------------------


def test_revoke_gives_back_a_queued_job_and_not_a_started_one():
    core = started()
    job(core, 1)
    job(core, 2)
    core.receive(Frame.REVOKE, f.encode_revoke(2)[f.HEADER_SIZE:])
    core.revoke(1)
    core.revoke(99)
    assert frames(core) == [("REVOKED", 2, True), ("REVOKED", 1, False), ("REVOKED", 99, False)]
    assert finish(core, 0, 1) == [Idle(0)]     # job 2 is gone: it never runs


def test_abort_of_a_queued_job_gives_it_back_and_it_never_runs():
    core = started()
    job(core, 1)
    job(core, 2)
    assert core.abort(2) == []
    assert frames(core) == [("REVOKED", 2, True)]
    assert finish(core, 0, 1) == [Idle(0)]


def test_abort_of_a_running_job_replaces_the_process():
    core = started()
    job(core, 1)
    (action,) = core.abort(1)
    assert type(action) is Exit and action.reason == ExitChannel.REPLACE


def test_abort_between_leaving_the_queue_and_starting_is_not_lost():
    # The old worker lost this ABORT: the job had left the queue (so it could
    # not be taken back) and was not registered as running yet.  Here leaving
    # the queue is starting: the job is the holder from that moment on.
    core = started()
    job(core, 1)
    job(core, 2)
    assert finish(core, 0, 1) == [Run(0, core.jobs[2])]   # its thread has not begun it yet
    (action,) = core.abort(2)
    assert action == Exit(ExitChannel.REPLACE, action.why)


def test_abort_of_a_waiting_job_replaces_the_process():
    core = started()
    job(core, 1)
    core.lend(0, 1)
    assert type(core.abort(1)[0]) is Exit


def test_abort_after_the_job_finished_does_nothing():
    core = started()
    job(core, 1)
    finish(core, 0, 1)
    assert core.abort(1) == [] and core.abort(12345) == []
    job(core, 2)
    core.finished(1, 2, Status.OK, b"")        # finished, its outcome still being sent
    assert core.abort(2) == []
    assert frames(core) == [OUTCOME(1), OUTCOME(2)]


def test_after_exit_nothing_more_happens():
    core = started()
    job(core, 1)
    job(core, 2)
    core.abort(1)
    assert job(core, 3) == [] and core.finished(0, 1, Status.OK, b"") == [] and core.sent(0, 1) == []
    assert core.drain() == [] and core.ping() == [] and core.deadline(1) == []
    assert frames(core) == []


# --- deadlines ---------------------------------------------------------------------------


def test_a_job_past_its_deadline_gets_a_timeout_outcome_then_the_process_exits():
    core = started()
    run = run_of(job(core, 1, timeout=2.5))
    assert run.job.timeout == 2.5             # the shell arms its timer from this
    (action,) = core.deadline(1)
    assert action.reason == ExitChannel.REPLACE
    (outcome,) = core.outbox
    gid, status, data = f.decode_outcome(b"".join(bytes(c) for c in outcome)[f.HEADER_SIZE:])
    assert (gid, status) == (1, Status.RAISED)
    exc, tb = payload.loads(data)
    assert isinstance(exc, JobTimeout) and "2.5 s" in str(exc) and "pid 42" in str(exc)


def test_a_deadline_after_the_job_ended_does_nothing():
    core = started()
    job(core, 1, timeout=1.0)
    finish(core, 0, 1)
    assert core.deadline(1) == []
    job(core, 2, timeout=1.0)
    core.finished(1, 2, Status.OK, b"")
    assert core.deadline(2) == []
    assert frames(core) == [OUTCOME(1), OUTCOME(2)]


def test_a_deadline_counts_while_the_job_waits_on_its_children():
    core = started()
    job(core, 1, timeout=1.0)
    core.lend(0, 1)
    assert type(core.deadline(1)[0]) is Exit


# --- draining -------------------------------------------------------------------------


def test_drain_gives_back_queued_jobs_then_says_drain_and_ends_after_the_running_job():
    core = started()
    job(core, 1)
    job(core, 2)
    job(core, 3)
    assert core.drain() == []                       # runner 0 runs job 1, runner 1 reads on
    assert frames(core) == [("REVOKED", 2, True), ("REVOKED", 3, True), ("DRAIN", 1)]   # it names the job it runs
    assert core.drain() == []                       # idempotent: SLURM's SIGTERM after the supervisor's SIGUSR1
    assert finish(core, 0, 1) == [Stop(0), End(drained=True)]
    assert frames(core) == [OUTCOME(1)]


def test_drain_of_an_idle_worker_ends_at_once_and_its_free_runner_stops():
    core = started()
    assert core.drain() == [Stop(1), End(drained=True)]
    assert frames(core) == [("DRAIN",)]


def test_drain_names_every_job_started_and_not_finished_in_the_order_they_started():
    core = started()
    for gid in (1, 2, 3, 4):
        job(core, gid)
    core.lend(0, 1)                  # job 2 runs, job 1 waits
    core.lend(2, 2)                  # job 3 runs, job 2 waits
    core.finished(3, 3, Status.OK, b"")   # job 3 ended, its outcome on its way; job 4 still queued
    frames(core)
    core.drain()
    assert frames(core) == [("REVOKED", 4, True), ("DRAIN", 1, 2)]


def test_a_job_arriving_while_draining_is_given_back():
    core = started()
    job(core, 1)
    core.drain()
    frames(core)
    core.job_env(2, {"CW_JOB_CPUS": "1"})
    assert job(core, 2) == []
    assert frames(core) == [("REVOKED", 2, True)]
    assert core.envs == {} and 2 not in core.jobs


def test_outcomes_keep_their_order_with_drain_and_revoked():
    core = started()
    job(core, 1)
    job(core, 2)
    job(core, 3)
    finish(core, 0, 1)        # job 2 starts
    core.revoke(2)            # too late: it started
    core.drain()              # job 3 goes back
    finish(core, 0, 2)
    assert frames(core) == [OUTCOME(1), ("REVOKED", 2, False), ("REVOKED", 3, True), ("DRAIN", 2), OUTCOME(2)]


def test_second_sigterm_exits_now():
    core = started()
    job(core, 1)
    assert core.sigterm() == []               # the first drains
    (action,) = core.sigterm()
    assert action.reason == ExitChannel.STOPPED


def test_sigterm_after_the_supervisors_drain_exits_now():
    core = started()
    job(core, 1)
    core.drain()
    assert core.sigterm()[0].reason == ExitChannel.STOPPED


def test_no_lending_while_draining():
    core = started()
    job(core, 1)
    core.drain()
    assert core.lend(0, 1) is None and core.holder == 1


# --- lending ------------------------------------------------------------------------------


def test_lend_runs_the_next_job_and_reclaim_follows_its_outcome():
    core = started()
    job(core, 1)
    job(core, 2)
    actions = core.lend(0, 1)                  # job 1 waits on a child; runner 1 reads: job 2 needs another
    assert actions == [Spawn(2), Run(2, core.jobs[2])]
    assert core.jobs[1].state == WAITING and core.holder == 2
    assert core.wait_over(0, 1) == [Idle(0)]   # child done, but job 2 holds the token
    assert core.jobs[1].state == READY
    assert finish(core, 2, 2) == [Resume(0, 1), Idle(2)]
    assert frames(core) == [("LEND",), OUTCOME(2), ("RECLAIM",)]
    assert finish(core, 0, 1) == [Idle(0)]


def test_a_wait_over_with_the_token_free_resumes_at_once():
    core = started()
    job(core, 1)
    assert core.lend(0, 1) == [Spawn(2)]       # nothing queued: a runner is kept free for what comes
    assert core.wait_over(0, 1) == [Resume(0, 1)]
    assert frames(core) == [("LEND",), ("RECLAIM",)]


def test_lend_and_reclaim_with_several_waiting_jobs():
    core = started()
    job(core, 1)
    job(core, 2)
    job(core, 3)
    assert run_of(core.lend(0, 1)).runner == 2     # job 2 runs on runner 2
    assert run_of(core.lend(2, 2)).runner == 3     # job 3 on runner 3
    assert core.holder == 3
    assert core.wait_over(2, 2) == [Idle(2)]   # job 2's children are done first...
    assert core.wait_over(0, 1) == [Idle(0)]   # ...then job 1's
    assert finish(core, 3, 3)[0] == Resume(2, 2)   # first ready, first to go on
    job(core, 4)                               # queued: a waiting job goes before the queue
    assert finish(core, 2, 2)[0] == Resume(0, 1)
    assert finish(core, 0, 1) == [Run(0, core.jobs[4])]
    assert frames(core) == [("LEND",), ("LEND",), OUTCOME(3), ("RECLAIM",), OUTCOME(2), ("RECLAIM",), OUTCOME(1)]


def test_a_job_that_lends_hands_the_token_to_a_ready_job_first():
    core = started()
    job(core, 1)
    job(core, 2)
    job(core, 3)
    core.lend(0, 1)                            # job 2 runs on runner 2
    core.wait_over(0, 1)                       # job 1 ready
    assert core.lend(2, 2) == [Resume(0, 1)]   # job 2 waits: job 1 goes on, job 3 still queued
    assert [j.gid for j in core.queue] == [3]
    assert frames(core) == [("LEND",), ("LEND",), ("RECLAIM",)]


def test_lend_of_a_job_not_holding_the_token_is_refused():
    core = started()
    job(core, 1)
    core.lend(0, 1)
    assert core.lend(0, 1) is None


# --- the connection lost ----------------------------------------------------------------------


def test_connection_lost_with_jobs_running_ends_the_session_after_them_and_sends_nothing():
    core = started()
    job(core, 1)
    job(core, 2)
    frames(core)
    assert core.closed("gone") == [Stop(1)]    # the reader
    assert list(core.queue) == [] and core.why_lost == "gone"
    assert finish(core, 0, 1) == [Stop(0), End(drained=False)]      # job 2 was dropped, never run
    assert frames(core) == []


def test_connection_lost_while_a_job_waits_on_its_children_ends_the_process():
    core = started()
    job(core, 1)
    job(core, 2)
    core.lend(0, 1)                            # job 2 runs on runner 2, job 1 waits on its children
    frames(core)
    actions = core.closed("gone")
    assert actions[:-1] == [Stop(1)] and type(actions[-1]) is Exit and actions[-1].reason == ExitChannel.REPLACE
    assert core.over and frames(core) == []


def test_a_job_that_starts_waiting_on_its_children_after_the_master_was_lost_ends_the_process():
    core = started()
    job(core, 1)
    frames(core)
    core.closed("gone")
    actions = core.lend(0, 1)
    assert [type(a) for a in actions] == [Exit] and actions[0].reason == ExitChannel.REPLACE
    assert core.over and frames(core) == []


def test_error_frame_closes_and_unexpected_frames_raise():
    core = started()
    with pytest.raises(ProtocolError):
        core.receive(Frame.SUBMIT, b"")
    assert core.receive(Frame.ERROR, b"go away") == [Stop(0), Stop(1), End(drained=False)]
    assert "go away" in core.why_lost
    assert core.closed("eof") == []


# --- a random walk over every event: the invariants hold -------------------------------


class WorkerCoreMachine(RuleBasedStateMachine):
    """Random interleavings of every event the shell can give, with the
    invariants checked after each step.  The model tracks what each runner
    does, as the shell's threads would."""

    def __init__(self):
        super().__init__()
        self.core = WorkerCore()
        self.doing: dict[int, object] = {}     # runner -> ("read",) / ("run", gid) / ("wait", gid) / ("free",)
        self.next_gid = 1
        self.exited = False
        self.ended = False
        self.sent: list = []
        self.apply(self.core.start(), None)

    def apply(self, actions, caller):
        if actions is None:
            return
        tasks = {}
        for a in actions:
            kind = type(a)
            if kind is Spawn:
                assert a.runner not in self.doing
                self.doing[a.runner] = ("free",)
            elif kind is Exit:
                self.exited = True
            elif kind is End:
                assert not self.ended
                self.ended = True
            elif kind is not Pong:
                assert a.runner not in tasks, f"two tasks for runner {a.runner}: {actions}"
                tasks[a.runner] = a
        for runner, a in tasks.items():
            kind = type(a)
            if runner != caller:
                # Only a free runner (or a waiting job's, for Resume) is told what to do.
                expected = ("wait",) if kind is Resume else ("free",)
                assert self.doing[runner][:1] == expected, (runner, self.doing[runner], a)
            if kind is Read:
                self.doing[runner] = ("read",)
            elif kind is Run:
                self.doing[runner] = ("run", a.job.gid)
            elif kind is Resume:
                self.doing[runner] = ("run", a.gid)
            elif kind is Flush:
                self.doing[runner] = ("flush", a.gid)
            elif kind is Idle:
                self.doing[runner] = ("free",) if a.runner in self.core.free else ("wait", self.doing[runner][1])
            elif kind is Stop:
                self.doing[runner] = ("stopped",)
        self.sent += frames(self.core)

    def runners(self, what):
        return sorted(r for r, d in self.doing.items() if d[0] == what)

    @precondition(lambda self: not self.core.over and self.runners("read"))
    @rule(timeout=st.sampled_from([0.0, 1.0]))
    def new_job(self, timeout):
        gid, self.next_gid = self.next_gid, self.next_gid + 1
        reader = self.core.reader
        self.apply(self.core.job(gid, 1, timeout, b""), reader)

    @precondition(lambda self: not self.core.over and self.runners("run"))
    @rule(data=st.data())
    def finish_one(self, data):
        runner = data.draw(st.sampled_from(self.runners("run")))
        gid = self.doing[runner][1]
        self.apply(self.core.finished(runner, gid, Status.OK, b""), runner)

    @precondition(lambda self: not self.core.over and self.runners("flush"))
    @rule(data=st.data())
    def flushed(self, data):
        runner = data.draw(st.sampled_from(self.runners("flush")))
        self.apply(self.core.sent(runner, self.doing[runner][1]), runner)

    @precondition(lambda self: not self.core.over and self.runners("run"))
    @rule(data=st.data())
    def lend(self, data):
        runner = data.draw(st.sampled_from(self.runners("run")))
        gid = self.doing[runner][1]
        actions = self.core.lend(runner, gid)
        if actions is not None:
            self.doing[runner] = ("lent", gid)
        self.apply(actions, runner)

    @precondition(lambda self: not self.core.over and self.runners("lent"))
    @rule(data=st.data())
    def child_done(self, data):
        runner = data.draw(st.sampled_from(self.runners("lent")))
        self.doing[runner] = ("wait", self.doing[runner][1])
        self.apply(self.core.wait_over(runner, self.doing[runner][1]), runner)

    @precondition(lambda self: not self.core.over and self.runners("read"))
    @rule(data=st.data(), kind=st.sampled_from(["revoke", "abort"]))
    def revoke_or_abort(self, data, kind):
        if self.next_gid == 1:
            return
        gid = data.draw(st.integers(1, self.next_gid - 1))
        reader = self.core.reader
        self.apply(getattr(self.core, kind)(gid), reader)

    @precondition(lambda self: not self.core.over)
    @rule(kind=st.sampled_from(["drain", "sigterm"]))
    def signal(self, kind):
        self.apply(getattr(self.core, kind)(), None)

    @precondition(lambda self: not self.core.over and self.runners("read"))
    @rule()
    def lose_master(self):
        reader = self.core.reader
        self.apply(self.core.closed("lost"), reader)

    @precondition(lambda self: not self.core.over and self.core.jobs)
    @rule(data=st.data())
    def deadline(self, data):
        self.apply(self.core.deadline(data.draw(st.sampled_from(sorted(self.core.jobs)))), None)

    @rule()
    def ping(self):                   # always possible, also once the session is over
        self.apply(self.core.ping(), None)

    @invariant()
    def one_job_at_a_time(self):
        core = self.core
        if core.over:
            return
        holding = [j for j in core.jobs.values() if j.state in (RUNNING, "sending")]
        assert len(holding) == (core.holder is not None)
        assert all(j.gid == core.holder for j in holding)
        # Nothing waits in the queue while the token is free.
        assert core.holder is not None or not core.queue or core.draining or core.lost
        # While the session goes on and the token is free, a runner is there to read or run what comes.
        if not (core.lost or core.draining):
            assert len(self.runners("read")) == 1 and core.reader == self.runners("read")[0]
            assert core.holder is not None or core.free
        assert set(core.free) == set(self.runners("free"))
        assert sum(1 for d in self.doing.values() if d[0] in ("run", "flush")) == (core.holder is not None)

    @invariant()
    def frames_make_sense(self):
        lent = 0
        for frame in self.sent:
            if frame[0] == "LEND":
                lent += 1
            elif frame[0] == "RECLAIM":
                lent -= 1
                assert lent >= 0
        if self.ended or self.exited:
            return
        waiting = sum(1 for j in self.core.jobs.values() if j.state in (WAITING, READY))
        if not self.core.lost:
            assert lent == waiting


TestWorkerCoreMachine = WorkerCoreMachine.TestCase
TestWorkerCoreMachine.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
