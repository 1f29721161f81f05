"""The function cache's pure parts: the client's cache and its check of a
hit (cw.client.functions), the client core's announcements, the master's
store (cw.master.functions, through the dispatcher), the worker core's NEED
path, and a named payload run on a worker (cw.wire.payload)."""
from __future__ import annotations

import pytest

from cw.client.core import ClientCore
from cw.client.functions import FunctionCache
from cw.errors import ProtocolError
from cw.master.dispatch import Dispatcher
from cw.master.functions import FunctionStore
from cw.wire import frames as f
from cw.wire import payload
from cw.wire.decoder import FrameDecoder
from cw.wire.frames import Frame, Status
from cw.worker.core import Run, WorkerCore
from cw.worker.functions import FunctionLRU


def script(source: str) -> dict:
    """The namespace of ``source`` run as a user's script: its functions are
    ``__main__``'s, which cloudpickle sends by value."""
    namespace = {"__name__": "__main__"}
    exec(compile(source, "<script>", "exec"), namespace)
    return namespace


def decoded(outbox) -> list:
    """(kind name, body) of each frame in a list of frames."""
    decoder = FrameDecoder()
    for frame in outbox:
        decoder.feed(b"".join(bytes(c) for c in frame) if type(frame) is tuple else frame)
    out = []
    while (item := decoder.next_frame()) is not None:
        out.append((Frame(item[0]).name, bytes(item[1])))
    return out


# --- the client's cache ------------------------------------------------------------

def test_a_hit_is_not_pickled_again_and_a_module_function_is_not_cached():
    cache = FunctionCache()
    ns = script("def f(x):\n    return x + 1\n")
    first = cache.lookup(ns["f"])
    assert first is not None and cache.pickled == 1
    assert cache.lookup(ns["f"]) is first and cache.pickled == 1
    assert first[0] == payload.digest_of(first[1])
    assert cache.lookup(payload.digest_of) is None          # a module's function: sent by name


def test_a_rebound_global_gives_the_new_value_and_a_new_digest():
    cache = FunctionCache()
    ns = script("offset = 1\ndef f(x):\n    return x + offset\n")
    before = cache.lookup(ns["f"])
    ns["offset"] = 2
    after = cache.lookup(ns["f"])
    assert after[0] != before[0] and cache.pickled == 2
    assert payload.loads(after[1])(1) == 3


def test_a_global_defined_later_a_changed_default_and_a_new_attribute_are_seen():
    cache = FunctionCache()
    ns = script("def f(x, k=1):\n    return helper(x) * k\n")
    digests = {cache.lookup(ns["f"])[0]}
    ns["helper"] = abs
    digests.add(cache.lookup(ns["f"])[0])
    ns["f"].__defaults__ = (2,)
    digests.add(cache.lookup(ns["f"])[0])
    ns["f"].note = "x"
    digests.add(cache.lookup(ns["f"])[0])
    assert len(digests) == 4


def test_a_function_redefined_under_its_name_is_a_new_entry():
    cache = FunctionCache()
    ns = script("def f(x):\n    return x + 1\n")
    old = cache.lookup(ns["f"])
    exec("def f(x):\n    return x + 2\n", ns)
    new = cache.lookup(ns["f"])
    assert new[0] != old[0] and payload.loads(new[1])(1) == 3


def test_a_global_of_a_main_function_it_calls_is_watched_too():
    cache = FunctionCache()
    ns = script("scale = 2\ndef helper(x):\n    return x * scale\ndef f(x):\n    return helper(x)\n")
    before = cache.lookup(ns["f"])
    ns["scale"] = 3
    after = cache.lookup(ns["f"])
    assert after[0] != before[0] and payload.loads(after[1])(1) == 3


def test_closures_over_different_values_differ_and_a_new_lambda_of_the_same_objects_is_not_pickled():
    cache = FunctionCache()

    def make(n):
        return lambda x: x + n
    one, two = cache.lookup(make(1)), cache.lookup(make(2))
    assert one[0] != two[0] and cache.pickled == 2
    big = 10 ** 30                                  # one object captured by both closures
    assert cache.lookup(make(big)) == cache.lookup(make(big))
    assert cache.pickled == 3                       # the second one was made of the same objects


def test_a_bound_method_sees_its_instance_attribute_rebound():
    cache = FunctionCache()
    ns = script("class Model:\n    def __init__(self):\n        self.w = 1\n"
                "    def predict(self, x):\n        return self.w * x\nmodel = Model()\n")
    model = ns["model"]
    before = cache.lookup(model.predict)
    assert cache.lookup(model.predict) is before          # a new bound method object: the same entry
    model.w = 5
    after = cache.lookup(model.predict)
    assert after[0] != before[0] and payload.loads(after[1])(2) == 10


def test_a_method_of_a_module_class_is_not_pickled_by_the_cache(monkeypatch):
    """Its instance travels with each call anyway: pickling it here too would do it twice."""
    def refuse(func):
        raise AssertionError(f"{func!r} was pickled")
    monkeypatch.setattr(payload, "pickle_by_value", refuse)
    assert FunctionCache().lookup(FunctionCache(max_entries=1).lookup) is None


def test_a_global_changed_in_place_is_not_seen_as_documented():
    cache = FunctionCache()
    ns = script("table = [1]\ndef f():\n    return sum(table)\n")
    before = cache.lookup(ns["f"])
    ns["table"].append(2)
    assert cache.lookup(ns["f"]) is before      # rebind it (table = table + [2]) to be seen


def test_the_cache_is_bounded_and_lets_the_least_recently_used_go():
    cache = FunctionCache(max_entries=2)
    fns = [script(f"def f():\n    return {i}\n")["f"] for i in range(3)]
    for fn in fns:
        cache.lookup(fn)
    assert len(cache._entries) == 2 and id(fns[0]) not in cache._entries


# --- the client core -------------------------------------------------------------------

def test_a_function_is_announced_once_and_again_to_a_new_master_before_its_jobs():
    core = ClientCore({})
    assert decoded(core.announce(b"d" * 16, b"fn")) == [("FUNC", b"d" * 16 + b"fn")]
    assert core.announce(b"d" * 16, b"fn") == []
    submit = core.submit(core.new_jobid(), 0xFF, 0.0, b"\xfe" + b"d" * 16 + b"args", digest=b"d" * 16)
    kinds = [kind for kind, _ in decoded(core.resubmission())]
    assert kinds == ["CONTEXT", "FUNC", "SUBMIT"] and core.resubmission()[-1] == submit


def test_only_functions_no_job_names_are_forgotten_to_make_room():
    core = ClientCore({})
    core.MAX_FUNCTIONS = 2
    core.announce(b"a" * 16, b"fa")
    core.announce(b"b" * 16, b"fb")
    jobid = core.new_jobid()
    core.submit(jobid, 0xFF, 0.0, b"p", digest=b"a" * 16)
    assert decoded(core.announce(b"c" * 16, b"fc")) == [("FORGET", b"b" * 16), ("FUNC", b"c" * 16 + b"fc")]
    other = core.new_jobid()
    core.submit(other, 0xFF, 0.0, b"p", digest=b"c" * 16)
    assert core.announce(b"e" * 16, b"fe") is None        # both in use: that job carries its function
    core.cancel(jobid)
    assert decoded(core.announce(b"e" * 16, b"fe"))[0] == ("FORGET", b"a" * 16)


# --- the master -------------------------------------------------------------------------

DIGEST_DATA = b"pickled function"
DIGEST = payload.digest_of(DIGEST_DATA)
NAMED = b"\xfe" + DIGEST + b"\x80args"


def dispatcher_with_worker() -> Dispatcher:
    d = Dispatcher()
    d.add_client(1, {})
    d.add_worker(10, {"host": "h", "pid": 1})
    d.outbox.clear()
    return d


def test_the_master_sends_a_function_to_a_worker_once_before_the_first_job_naming_it():
    d = dispatcher_with_worker()
    d.add_function(1, DIGEST, DIGEST_DATA)
    d.submit(1, 1, 0xFF, 0.0, NAMED)
    assert [k for k, _ in decoded(frame for _, frame in d.outbox)] == ["CONTEXT", "FUNC", "JOB"]
    gid = d.workers[10].jobs[0].gid
    d.outbox.clear()
    d.outcome(10, gid, Status.OK, b"r")
    d.submit(1, 2, 0xFF, 0.0, NAMED)
    assert [k for _, frame in d.outbox for k, _ in decoded([frame])] == ["RESULT", "JOB"]
    assert d.status()["functions"]["sent_to_workers"] == 1


def test_a_worker_that_needs_a_function_gets_it_while_a_client_holds_it():
    d = dispatcher_with_worker()
    d.add_function(1, DIGEST, DIGEST_DATA)
    d.need(10, DIGEST)
    assert decoded([d.outbox.pop()[1]]) == [("FUNC", DIGEST + DIGEST_DATA)]
    d.remove_client(1)
    d.outbox.clear()
    d.need(10, DIGEST)                  # nobody holds it: its job is being aborted
    assert d.outbox == [] and d.functions.frames == {}


def test_a_job_naming_a_function_its_client_did_not_send_or_forgot_is_refused():
    d = dispatcher_with_worker()
    with pytest.raises(ProtocolError, match="did not send"):
        d.submit(1, 1, 0xFF, 0.0, NAMED)
    d.add_function(1, DIGEST, DIGEST_DATA)
    d.forget_function(1, DIGEST)
    with pytest.raises(ProtocolError, match="FORGET"):
        d.submit(1, 2, 0xFF, 0.0, NAMED)


def test_the_store_checks_digests_bounds_each_client_and_shares_copies():
    store = FunctionStore(max_per_client=1)
    with pytest.raises(ProtocolError, match="digest does not match"):
        store.add(1, b"x" * 16, DIGEST_DATA)
    store.add(1, DIGEST, DIGEST_DATA)
    store.add(1, DIGEST, DIGEST_DATA)           # again: nothing changes
    other = b"another function"
    with pytest.raises(ProtocolError, match="more than 1 functions"):
        store.add(1, payload.digest_of(other), other)
    store.add(2, DIGEST, DIGEST_DATA)
    assert len(store.frames) == 1
    store.drop_client(1)
    assert DIGEST in store.frames
    store.forget(2, DIGEST)
    assert store.frames == {} and store.holders == {}


# --- the worker core ------------------------------------------------------------------------

def started(lru_size: int = 4) -> WorkerCore:
    core = WorkerCore(pid=1, functions=FunctionLRU(lru_size))
    core.start()
    return core


def named(digest: bytes) -> bytes:
    return b"\xfe" + digest + b"\x80args"


def test_a_job_naming_a_function_the_worker_has_runs_with_its_entry():
    core = started()
    core.function(b"a" * 16, b"fa")
    run = next(a for a in core.job(1, 0, 0.0, named(b"a" * 16)) if type(a) is Run)
    assert run.job.function.data == b"fa"


def test_a_job_whose_function_is_missing_asks_for_it_and_later_jobs_wait_behind_it_in_order():
    core = started()
    core.function(b"b" * 16, b"fb")
    assert core.job(1, 0, 0.0, named(b"a" * 16)) == []
    assert core.job(2, 0, 0.0, named(b"b" * 16)) == []        # it has its function, but waits its turn
    assert core.job(3, 0, 0.0, named(b"a" * 16)) == []
    assert decoded(core.outbox) == [("NEED", b"a" * 16)]       # asked once
    core.outbox.clear()
    actions = core.function(b"a" * 16, b"fa")
    assert [a.job.gid for a in actions if type(a) is Run] == [1]
    assert [j.gid for j in core.queue] == [2, 3] and not core.stalled


def test_a_waiting_job_is_given_back_on_revoke_and_on_drain():
    core = started()
    core.job(1, 0, 0.0, named(b"a" * 16))
    core.job(2, 0, 0.0, b"\x80plain")
    core.outbox.clear()
    core.revoke(2)
    core.drain()
    assert decoded(core.outbox)[:2] == [("REVOKED", f.encode_revoked(2, True)[5:]),
                                        ("REVOKED", f.encode_revoked(1, True)[5:])]


def test_jobs_behind_a_waiting_job_that_is_aborted_go_on():
    """The client cancelled the job, then forgot its function: no FUNC will come for it."""
    core = started()
    core.function(b"b" * 16, b"fb")
    core.job(1, 0, 0.0, named(b"a" * 16))
    core.job(2, 0, 0.0, named(b"b" * 16))
    actions = core.abort(1)
    assert [a.job.gid for a in actions if type(a) is Run] == [2] and not core.stalled


def test_a_function_the_lru_let_go_before_its_job_could_go_is_asked_for_again():
    core = started(lru_size=1)
    core.job(1, 0, 0.0, named(b"a" * 16))
    core.job(2, 0, 0.0, named(b"b" * 16))
    core.outbox.clear()
    core.function(b"b" * 16, b"fb")         # b first: job 1 still waits for a
    core.function(b"a" * 16, b"fa")         # a pushes b out of the LRU of one
    assert decoded(core.outbox) == [("NEED", b"b" * 16)]
    assert [j.gid for j in core.stalled] == [2]


# --- a named payload on the worker --------------------------------------------------------

def test_a_named_payload_runs_and_its_function_is_unpickled_once():
    from cw.worker.functions import FunctionEntry
    ns = script("def f(x, y=0):\n    return x * 10 + y\n")
    data = payload.pickle_by_value(ns["f"])
    entry = FunctionEntry(data)
    digest = payload.digest_of(data)
    before = payload.functions_loaded
    call = payload.dumps_call_named(ns["f"], digest, (4,), {"y": 2})
    assert payload.run_payload(call, None, entry) == (Status.OK, payload.dumps(42))
    batch = payload.dumps_batch_named(ns["f"], digest, [(1,), (2,)])
    status, data = payload.run_payload(batch, None, entry)
    assert list(payload.batch_items(payload.loads(data))) == [(True, 10), (True, 20)]
    assert payload.functions_loaded == before + 1
    status, _ = payload.run_payload(call, None, None)
    assert status == Status.RAISED
