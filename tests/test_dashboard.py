"""The dashboard against a real cluster: its page, JSON, Prometheus metrics
(parsed with prometheus_client's parser and checked against the cluster),
the token rules, ``cw status --prometheus``, and the REST API for command
jobs (real HTTP requests, an abort, a restart of the dashboard)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("aiohttp")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from tests.conftest import wait_until as wait_for  # noqa: E402
from tests.dashboard_process import DashboardProcess  # noqa: E402


def square(x):
    print("square of", x)
    return x * x


def fails():
    raise RuntimeError("this job failed on purpose")


@pytest.fixture
def dashboard(cluster, tmp_path):
    dash = DashboardProcess(cluster.address, str(tmp_path / "jobs.sqlite"))
    yield dash
    dash.stop()


def metrics(text: str) -> dict:
    """{(name, frozenset(labels)): value} of every sample."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def run_jobs(cluster, n_ok: int, n_failed: int) -> None:
    with cluster.executor() as ex:
        futures = [ex.submit(square, i) for i in range(n_ok)] + [ex.submit(fails) for _ in range(n_failed)]
        for f in futures[:n_ok]:
            f.result()
        for f in futures[n_ok:]:
            assert isinstance(f.exception(), RuntimeError)


def test_the_page_status_and_metrics_follow_the_cluster(cluster, dashboard):
    wait_for(lambda: dashboard.get("/health")[1]["master"], what="the dashboard to reach the master")
    run_jobs(cluster, 12, 1)
    stats = wait_for(lambda: (s := dashboard.get("/api/stats")[1])["jobs_total"].get("ok") == 12 and s,
                     what="the dashboard to count 12 jobs")
    assert stats["jobs_total"] == {"ok": 12, "raised": 1} and stats["workers"] == 2
    status, text = dashboard.get("/metrics")
    assert status == 200
    samples = metrics(text)
    assert samples[("cw_jobs_total", frozenset({("outcome", "ok")}))] == 12
    assert samples[("cw_jobs_total", frozenset({("outcome", "raised")}))] == 1
    assert samples[("cw_job_seconds_count", frozenset())] == 13
    assert samples[("cw_up", frozenset())] == 1
    wait_for(lambda: metrics(dashboard.get("/metrics")[1])[("cw_workers", frozenset({("state", "idle")}))] == 2,
             what="both workers idle in /metrics")
    view = dashboard.get("/api/view")[1]
    assert len(view["bars"]) == 13 and set(view["functions"]) == {f"{__name__}.square", f"{__name__}.fails"}
    (failure,) = view["failures"]
    assert "this job failed on purpose" in failure["traceback"]
    client, job = view["bars"][0][:2]
    detail = dashboard.get(f"/api/stream/{client}/{job}")[1]
    assert detail["output"].startswith("square of") and detail["outcome"] == "ok"
    assert "/static/dashboard.js" in dashboard.get("/")[1]
    assert "EventSource" in dashboard.get("/static/dashboard.js")[1]
    assert dashboard.get("/static/elsewhere.js")[0] == 404
    assert [w["pid"] for w in dashboard.get("/api/workers")[1]] == [w["pid"] for w in view["status"]["workers"]]


def test_on_loopback_the_page_is_open_but_job_calls_need_the_token(dashboard):
    assert dashboard.get("/api/status")[0] == 200
    status, answer = dashboard.get("/api/jobs")
    assert status == 403 and answer["field"] == "token"
    assert dashboard.get("/api/jobs", token="wrong")[0] == 403
    assert dashboard.get("/api/jobs", token=dashboard.token) == (200, [])


def test_beyond_loopback_every_request_needs_the_token(cluster, tmp_path):
    dash = DashboardProcess(cluster.address, str(tmp_path / "jobs.sqlite"), http="0.0.0.0:0")
    try:
        for path in ("/", "/api/status", "/metrics", "/events", "/health"):
            assert dash.get(path)[0] == 403, path
        assert dash.get("/api/status", token=dash.token)[0] == 200
        assert dash.get(f"/metrics?token={dash.token}")[0] == 200
    finally:
        dash.stop()


def test_cw_status_prints_prometheus_text_for_a_textfile_collector(cluster):
    run_jobs(cluster, 3, 0)
    out = subprocess.run([sys.executable, "-m", "cw", "status", cluster.address, "--prometheus"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    samples = metrics(out)
    assert samples[("cw_workers", frozenset({("state", "idle")}))] + \
        samples[("cw_workers", frozenset({("state", "busy")}))] == 2
    assert sum(v for (name, _), v in samples.items() if name == "cw_worker_jobs_total") >= 3
    assert samples[("cw_jobs_queued", frozenset())] == 0


# --- the REST API for command jobs -------------------------------------------------------

def niceness(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rpartition(")")[2].split()[16])   # field 19 of proc(5): nice


def test_the_dashboard_lowers_its_own_priority_unless_told_not_to(cluster, tmp_path):
    # A monitoring tool on the cluster's machine must yield the CPU to the cluster.
    mine = niceness(os.getpid())
    for args, expected in (((), min(19, mine + 10)), (("--nice", "3"), min(19, mine + 3)), (("--nice", "0"), mine)):
        dash = DashboardProcess(cluster.address, str(tmp_path / "jobs.sqlite"), args=args)
        try:
            assert niceness(dash.proc.pid) == expected, args
        finally:
            dash.stop()


def test_a_bad_niceness_is_refused_with_its_range(tmp_path):
    answer = subprocess.run([sys.executable, "-m", "cw.dashboard", "--nice", "-5"], capture_output=True, text=True,
                            timeout=60)
    assert answer.returncode == 2
    assert "--nice takes a whole number from 0 to 19" in answer.stderr


def job_state(dash, jobid):
    return dash.get(f"/api/jobs/{jobid}", token=dash.token)[1]["state"]


def test_command_jobs_over_http_run_report_abort_and_survive_a_restart(cluster, tmp_path):
    db = str(tmp_path / "jobs.sqlite")
    dash = DashboardProcess(cluster.address, db)
    try:
        post = lambda body: dash.request("POST", "/api/jobs", body, token=dash.token)  # noqa: E731
        status, answer = post({"command": ["sh", "-c", "echo out; echo err >&2"], "env": {"A": "1"}, "timeout": 60})
        assert status == 201
        done = answer["id"]
        wait_for(lambda: job_state(dash, done) == "done", what="the echo job to finish")
        record = dash.get(f"/api/jobs/{done}", token=dash.token)[1]
        assert record["exit_code"] == 0 and record["worker"] and record["ended"] >= record["submitted"]
        assert dash.get(f"/api/jobs/{done}/logs", token=dash.token)[1] | {"id": 0} == \
            {"id": 0, "state": "done", "stdout": "out\n", "stderr": "err\n"}
        failing = post({"command": ["sh", "-c", "exit 3"]})[1]["id"]
        wait_for(lambda: job_state(dash, failing) == "failed", what="the failing job")
        assert dash.get(f"/api/jobs/{failing}", token=dash.token)[1]["exit_code"] == 3
        # Bad input: 400 naming the field.
        for body, field in (({}, "command"), ({"command": []}, "command"),
                            ({"command": ["x"], "timeout": -1}, "timeout"),
                            ({"command": ["x"], "env": {"A": 1}}, "env"), ({"command": ["x"], "gpus": 1}, "gpus"),
                            ({"command": ["x"], "resources": {"cpu": "many"}}, "resources"), ([1], "body")):
            status, answer = post(body)
            assert (status, answer["field"]) == (400, field), body
        assert dash.request("POST", "/api/jobs", b"{not json", token=dash.token)[1]["field"] == "body"
        assert dash.get("/api/jobs?state=nonsense", token=dash.token)[1]["field"] == "state"
        assert dash.get("/api/jobs/999", token=dash.token)[0] == 404
        # Abort a running job.
        aborted = post({"command": ["sleep", "300"]})[1]["id"]
        wait_for(lambda: job_state(dash, aborted) == "running", what="the sleep job to start")
        assert dash.request("DELETE", f"/api/jobs/{aborted}", token=dash.token) == (200, {"id": aborted,
                                                                                         "state": "aborted"})
        assert dash.request("DELETE", f"/api/jobs/{done}", token=dash.token)[0] == 409
        wait_for(lambda: all(w["state"] == "idle" for w in cluster_workers(dash)), what="the worker freed")
        # A job unfinished when the dashboard stops is reported lost after its restart.
        unfinished = post({"command": ["sleep", "300"]})[1]["id"]
        wait_for(lambda: job_state(dash, unfinished) == "running", what="the second sleep job to start")
    finally:
        dash.stop()
    dash = DashboardProcess(cluster.address, db)
    try:
        states = {j["id"]: j["state"] for j in dash.get("/api/jobs", token=dash.token)[1]}
        assert states == {done: "done", failing: "failed", aborted: "aborted", unfinished: "lost"}
        assert "stopped" in dash.get(f"/api/jobs/{unfinished}", token=dash.token)[1]["error"]
        assert [j["id"] for j in dash.get("/api/jobs?state=done", token=dash.token)[1]] == [done]
        spec = dash.get("/openapi.json", token=dash.token)[1]
        assert spec["openapi"].startswith("3.") and "/api/jobs/{id}/logs" in spec["paths"]
    finally:
        dash.stop()


def cluster_workers(dash):
    return dash.get("/api/workers")[1]
