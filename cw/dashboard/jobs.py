"""The dashboard's REST API for command jobs (``cw.command``), for people and
programs that are not Python:

    POST   /api/jobs            {"command": [...], "image", "resources", "timeout", "env"} -> 201 {"id"}
    GET    /api/jobs?state=S    the jobs (newest first), optionally in one state
    GET    /api/jobs/ID         state, worker, times, exit code
    GET    /api/jobs/ID/logs    stdout and stderr
    DELETE /api/jobs/ID         abort it (queued: withdrawn; running: stopped on its worker)
    GET    /openapi.json        this API's description

Every call needs the dashboard's token (cw.dashboard.app), even on loopback.
Bad input gets a 400 whose JSON names the field.

Job records (never payloads) live in SQLite through the standard library,
so the history survives a restart of the dashboard.  The jobs themselves
belong to the dashboard's connection to the master: when the process stops,
the master drops its queued jobs and aborts its running ones.  So a job
unfinished at a restart is reported as ``lost``, with that reason: cw does
not re-attach it.
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import sqlite3
import threading
import time

from aiohttp import web

STATES = ("queued", "running", "done", "failed", "aborted", "lost")
_FIELDS = ("command", "image", "resources", "timeout", "env")
_COLUMNS = ("id", "state", "command", "image", "resources", "timeout", "env", "submitted", "ended", "worker",
            "exit_code", "error")
LOST_REASON = ("the dashboard stopped before the job ended; its connection to the master closed, so the master "
               "dropped or aborted the job (jobs are not re-attached after a restart)")


def default_db() -> str:
    folder = os.environ.get("CW_STATE_DIR") or os.path.join(os.path.expanduser("~"), ".cw")
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, "dashboard-jobs.sqlite")


def check_request(body) -> dict:
    """The POST body, checked; raises ValueError(field, what is wrong)."""
    if not isinstance(body, dict):
        raise ValueError("body", "the body must be a JSON object like {\"command\": [\"echo\", \"hi\"]}")
    for key in body:
        if key not in _FIELDS:
            raise ValueError(key, f"unknown field {key!r}; the fields are {', '.join(_FIELDS)}")
    command = body.get("command")
    if not isinstance(command, list) or not command or not all(isinstance(a, str) for a in command) \
            or not command[0]:
        raise ValueError("command", "command must be a non-empty list of strings, the program first: [\"ls\", \"-l\"]")
    image = body.get("image")
    if image is not None and (not isinstance(image, str) or not image.strip()):
        raise ValueError("image", "image must be a container image name (a string) or null")
    timeout = body.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not math.isfinite(timeout) or timeout <= 0):
        raise ValueError("timeout", "timeout must be a positive number of seconds or null")
    env = body.get("env")
    if env is not None and (not isinstance(env, dict) or
                            not all(isinstance(k, str) and k and isinstance(v, str) for k, v in env.items())):
        raise ValueError("env", "env must be an object of string names to string values")
    resources = body.get("resources")
    if resources is not None:
        from cw.client.executor import scheduling_options
        try:
            if not isinstance(resources, dict):
                raise TypeError("resources must be an object like {\"cpu\": 2, \"mem\": \"4G\"}")
            scheduling_options(resources=resources)
        except (TypeError, ValueError) as exc:
            raise ValueError("resources", str(exc)) from None
    return {"command": command, "image": image, "timeout": timeout, "env": env, "resources": resources}


class CommandJobs:
    def __init__(self, db_path: str, host: str, port: int):
        self.host, self.port = host, port
        self.lock = threading.Lock()
        self.db = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
        self.db.execute("CREATE TABLE IF NOT EXISTS jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, state TEXT, "
                        "command TEXT, image TEXT, resources TEXT, timeout REAL, env TEXT, submitted REAL, "
                        "ended REAL, worker TEXT, exit_code INTEGER, error TEXT, stdout TEXT, stderr TEXT)")
        self.db.execute("UPDATE jobs SET state = 'lost', error = ?, ended = ? WHERE state IN ('queued', 'running')",
                        (LOST_REASON, time.time()))
        self.futures: dict = {}
        self.executor = None
        self.closing = False

    def close(self) -> None:
        """The process stops: its unfinished jobs go with its connection."""
        with self.lock:
            self.closing = True
            self.db.execute("UPDATE jobs SET state = 'lost', error = ?, ended = ? WHERE state IN ('queued', 'running')",
                            (LOST_REASON, time.time()))
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
        with self.lock:
            self.db.close()

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/api/jobs", self.post)
        app.router.add_get("/api/jobs", self.list)
        app.router.add_get("/api/jobs/{id}", self.get)
        app.router.add_get("/api/jobs/{id}/logs", self.logs)
        app.router.add_delete("/api/jobs/{id}", self.delete)
        app.router.add_get("/openapi.json", self.openapi)

    # --- records ----------------------------------------------------------------

    def _update(self, jobid: int, **values) -> None:
        with self.lock:
            if self.closing:
                return            # close() said what became of the unfinished ones
            sets = ", ".join(f"{k} = ?" for k in values)
            self.db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*values.values(), jobid))

    def _record(self, jobid: int) -> dict | None:
        with self.lock:
            row = self.db.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE id = ?", (jobid,)).fetchone()
        return _row(row) if row else None

    def _finished(self, jobid: int, future) -> None:
        """A job's future is done (called in the executor's thread)."""
        from cw.errors import ContainerEngineMissing
        self.futures.pop(jobid, None)
        worker = f"{future.worker.host}:{future.worker.pid}" if future.worker is not None else None
        ended = future.finished_at or time.time()
        if future.cancelled():
            self._update(jobid, state="aborted", ended=ended, worker=worker, error="aborted by DELETE")
            return
        exc = future.exception()
        if exc is None:
            result = future.result()
            self._update(jobid, state="done" if result.returncode == 0 else "failed", ended=ended, worker=worker,
                         exit_code=result.returncode, stdout=result.stdout, stderr=result.stderr,
                         error=None if result.returncode == 0 else f"exit code {result.returncode}")
            return
        text = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, ContainerEngineMissing):
            text = f"image given, but the worker has no container engine: {exc}"
        self._update(jobid, state="failed", ended=ended, worker=worker, error=text,
                     stdout=_text(getattr(exc, "stdout", None)), stderr=_text(getattr(exc, "stderr", None)))

    def _submit(self, jobid: int, job: dict):
        from cw.client.executor import ClusterExecutor
        from cw.ops.commands import command
        if self.executor is None:
            self.executor = ClusterExecutor(self.host, self.port)
        kwargs = {"env": job["env"], "timeout": job["timeout"], "image": job["image"]}
        return self.executor.submit_with(command, (job["command"],), kwargs, resources=job["resources"])

    # --- handlers -----------------------------------------------------------------

    async def post(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return _bad("body", "the body is not valid JSON")
        try:
            job = check_request(body)
        except ValueError as exc:
            return _bad(*exc.args)
        with self.lock:
            jobid = self.db.execute(
                "INSERT INTO jobs (state, command, image, resources, timeout, env, submitted) "
                "VALUES ('queued', ?, ?, ?, ?, ?, ?)",
                (json.dumps(job["command"]), job["image"], json.dumps(job["resources"]), job["timeout"],
                 json.dumps(job["env"]), time.time())).lastrowid
        try:
            future = await asyncio.get_running_loop().run_in_executor(None, self._submit, jobid, job)
        except Exception as exc:  # noqa: BLE001 - the master is unreachable or refused: say so, keep the record
            self._update(jobid, state="failed", ended=time.time(), error=f"not submitted: {exc}")
            return web.json_response({"error": f"cannot submit to the cw master at {self.host}:{self.port}: {exc}",
                                      "id": jobid}, status=503)
        self.futures[jobid] = future
        future.add_done_callback(lambda f: self._finished(jobid, f))
        return web.json_response({"id": jobid, "state": "queued"}, status=201)

    async def list(self, request: web.Request) -> web.Response:
        state = request.query.get("state")
        if state is not None and state not in STATES:
            return _bad("state", f"state must be one of {', '.join(STATES)}")
        where, params = ("WHERE state = ?", (state,)) if state else ("", ())
        with self.lock:
            rows = self.db.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs {where} ORDER BY id DESC LIMIT 1000",
                                   params).fetchall()
        return web.json_response([_row(r) for r in rows])

    def _jobid(self, request) -> int | None:
        try:
            return int(request.match_info["id"])
        except ValueError:
            return None

    async def get(self, request: web.Request) -> web.Response:
        jobid = self._jobid(request)
        record = self._record(jobid) if jobid is not None else None
        if record is None:
            return _bad("id", f"no job {request.match_info['id']!r}", 404)
        future = self.futures.get(jobid)
        if record["state"] == "queued" and future is not None and not future.done():
            state = await asyncio.get_running_loop().run_in_executor(None, lambda: future.state)
            if state in ("queued", "running"):
                record["state"] = state
        return web.json_response(record)

    async def logs(self, request: web.Request) -> web.Response:
        jobid = self._jobid(request)
        with self.lock:
            row = self.db.execute("SELECT state, stdout, stderr FROM jobs WHERE id = ?",
                                  (jobid,)).fetchone() if jobid is not None else None
        if row is None:
            return _bad("id", f"no job {request.match_info['id']!r}", 404)
        return web.json_response({"id": jobid, "state": row[0], "stdout": row[1] or "", "stderr": row[2] or ""})

    async def delete(self, request: web.Request) -> web.Response:
        jobid = self._jobid(request)
        record = self._record(jobid) if jobid is not None else None
        if record is None:
            return _bad("id", f"no job {request.match_info['id']!r}", 404)
        future = self.futures.get(jobid)
        if future is None or not future.cancel():
            return web.json_response({"error": f"job {jobid} already ended ({record['state']})", "field": "id"},
                                     status=409)
        self._update(jobid, state="aborted", ended=time.time(), error="aborted by DELETE")
        return web.json_response({"id": jobid, "state": "aborted"})

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(OPENAPI)


def _row(row) -> dict:
    record = dict(zip(_COLUMNS, row, strict=True))
    for key in ("command", "resources", "env"):
        record[key] = json.loads(record[key]) if record[key] else None
    return record


def _text(value) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def _bad(field: str, text: str, status: int = 400) -> web.Response:
    return web.json_response({"error": text, "field": field}, status=status)


_JOB = {"type": "object", "properties": {
    "id": {"type": "integer"}, "state": {"type": "string", "enum": list(STATES)},
    "command": {"type": "array", "items": {"type": "string"}}, "image": {"type": ["string", "null"]},
    "resources": {"type": ["object", "null"]}, "timeout": {"type": ["number", "null"]},
    "env": {"type": ["object", "null"]}, "submitted": {"type": "number"}, "ended": {"type": ["number", "null"]},
    "worker": {"type": ["string", "null"]}, "exit_code": {"type": ["integer", "null"]},
    "error": {"type": ["string", "null"]}}}
_ERROR = {"description": "bad input or no such job", "content": {"application/json": {"schema": {
    "type": "object", "properties": {"error": {"type": "string"}, "field": {"type": "string"}}}}}}
_ID = [{"name": "id", "in": "path", "required": True, "schema": {"type": "integer"}}]


def _ok(schema: dict, text: str = "OK") -> dict:
    return {"description": text, "content": {"application/json": {"schema": schema}}}


OPENAPI = {
    "openapi": "3.0.3",
    "info": {"title": "cw dashboard: command jobs", "version": "1"},
    "components": {"securitySchemes": {"token": {"type": "http", "scheme": "bearer"}}},
    "security": [{"token": []}],
    "paths": {
        "/api/jobs": {
            "post": {"summary": "Run a command on a worker (cw.command)", "requestBody": {"required": True, "content": {
                "application/json": {"schema": {"type": "object", "required": ["command"], "properties": {
                    k: _JOB["properties"][k] for k in _FIELDS}}}}},
                "responses": {"201": _ok({"type": "object", "properties": {"id": {"type": "integer"}}}, "submitted"),
                              "400": _ERROR, "403": _ERROR, "503": _ERROR}},
            "get": {"summary": "List jobs, newest first", "parameters": [
                {"name": "state", "in": "query", "schema": {"type": "string", "enum": list(STATES)}}],
                "responses": {"200": _ok({"type": "array", "items": _JOB}), "400": _ERROR}}},
        "/api/jobs/{id}": {
            "get": {"summary": "A job's state, worker, times and exit code", "parameters": _ID,
                    "responses": {"200": _ok(_JOB), "404": _ERROR}},
            "delete": {"summary": "Abort a job", "parameters": _ID,
                       "responses": {"200": _ok(_JOB), "404": _ERROR, "409": _ERROR}}},
        "/api/jobs/{id}/logs": {"get": {"summary": "A job's stdout and stderr", "parameters": _ID, "responses": {
            "200": _ok({"type": "object", "properties": {"stdout": {"type": "string"},
                                                         "stderr": {"type": "string"}}}), "404": _ERROR}}},
        "/api/workers": {"get": {"summary": "The master's workers", "responses": {"200": _ok({"type": "array"})}}},
        "/api/stats": {"get": {"summary": "Queued, running, throughput, jobs by outcome",
                               "responses": {"200": _ok({"type": "object"})}}},
        "/health": {"get": {"summary": "Whether the dashboard is connected to its master",
                            "responses": {"200": _ok({"type": "object"})}}},
    },
}
