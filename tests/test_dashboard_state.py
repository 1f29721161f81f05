"""Unit tests of what the dashboard remembers (cw.dashboard.state) and of the
metrics made from a status (cw.ops.metrics), on hand-written inputs."""
from __future__ import annotations

import pytest

from cw.ops.metrics import status_metrics, text_format

prometheus_parser = pytest.importorskip("prometheus_client.parser")

FIELDS = ["job", "client", "worker", "function", "start", "end", "outcome", "traceback", "output"]


def events(rows, counts, dropped=0):
    return {"fields": FIELDS, "events": rows, "dropped": dropped, "counts": counts,
            "jobs": [dict(zip(FIELDS, r, strict=True)) for r in rows]}


class Clock:
    now = 1000.0

    def __call__(self):
        return self.now


def test_counts_grow_by_the_masters_deltas_and_start_again_after_a_new_feed():
    from cw.dashboard.state import DashboardState
    state = DashboardState(Clock())
    state.on_events(events([], {"ok": 5}))
    state.on_events(events([], {"ok": 7, "raised": 1}, dropped=3))
    assert state.jobs_total == {"ok": 7, "raised": 1} and state.dropped_total == 3
    state.on_lost()                               # a new connection: the master's feed counts from 0
    state.on_events(events([], {"ok": 2}))
    assert state.jobs_total == {"ok": 9, "raised": 1}


def test_a_start_then_an_end_make_one_bar_and_a_failure_keeps_its_traceback():
    from cw.dashboard.state import DashboardState
    state = DashboardState(Clock())
    state.on_events(events([[1, 3, 5, "m.f", 990.0, None, None, None, None]], {}))
    state.on_events(events([[1, 3, 5, None, None, 992.5, "raised", "Traceback...boom", "hi"]], {"raised": 1}))
    view = state.view()
    assert view["bars"] == [[3, 1, 5, 0, 990.0, 992.5, "raised"]] and view["functions"] == ["m.f"]
    assert view["failures"][0]["traceback"] == "Traceback...boom"
    assert state.job(3, 1)["output"] == "hi"
    assert state.job_seconds_sum == 2.5 and sum(state.job_seconds) == 1


def test_the_pushed_text_says_what_the_view_says_as_bars_end_and_change():
    import json

    from cw.dashboard.state import DashboardState
    state = DashboardState(Clock())
    state.on_events(events([[1, 3, 5, "m.f", 990.0, None, None, None, None],
                            [2, 3, 6, "m.g", 990.5, 991.0, "ok", None, None]], {"ok": 1}))
    assert json.loads(state.view_json("an error")) == state.view("an error")
    state.on_events(events([[1, 3, 5, None, None, 992.5, "raised", "Traceback...boom", None]], {"raised": 1}))
    state.view_json()                                 # the ended bars' texts are kept...
    state.on_events(events([[2, 3, 6, None, None, 993.0, "lost", None, None]], {}))   # ...until a bar changes
    pushed = json.loads(state.view_json())
    assert pushed == state.view() and pushed["bars"][1][6] == "lost"
    assert "_bar" not in state.job(3, 2)


def test_old_jobs_fall_off_the_stream_and_a_gone_workers_job_ends():
    from cw.dashboard import state as module
    clock = Clock()
    state = module.DashboardState(clock)
    state.on_events(events([[1, 3, 5, "f", 10.0, 11.0, "ok", None, None],
                            [2, 3, 6, "f", 999.0, None, None, None, None]], {"ok": 1}))
    assert [k for k in state.jobs] == [(3, 2)]     # job 1 ended long before the stream's horizon
    state.on_status({"workers": [{"id": 5}], "queued": 0})
    assert state.job(3, 2)["outcome"] == "lost" and state.samples[-1][1:] == [1, 0]


def test_a_job_whose_end_was_dropped_ends_once_the_status_no_longer_shows_it():
    from cw.dashboard.state import DashboardState
    clock = Clock()
    state = DashboardState(clock)
    state.on_events(events([[1, 3, 5, "f", 990.0, None, None, None, None],
                            [2, 3, 5, "f", 990.0, None, None, None, None]], {}, dropped=2))
    state.on_status({"workers": [{"id": 5, "current_jobs": {"3": [2]}}]})
    assert state.job(3, 1)["end"] == 1000.0 and state.job(3, 1)["outcome"] == "?"
    assert state.job(3, 2)["end"] is None


STATUS = {
    "workers": [{"id": 1, "host": "a", "pid": 1, "state": "busy", "jobs_done": 4, "failures": 1},
                {"id": 2, "host": "a", "pid": 2, "state": "idle", "jobs_done": 0, "failures": 0}],
    "clients": [{"id": 3}], "queues": [{"client": 3, "priority": 0, "queued": 5},
                                        {"client": 4, "priority": 0, "queued": 2},
                                        {"client": 4, "priority": 9, "queued": 1}],
    "waiting": [{"client": 3, "count": 2, "reason": "needs gpu=4"}],
    "limits": {"db": {"running": 1, "limit": 2}}, "queued": 8, "running": 1,
    "throughput": {"per_s": 1.5}, "master": {"uptime_s": 10.0, "rss_bytes": 1000},
}


def test_status_metrics_in_text_format_parse_back_with_prometheus_clients_parser():
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in prometheus_parser.text_string_to_metric_families(text_format(status_metrics(STATUS)))
               for s in f.samples}
    assert samples[("cw_workers", (("state", "busy"),))] == 1
    assert samples[("cw_workers", (("state", "draining"),))] == 0
    assert samples[("cw_queue_jobs", (("priority", "0"),))] == 7
    assert samples[("cw_queue_jobs", (("priority", "9"),))] == 1
    assert samples[("cw_worker_jobs_total", (("worker", "a:1"),))] == 4
    assert samples[("cw_unplaceable_jobs", ())] == 2
    assert samples[("cw_limit_max", (("tag", "db"),))] == 2
    assert samples[("cw_jobs_queued", ())] == 8 and samples[("cw_master_resident_memory_bytes", ())] == 1000


def test_a_status_without_keys_gives_the_families_it_can():
    names = {f.name for f in status_metrics({})}
    assert "cw_workers" in names and "cw_jobs_queued" not in names
    assert text_format(status_metrics({})).endswith("\n")
