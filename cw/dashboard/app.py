"""``cw dashboard [MASTER] [--http HOST:PORT]``: a live web page, Prometheus
metrics and a REST API for command jobs, served by a separate process that
connects to the master as a client (the master stays free of web code).

    GET /                 the live page (static files of this package, no CDN)
    GET /events           server-sent events: what the page draws, once a second
    GET /api/status       the master's last status, as JSON
    GET /api/workers      its workers;  GET /api/stats: counts and rates
    GET /api/stream/C/J   one job of the task stream (its output, its traceback)
    GET /metrics          Prometheus text format (cw.dashboard.metrics)
    GET /health           {"ok": ..., "master": connected?}
    GET /openapi.json     the REST API's description
    /api/jobs...          command jobs (cw.dashboard.jobs): always need the token

Security: it listens on 127.0.0.1 by default.  It makes a token at start
(or takes $CW_DASHBOARD_TOKEN) and prints it in its URL, as Jupyter does.
Bound to any other address, every request needs it (``?token=``, or the
``Authorization: Bearer`` header), else 403.  The job calls need it even on
loopback: they run programs on the workers.
"""
from __future__ import annotations

import argparse
import asyncio
import hmac
import importlib.resources
import logging
import os
import secrets
import signal
import socket
import sqlite3
import sys

from aiohttp import web
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from cw import PORT, add_version_option, cliargs
from cw.dashboard import jobs as command_jobs
from cw.dashboard.metrics import registry
from cw.dashboard.state import DashboardState
from cw.dashboard.watch import MasterWatch

log = logging.getLogger("cw.dashboard")

DEFAULT_HTTP = "127.0.0.1:8787"
READY_PREFIX = "cw dashboard listening on "
#: Seconds between two pushes of the page's data.
PUSH_EVERY = 1.0
#: How much the dashboard lowers its own scheduling priority (``--nice``): a
#: monitoring tool should yield the CPU to the cluster's processes when it
#: shares their machine (its bursts of JSON work, woken a few times a second,
#: would otherwise preempt the master or a worker in the middle of a batch).
DEFAULT_NICE = 10
_STATIC = {"index.html": "text/html", "dashboard.js": "text/javascript", "dashboard.css": "text/css"}



def request_token(request: web.Request) -> str:
    auth = request.headers.get("Authorization", "")
    if auth.startswith("Bearer "):
        return auth[7:].strip()
    return request.query.get("token", "")


def token_guard(token: str, loopback: bool):
    """Middleware: 403 without the token, for every request when not on
    loopback, and for the job API always."""
    @web.middleware
    async def guard(request: web.Request, handler):
        needs = not loopback or request.path.startswith("/api/jobs")
        if needs and not hmac.compare_digest(request_token(request).encode(), token.encode()):
            return web.json_response({"error": "this request needs the dashboard's token: add ?token=TOKEN "
                                               "(printed in the URL when the dashboard started) or the header "
                                               "'Authorization: Bearer TOKEN'", "field": "token"}, status=403)
        return await handler(request)
    return guard


class Dashboard:
    def __init__(self, host: str, port: int, state: DashboardState | None = None):
        self.state = state or DashboardState()
        self.watch = MasterWatch(host, port, self.state.on_status, self.state.on_events, self.state.on_lost)
        self.registry = registry(self.state, self.watch.connected.is_set)
        self.closing = asyncio.Event()

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/", self.static)
        app.router.add_get("/static/{name}", self.static)
        app.router.add_get("/events", self.events)
        app.router.add_get("/api/status", self.api_status)
        app.router.add_get("/api/view", self.api_view)
        app.router.add_get("/api/workers", self.api_workers)
        app.router.add_get("/api/stats", self.api_stats)
        app.router.add_get("/api/stream/{client}/{job}", self.api_stream_job)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/health", self.health)

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info.get("name", "index.html")
        if name not in _STATIC:
            raise web.HTTPNotFound(text=f"no static file {name!r}; the page's files are {sorted(_STATIC)}")
        data = importlib.resources.files("cw.dashboard").joinpath("static", name).read_bytes()
        return web.Response(body=data, content_type=_STATIC[name], headers={"Cache-Control": "no-cache"})

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: the page's data now, then once a second."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        try:
            while not self.closing.is_set():
                body = self.state.view_json(self.watch.error)
                await response.write(f"data: {body}\n\n".encode())
                try:
                    await asyncio.wait_for(self.closing.wait(), PUSH_EVERY)
                except asyncio.TimeoutError:
                    pass
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        return response

    async def api_status(self, request):
        with self.state.lock:
            status = dict(self.state.status)
        return web.json_response({"connected": self.watch.connected.is_set(), "error": self.watch.error,
                                  "status": status})

    async def api_view(self, request):
        return web.json_response(self.state.view(self.watch.error))

    async def api_workers(self, request):
        with self.state.lock:
            return web.json_response(list(self.state.status.get("workers", [])))

    async def api_stats(self, request):
        with self.state.lock:
            s = self.state.status
            return web.json_response({key: s.get(key) for key in ("queued", "running", "throughput")} |
                                     {"workers": len(s.get("workers", [])), "clients": len(s.get("clients", [])),
                                      "jobs_total": dict(self.state.jobs_total)})

    async def api_stream_job(self, request):
        try:
            client, job = int(request.match_info["client"]), int(request.match_info["job"])
        except ValueError:
            return web.json_response({"error": "client and job must be whole numbers", "field": "job"}, status=400)
        found = self.state.job(client, job)
        if found is None:
            return web.json_response({"error": f"job {job} of client {client} is not in the task stream (it "
                                               "keeps the last minutes)", "field": "job"}, status=404)
        return web.json_response(found)

    async def metrics(self, request):
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def health(self, request):
        return web.json_response({"ok": True, "master": self.watch.connected.is_set(), "error": self.watch.error})


def make_app(dashboard: Dashboard, token: str, loopback: bool,
             jobs: command_jobs.CommandJobs | None) -> web.Application:
    app = web.Application(middlewares=[token_guard(token, loopback)], client_max_size=1 << 20)
    dashboard.routes(app)
    if jobs is not None:
        jobs.routes(app)

    async def closing(app):
        dashboard.closing.set()
    app.on_shutdown.append(closing)
    return app


def _niceness(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 19:
        raise argparse.ArgumentTypeError(f"--nice takes a whole number from 0 to 19, not {text!r}")
    return value


def lower_priority(increment: int) -> None:
    """Lowers this process's scheduling priority by ``increment`` (os.nice);
    where that is not possible the dashboard runs on at its priority."""
    if increment and hasattr(os, "nice"):
        try:
            os.nice(increment)
        except OSError as exc:
            log.warning("could not lower the dashboard's priority by %d (%s); it runs at its own", increment, exc)


def _parse_args(argv, prog):
    parser = argparse.ArgumentParser(prog=prog, description="Serve a live dashboard, Prometheus metrics and a "
                                     "REST API for command jobs of a cw master.")
    add_version_option(parser)
    parser.add_argument("address", nargs="?", metavar="MASTER", type=cliargs.master_address,
                        help="the master, HOST[:PORT] (default: $CW_MASTER, the SLURM cluster's master, "
                             "else localhost)")
    parser.add_argument("--port", type=cliargs.port, default=PORT,
                        help=f"the master's port when MASTER has none ({PORT})")
    parser.add_argument("--http", default=DEFAULT_HTTP, metavar="HOST:PORT",
                        help=f"where to serve the page (default {DEFAULT_HTTP}; port 0 picks a free one; any address "
                             "but loopback needs the token for every request)")
    parser.add_argument("--db", default=None, metavar="PATH",
                        help="SQLite file of the command jobs' records (default: dashboard-jobs.sqlite in "
                             "$CW_STATE_DIR or ~/.cw)")
    parser.add_argument("--nice", type=_niceness, default=DEFAULT_NICE, metavar="N",
                        help=f"lower the dashboard's own scheduling priority by N, 0 to 19 (default {DEFAULT_NICE}), "
                             "so that it yields the CPU to cluster processes on the same machine; 0 keeps it")
    parser.add_argument("--log-level", default="WARNING", type=cliargs.log_level,
                        help="DEBUG, INFO, WARNING, ERROR or CRITICAL (default WARNING)")
    args = parser.parse_args(argv)
    host, sep, port = args.http.rpartition(":")
    try:
        if not sep or not host:
            raise ValueError
        args.http = (host.strip("[]"), cliargs.port(port))
    except (ValueError, argparse.ArgumentTypeError):
        parser.error(f"--http takes HOST:PORT, like 127.0.0.1:8787 or 0.0.0.0:0, not {args.http!r}")
    return args


async def serve(args, token: str) -> None:
    from cw.client.discovery import resolve_master
    master_host, master_port = resolve_master(args.address, args.port)
    http_host, http_port = args.http
    loopback = cliargs.is_loopback(http_host)
    dashboard = Dashboard(master_host, master_port)
    jobs = command_jobs.CommandJobs(args.db or command_jobs.default_db(), master_host, master_port)
    app = make_app(dashboard, token, loopback, jobs)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, http_host, http_port)
    await site.start()
    real_port = runner.addresses[0][1]
    shown = socket.gethostname() if http_host in ("0.0.0.0", "::", "") else http_host   # a name others can use
    shown = f"[{shown}]" if ":" in shown else shown
    dashboard.watch.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"{READY_PREFIX}http://{shown}:{real_port}/?token={token}", flush=True)
    if not loopback:
        log.warning("serving on %s: every request needs the token printed in the URL", http_host)
    try:
        await stop.wait()
    finally:
        dashboard.watch.stop()
        jobs.close()
        await runner.cleanup()


def main(argv=None, prog: str = "python -m cw.dashboard") -> int:
    args = _parse_args(argv, prog)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    lower_priority(args.nice)
    token = os.environ.get("CW_DASHBOARD_TOKEN") or secrets.token_urlsafe(18)
    try:
        asyncio.run(serve(args, token))
    except ValueError as exc:           # the master's address, from $CW_MASTER or an address file
        print(f"cw.dashboard: {exc}", file=sys.stderr)
        return 2
    except sqlite3.Error as exc:
        print(f"cw.dashboard: cannot use the job records' database {args.db or command_jobs.default_db()}: "
              f"{exc}; give another file with --db PATH", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"cw.dashboard: cannot serve on {args.http[0]}:{args.http[1]}: {exc.strerror or exc}; choose another "
              "--http HOST:PORT (port 0 picks a free one)", file=sys.stderr)
        return 1
    return 0
