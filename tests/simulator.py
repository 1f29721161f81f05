"""A whole-protocol simulator: the master's dispatcher, worker cores and
client cores wired in memory, under a clock of its own.

Every peer is the real pure core cw runs (cw.master.dispatch.Dispatcher,
cw.worker.core.WorkerCore, cw.client.core.ClientCore); only the shells are
stood in for.  Frames travel encoded, one in-order queue per direction of a
connection, as TCP would carry them, and are delivered one at a time in an
order the test chooses.  A test (tests/test_simulator.py lets hypothesis
choose) drives it through steps: submit, cancel, deliver a frame, let a job
run a step, kill a worker process, add a machine, drain a worker, cut a
worker off and heal it (or let the master time it out), disconnect a
client, restart the master.  ``check()`` holds the invariants after every
step; ``settle()`` then lets everything finish and checks that every job
ended, exactly once, with the answer it should have.

What a job does is written in its payload, so no pickling is involved:
``ok`` returns its value, ``raise`` fails, ``crash`` ends its worker
process, ``wait`` lends its worker while it waits on (simulated) children.
A job may name one of a few functions by digest, as jobs of functions sent
once do (FUNC, NEED, FORGET): its worker must hold that function's bytes
when it starts it (worker processes keep only ``FUNCTION_LRU`` of them, so
NEED happens), and clients announce at most ``MAX_FUNCTIONS``.

A job may take earlier jobs of its client as arguments (``Spec.deps``, as a
future passed to ``submit``): DEPS precedes its SUBMIT, the master holds it
until their outcomes are kept, and a client answers MISSING with the outcome
it got (cw.client.refs does so from the future).  Invariants: such a job
starts only once the master keeps every one of those outcomes as OK; it ends
failed (DEPENDENCY) or cancelled only when one of them did; and it ends.
"""
from __future__ import annotations

import collections
import json
import random
from dataclasses import dataclass, field

from cw.client.core import ClientCore
from cw.errors import ProtocolError
from cw.master import inbox
from cw.master.dispatch import DEFAULT_RETRIES, Dispatcher
from cw.wire import frames
from cw.wire import kept as kept_wire
from cw.wire.decoder import FrameDecoder
from cw.wire.frames import Frame, Result, Status, kind_name
from cw.wire.payload import digest_of
from cw.worker.actions import End, Exit, Flush, Resume, Run
from cw.worker.core import WorkerCore
from cw.worker.functions import FunctionLRU

MASTER = "master"
KINDS = ("ok", "ok", "ok", "raise", "crash", "wait")
FUNCTION_LRU = 2        # functions a simulated worker process keeps
MAX_FUNCTIONS = 3       # functions a simulated client announces at a time


def function_bytes(func: int) -> bytes:
    return b"function %d" % func


def job_fields(payload) -> list:
    """[client name, jobid, kind, value, function] of a job's payload (named by digest or not)."""
    data = bytes(payload)
    return json.loads(data[17:] if data[:1] == b"\xfe" else data)


@dataclass
class Spec:
    """One job as its client submitted it, and what must come of it."""
    kind: str
    value: int
    need: dict | None = None
    tag: str | None = None
    max_retries: int | None = None
    func: int | None = None         # the function it names by digest, if any
    deps: tuple = ()                # job ids of its client whose outcomes it takes (futures as arguments)

    def payload(self, cid: int, jobid: int, named: bool = False) -> bytes:
        body = json.dumps([cid, jobid, self.kind, self.value, self.func]).encode()
        return b"\xfe" + digest_of(function_bytes(self.func)) + body if named else body


def dep_key(client: str, jobid: int) -> int:
    """The key a client gives its job's future when another job takes it."""
    return (int(client[1:]) << 32) | jobid


def decode(frame) -> tuple[int, bytes]:
    """An encoded frame (bytes or a (head, payload...) tuple) back to (type, body)."""
    data = b"".join(bytes(c) for c in frame) if isinstance(frame, tuple) else bytes(frame)
    decoder = FrameDecoder()
    decoder.feed(data)
    ftype, body = decoder.next_frame()
    assert decoder.buffered == 0, "one frame per outbox entry"
    return ftype, bytes(body)


@dataclass
class Machine:
    """A worker machine: a supervisor keeping ``processes`` worker processes."""
    name: str
    processes: int
    offer: dict
    gpu_ids: list
    alive: set = field(default_factory=set)      # wids of its connected worker processes


class SimWorker:
    """One worker process's session: the core and what its runners are doing."""

    def __init__(self, wid: int, machine: Machine):
        self.wid = wid
        self.machine = machine
        self.core = WorkerCore(pid=wid, functions=FunctionLRU(FUNCTION_LRU))
        self.started: dict[int, dict] = {}     # gid -> {"job", "runner", "phase"} of started jobs
        self.cut = False
        self.gone = False

    @property
    def info(self) -> dict:
        m = self.machine
        return {"role": "worker", "host": m.name, "pid": self.wid, "node": m.name,
                "resources": m.offer, "gpu_ids": m.gpu_ids}


class SimClient:
    def __init__(self, cid: int, name: str):
        self.cid = cid          # its peer id at the master now (a new one after each reconnection)
        self.name = name
        self.core = ClientCore({"cwd": "/", "path": []})
        self.core.MAX_FUNCTIONS = MAX_FUNCTIONS
        self.specs: dict[int, Spec] = {}
        self.results: dict[int, list] = collections.defaultdict(list)   # jobid -> Results the core let through
        self.cancelled: set[int] = set()
        self.connected = True


class Sim:
    UNPLACEABLE_TIMEOUT = 1000.0

    def __init__(self, seed: int = 0, slots: int = 2, max_attempts: int = 3, peer_timeout: float = 30.0):
        self.rng = random.Random(seed)
        self.now = 0.0
        self.slots = slots
        self.max_attempts = max_attempts
        self.peer_timeout = peer_timeout
        self.next_peer = 1
        self.links: dict[tuple, collections.deque] = {}
        self.machines: dict[str, Machine] = {}
        self.workers: dict[int, SimWorker] = {}
        self.clients: dict[str, SimClient] = {}
        self.runs: collections.Counter = collections.Counter()     # (client name, jobid) -> times started
        self.deaths: collections.Counter = collections.Counter()   # (client name, jobid) -> its processes that died
        self.results_sent: collections.Counter = collections.Counter()   # (master epoch, cid, jobid) -> RESULTs
        self.epoch = 0
        self.log: list[str] = []
        self._new_master()

    # --- wiring ------------------------------------------------------------------

    def _new_master(self) -> None:
        self.epoch += 1
        self.limits = {}
        self.dispatcher = Dispatcher(max_attempts=self.max_attempts, clock=lambda: self.now, slots=self.slots,
                                     unplaceable_timeout=self.UNPLACEABLE_TIMEOUT)

    def _peer(self) -> int:
        peer = self.next_peer
        self.next_peer += 1
        return peer

    def _send(self, src, dst, frames) -> None:
        link = self.links.setdefault((src, dst), collections.deque())
        while frames:
            link.append(frames.popleft() if isinstance(frames, collections.deque) else frames.pop(0))

    def _flush_master(self) -> None:
        for peer, frame in self.dispatcher.outbox:
            ftype, _ = decode(frame)
            if ftype == Frame.RESULT:
                jobid = frames.decode_result(decode(frame)[1])[0]
                self.results_sent[(self.epoch, peer, jobid)] += 1
            self.links.setdefault((MASTER, peer), collections.deque()).append(frame)
        self.dispatcher.outbox.clear()

    def _flush_worker(self, w: SimWorker) -> None:
        if not w.gone:
            self._send(w.wid, MASTER, w.core.outbox)

    # --- machines and workers ---------------------------------------------------

    def add_machine(self, processes: int = 1, gpus: int = 0) -> str:
        name = f"m{len(self.machines) + 1}"
        offer = {"cpu": processes, "mem": 1 << 34}
        if gpus:
            offer["gpu"] = gpus
        machine = self.machines[name] = Machine(name, processes, offer, [str(i) for i in range(gpus)])
        for _ in range(processes):
            self._start_process(machine)
        return name

    def _start_process(self, machine: Machine) -> SimWorker:
        w = SimWorker(self._peer(), machine)
        self.workers[w.wid] = w
        machine.alive.add(w.wid)
        self.dispatcher.add_worker(w.wid, w.info)
        self._flush_master()
        self._do(w, w.core.start())
        return w

    def _lose_worker(self, w: SimWorker, replace: bool) -> None:
        """The connection of worker ``w`` is gone: the master forgets it, and
        its process either reconnects with a new session or is replaced."""
        if w.gone:
            return
        self._deliver_all_from(w.wid)     # sent before the socket closed: the master reads it first
        w.gone = True
        self._count_losses(w)
        w.machine.alive.discard(w.wid)
        for key in [k for k in self.links if w.wid in k]:
            del self.links[key]
        self.dispatcher.remove_worker(w.wid)
        self._flush_master()
        if replace:
            self._start_process(w.machine)

    def _do(self, w: SimWorker, actions) -> None:
        """Carries out a worker core's actions, as the thread shell would."""
        for action in actions or ():
            if isinstance(action, Run):
                job = action.job
                cid_name, jobid, kind, value, func = job_fields(job.payload)
                if bytes(job.payload[:1]) == b"\xfe":
                    assert job.function.data == function_bytes(func), f"job {jobid} got another function"
                w.started[job.gid] = {"job": job, "runner": action.runner, "phase": "run",
                                      "key": (cid_name, jobid), "kind": kind, "value": value}
                client = self.clients[cid_name]
                # (A client that left took its values along: its jobs still at workers are being
                # aborted, and one that starts meanwhile fails to fetch what it takes.)
                for dep in client.specs[jobid].deps if not getattr(client, "gone", False) else ():
                    entry = self.dispatcher.kept.entries.get(dep_key(cid_name, dep))
                    assert entry is not None and entry.status == Status.OK, (
                        f"{cid_name} job {jobid} started before the outcome of job {dep} it takes was kept")
                self.runs[(cid_name, jobid)] += 1
            elif isinstance(action, Resume):
                w.started[action.gid]["phase"] = "resumed"
            elif isinstance(action, Flush):
                self._flush_worker(w)
                self._do(w, w.core.sent(action.runner, action.gid))
            elif isinstance(action, Exit):
                self._flush_worker(w)          # what the outbox holds goes out first
                self._lose_worker(w, replace=True)
                return
            elif isinstance(action, End):
                self._flush_worker(w)
                self._lose_worker(w, replace=not action.drained)
                return
        self._flush_worker(w)

    def _deliver_all_from(self, src) -> None:
        while self.links.get((src, MASTER)):
            self.deliver((src, MASTER))

    def deliver_all_from(self, client: str) -> None:
        self._deliver_all_from(self.clients[client].cid)

    # --- clients -------------------------------------------------------------------

    def add_client(self) -> str:
        name = f"c{len(self.clients) + 1}"
        c = self.clients[name] = SimClient(self._peer(), name)
        self._connect(c)
        return name

    def _connect(self, c: SimClient) -> None:
        self.dispatcher.add_client(c.cid, {"role": "client", "host": c.name, "pid": c.cid})
        self._flush_master()
        c.connected = True
        self._send(c.cid, MASTER, collections.deque(c.core.resubmission()))

    def submit(self, client: str, spec: Spec) -> int:
        c = self.clients[client]
        jobid = c.core.new_jobid()
        c.specs[jobid] = spec
        retries = DEFAULT_RETRIES if spec.max_retries is None else spec.max_retries
        options = {}
        if spec.need:
            options["resources"] = spec.need
        if spec.tag:
            options["tag"] = spec.tag
        before, digest = [], None
        if spec.func is not None:
            data = function_bytes(spec.func)
            before = c.core.announce(digest_of(data), data)
            if before is None:
                before = []            # no room: the job carries its function
            else:
                digest = digest_of(data)
        payload = spec.payload(c.name, jobid, named=digest is not None)
        frame = c.core.submit(jobid, retries, 0.0, payload, 0, options or None, digest)
        # A future already answered (or cancelled) would travel as its value: only the others wait.
        spec.deps = tuple(d for d in spec.deps if d in c.specs and d != jobid and d not in c.cancelled
                          and not c.results.get(d))
        if spec.deps:
            c.core.deps[jobid] = kept_wire.encode_deps(jobid, [(dep_key(c.name, d), d) for d in spec.deps])
            before.append(c.core.deps[jobid])
        if c.connected:
            self._send(c.cid, MASTER, [*before, frame])
        return jobid

    def cancel(self, client: str, jobid: int) -> None:
        c = self.clients[client]
        frame = c.core.cancel(jobid)
        if frame is not None:
            c.cancelled.add(jobid)
            if c.connected:
                self._send(c.cid, MASTER, [frame])

    def limit(self, client: str, tag: str, limit: int) -> None:
        c = self.clients[client]
        frame = c.core.limit(tag, limit)
        if c.connected:
            self._send(c.cid, MASTER, [frame])

    def disconnect(self, client: str) -> None:
        """The client goes away for good: its jobs are abandoned."""
        c = self.clients[client]
        for key in [k for k in self.links if c.cid in k]:
            del self.links[key]
        if c.connected:
            self.dispatcher.remove_client(c.cid)
            self._flush_master()
        c.connected = False
        c.core.give_up()
        c.gone = True

    # --- the network -------------------------------------------------------------

    def deliverable(self) -> list:
        out = []
        for key, queue in self.links.items():
            if not queue:
                continue
            src, dst = key
            worker = self.workers.get(src if dst == MASTER else dst)
            if worker is not None and worker.cut:
                continue
            out.append(key)
        return sorted(out, key=str)

    def deliver(self, key) -> None:
        src, dst = key
        frame = self.links[key].popleft()
        ftype, body = decode(frame)
        self.log.append(f"{self.epoch}: {kind_name(ftype)} {src} -> {dst} {body[:24]!r}")
        if dst == MASTER:
            if src in self.workers:
                self._to_master_from_worker(src, ftype, body)
            else:
                self._to_master_from_client(src, ftype, body)
            self._flush_master()
        elif dst in self.workers:
            w = self.workers[dst]
            if not w.gone:
                self._do(w, w.core.receive(ftype, body))
        else:
            c = next((c for c in self.clients.values() if c.cid == dst and c.connected), None)
            if c is None:
                return            # a client gone, or a connection of it that is over
            if ftype == Frame.MISSING:
                self._answer_missing(c, kept_wire.decode_key(body, "MISSING").key)
                return
            event = c.core.receive(ftype, body)
            if isinstance(event, Result):
                c.results[event.jobid].append(event)

    def _answer_missing(self, c: SimClient, key: int) -> None:
        """The master lacks the outcome of a job another takes: the client PUTs what it got."""
        dep = key & 0xFFFFFFFF
        if c.results.get(dep):
            status, payload = c.results[dep][0].status, c.results[dep][0].payload
        else:
            assert dep in c.cancelled, f"{c.name}: MISSING for job {dep}, which it has not seen end"
            status, payload = Status.DEPENDENCY_CANCELLED, kept_wire.cancelled_payload(dep)
        self._send(c.cid, MASTER, [kept_wire.encode_put(key, status, False, payload)])

    def _to_master_from_worker(self, wid: int, ftype: int, body: bytes) -> None:
        if wid not in self.dispatcher.workers:
            return            # the master already dropped it; a real one closed the socket
        assert ftype in inbox.WORKER_FRAMES, f"a worker sent {kind_name(ftype)}"
        try:
            inbox.worker_frame(self.dispatcher, wid, ftype, body)
        except ProtocolError as exc:
            raise AssertionError(f"worker {wid} broke the protocol: {exc}\n" + "\n".join(self.log[-40:])) from None

    def _to_master_from_client(self, cid: int, ftype: int, body: bytes) -> None:
        if cid not in self.dispatcher.clients:
            return
        assert ftype in inbox.CLIENT_FRAMES, f"a client sent {kind_name(ftype)}"
        if ftype == Frame.LIMIT:
            limit = frames.decode_limit(body)
            self.limits[limit.tag] = limit.limit      # what this master was told (a new one is told again)
        inbox.client_frame(self.dispatcher, cid, ftype, body)

    def cut(self, wid: int) -> None:
        self.workers[wid].cut = True

    def heal(self, wid: int) -> None:
        self.workers[wid].cut = False

    def time_out(self, wid: int) -> None:
        """A cut lasted past the peer timeout: the master drops the worker, and
        the worker, hearing nothing, gives up its connection (its started jobs
        run to their end; their outcomes go nowhere) and connects again."""
        w = self.workers[wid]
        self.now += self.peer_timeout
        w.cut = False
        self._count_losses(w)
        for key in [k for k in self.links if wid in k]:
            del self.links[key]
        self.dispatcher.remove_worker(wid)
        self._flush_master()
        w.detached = True
        self._do_detached(w, w.core.closed("the master stopped answering"))

    def _do_detached(self, w: SimWorker, actions) -> None:
        """A worker whose connection is over finishes its started jobs; when
        its session ends it connects again (a new session, a new peer)."""
        for action in actions or ():
            if isinstance(action, Flush):
                w.core.outbox.clear()          # nowhere to send it
                self._do_detached(w, w.core.sent(action.runner, action.gid))
                return
            if isinstance(action, End) or isinstance(action, Exit):
                if not w.gone:
                    w.gone = True
                    w.machine.alive.discard(w.wid)
                    if not (isinstance(action, End) and action.drained):
                        self._start_process(w.machine)
                return
            if isinstance(action, Run):
                raise AssertionError("a worker whose connection is lost started a job")

    def restart_master(self) -> None:
        """The master dies and a new one starts in its place: every connection
        breaks; workers connect again (new sessions), clients connect again and
        give the new master everything it must know (ride-through)."""
        self.links.clear()
        old = list(self.workers.values())
        self._new_master()
        for w in old:
            if w.gone:
                continue
            w.gone = True
            w.machine.alive.discard(w.wid)
            w.core.closed("the master closed the connection")
            self._start_process(w.machine)
        # Limits live in the master, which learns them again from the clients.
        # Until the client that set one is back, others' tagged jobs may run
        # past it (README); here it comes back first.
        for c in self.clients.values():
            if c.connected:
                c.core.connection_lost()
                c.cid = self._peer()
                self._connect(c)
                self._deliver_all_from(c.cid)

    # --- jobs at work --------------------------------------------------------------

    def runnable(self) -> list:
        """(wid, gid) of jobs that can take their next step: the token holder, and waiting jobs."""
        out = []
        for w in self.workers.values():
            if w.gone:
                continue
            for gid in w.started:
                job = w.core.jobs.get(gid)
                if job is None:
                    continue
                if w.core.holder == gid or job.state == "waiting":
                    out.append((w.wid, gid))
        return sorted(out)

    def step_job(self, wid: int, gid: int) -> None:
        w = self.workers[wid]
        s = w.started[gid]
        self.log.append(f"{self.epoch}: step job {gid} ({s['kind']}, {s['phase']}) on worker {wid}")
        core = w.core
        job = core.jobs[gid]
        if job.state == "waiting":
            self._act(w, core.wait_over(s["runner"], gid))
            return
        kind = s["kind"]
        if kind == "crash":
            self._crash(w)
            w.started.pop(gid, None)
            return
        if kind == "wait" and s["phase"] == "run" and not w.gone and not core.lost:
            s["phase"] = "lent"
            actions = core.lend(s["runner"], gid)
            if actions is not None:
                self._act(w, actions)
                return
        w.started.pop(gid)
        if kind == "raise":
            status, data = Status.RAISED, b"raised:%d" % s["value"]
        else:
            status, data = Status.OK, b"value:%d" % s["value"]
        self._act(w, core.finished(s["runner"], gid, status, data))

    def _act(self, w: SimWorker, actions) -> None:
        if getattr(w, "detached", False):
            self._do_detached(w, actions)
        elif not w.gone:
            self._do(w, actions)

    def _count_losses(self, w: SimWorker) -> None:
        """The master is about to lose worker ``w``: each job it counts as
        started there (it cannot know better for a job sent just before a
        crash or a cut) loses an attempt."""
        record = self.dispatcher.workers.get(w.wid)
        for job in record.started() if record is not None else ():
            if job.payload is not None:
                name, jobid = job_fields(job.payload)[:2]
                self.deaths[(name, jobid)] += 1

    def _crash(self, w: SimWorker) -> None:
        """The job ended its process (os._exit, a signal): nothing more is sent."""
        if getattr(w, "detached", False):
            w.gone = True
            w.machine.alive.discard(w.wid)
            self._start_process(w.machine)
            return
        w.core.outbox.clear()
        for key in [k for k in self.links if k[1] == w.wid]:
            del self.links[key]
        self._lose_worker(w, replace=True)

    def kill(self, wid: int) -> None:
        w = self.workers[wid]
        if not w.gone:
            self._crash(w)

    def drain(self, wid: int) -> None:
        w = self.workers[wid]
        if not w.gone and not getattr(w, "detached", False):
            self._do(w, w.core.drain())

    # --- invariants ---------------------------------------------------------------

    def check(self) -> None:
        """What must hold after every step."""
        # A master sends a client at most one RESULT per job.
        twice = [k for k, n in self.results_sent.items() if n > 1]
        assert not twice, f"a job's RESULT was sent twice: {twice}"
        # A job ends once at its client, with its own answer.
        for c in self.clients.values():
            for jobid, results in c.results.items():
                assert len(results) == 1, f"{c.name} job {jobid} ended {len(results)} times"
                self._check_answer(c, jobid, results[0])
        # No machine hands out more than it has; GPUs are never shared.
        for m in self.machines.values():
            per_process = []
            gpu_ids: list = []
            # As the master sees it: a worker it dropped (cut off too long) may still
            # run a job there, which the master can neither know nor count.
            for wid in m.alive:
                w = self.workers[wid]
                if getattr(w, "detached", False):
                    continue
                needs = [self._need(s) for s in w.started.values() if s["job"].gid in w.core.jobs]
                if needs:
                    per_process.append({k: max(n.get(k, 0) for n in needs) for n in needs for k in n})
                    ids = {i for s in w.started.values() if s["job"].env
                           for i in (s["job"].env.get("CUDA_VISIBLE_DEVICES") or "").split(",") if i}
                    gpu_ids += sorted(ids)
            for name, amount in m.offer.items():
                used = sum(n.get(name, 0) for n in per_process)
                assert used <= amount, f"{m.name}: {used} {name} in use of {amount}"
            assert len(gpu_ids) == len(set(gpu_ids)), f"{m.name}: GPU ids shared: {gpu_ids}"
        # A tag's limit holds across the cluster.
        for tag, limit in self.limits.items():
            running = sum(1 for w in self.workers.values() if not w.gone and not getattr(w, "detached", False)
                          for s in w.started.values()
                          if s["job"].gid in w.core.jobs and self._spec(s).tag == tag)
            assert running <= limit, f"{running} jobs tagged {tag} run at once (limit {limit})"

    def _spec(self, s) -> Spec:
        name, jobid = s["key"]
        return self.clients[name].specs[jobid]

    def _need(self, s) -> dict:
        return self._spec(s).need or {"cpu": 1}

    def _check_answer(self, c: SimClient, jobid: int, result: Result) -> None:
        spec = c.specs[jobid]
        assert result.status != Status.KEPT_ERROR, f"{c.name} job {jobid}: {bytes(result.payload)!r}"
        if result.status in (Status.DEPENDENCY, Status.DEPENDENCY_CANCELLED):
            if result.status == Status.DEPENDENCY:
                dep, status, _ = kept_wire.decode_dependency(result.payload)
                ended = c.results.get(dep)
                assert dep in c.cancelled or (ended and ended[0].status == status != Status.OK), (
                    f"{c.name} job {jobid} failed for job {dep}, which did not fail so")
            else:
                dep = kept_wire.decode_cancelled_payload(result.payload)
                ended = c.results.get(dep)
                assert dep in c.cancelled or (ended and ended[0].status == Status.DEPENDENCY_CANCELLED), (
                    f"{c.name} job {jobid} was cancelled for job {dep}, which was not")
            assert dep in spec.deps, f"{c.name} job {jobid} ended for job {dep}, which it does not take"
            return
        for dep in spec.deps:        # it ran: every job it takes ended well (or was cancelled too late)
            ended = c.results.get(dep)
            assert dep in c.cancelled or (ended and ended[0].status == Status.OK), (
                f"{c.name} job {jobid} ran though job {dep}, which it takes, did not end well")
        if result.status == Status.UNPLACEABLE:
            need = spec.need or {"cpu": 1}
            fits = [m.name for m in self.machines.values() if m.alive
                    and all(m.offer.get(k, 0) >= v for k, v in need.items())]
            assert not fits, f"{c.name} job {jobid} needing {need} was called unplaceable, but {fits} could run it"
            return
        if spec.kind == "crash":
            assert result.status == Status.LOST, f"{c.name} job {jobid} (crash) ended {result.status}"
        elif spec.kind == "raise":
            expected = (Status.RAISED, b"raised:%d" % spec.value)
            assert (result.status, result.payload) in (expected, (Status.LOST, result.payload))
        else:
            assert result.status in (Status.OK, Status.LOST), f"{c.name} job {jobid} ended {result.status}"
            if result.status == Status.OK:
                assert result.payload == b"value:%d" % spec.value
            else:
                # Lost only when its worker processes died under it as often as it may run.
                attempts = json.loads(result.payload)["attempts"]
                tries = self.max_attempts if spec.max_retries is None else spec.max_retries + 1
                assert attempts == tries <= self.deaths[(c.name, jobid)], (c.name, jobid, attempts, tries)

    # --- the end ---------------------------------------------------------------------

    def settle(self, max_steps: int = 20000) -> None:
        """Heals every cut, then delivers every frame and runs every job until
        nothing moves; then every job of a client still there has ended once."""
        for w in self.workers.values():
            w.cut = False
        expired = False
        added = False
        for _ in range(max_steps):
            links = self.deliverable()
            if links:
                self.deliver(links[0])
                self.check()
                continue
            jobs = self.runnable()
            if jobs:
                self.step_job(*jobs[0])
                self.check()
                continue
            if not added and not any(not w.gone and not w.core.draining for w in self.workers.values()):
                # Every worker drained away: progress needs one more (jobs wait for it meanwhile).
                added = True
                self.add_machine()
                continue
            if not expired:
                # Jobs that no machine can run fail once the master stops waiting for one.
                expired = True
                self.now += self.UNPLACEABLE_TIMEOUT + 1
                self.dispatcher.expire()
                self._flush_master()
                continue
            break
        else:
            raise AssertionError("the simulation did not settle; last steps:\n" + "\n".join(self.log[-30:]))
        for c in self.clients.values():
            if getattr(c, "gone", False):
                continue
            for jobid in c.specs:
                if jobid in c.cancelled:
                    continue
                assert len(c.results[jobid]) == 1, (
                    f"{c.name} job {jobid} ({c.specs[jobid]}) never ended; "
                    f"queued at the master: {self.dispatcher.queued}\n" + "\n".join(self.log[-40:]))
