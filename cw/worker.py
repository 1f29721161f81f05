"""Workers: processes that run jobs, and the supervisor that keeps N of them.

``python -m cw.worker [HOST[:PORT]] -n N`` starts a supervisor that runs N
worker processes and restarts one that dies (a job may crash it).  Each
worker holds one connection to the master and runs one job at a time, in the
client's working directory and with the client's ``sys.path`` in front of its
own.  A worker that loses its master reconnects; one that cannot reach a
master for ``--connect-timeout`` seconds exits.

::

    supervisor --spawn--> worker process --TCP--> master
        ^                     |
        +--- exit status -----+   (restarted unless it gave up or was misconfigured)
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time

from . import PORT, protocol
from .auth import load_secret
from .errors import AuthenticationError, BrokenCluster, CwError, ProtocolError
from .link import open_link, parse_address, peer_info

log = logging.getLogger("cw.worker")

#: Seconds a worker keeps trying to reach a master before it exits.
DEFAULT_CONNECT_TIMEOUT = 60.0
#: A child that dies sooner than this after starting counts as crash-looping.
QUICK_DEATH = 1.0
MAX_RESTART_DELAY = 10.0

EXIT_NO_MASTER = 3   # gave up reaching a master: do not restart
EXIT_CONFIG = 4      # wrong secret or unreadable secret file: restarting cannot help


class JobRunner:
    """Runs the jobs of one connection, each in its client's context."""

    def __init__(self):
        self.base_path = list(sys.path)
        self.contexts: dict[int, dict] = {}
        self.current = None

    def set_context(self, ctx: int, context: dict) -> None:
        if context:
            self.contexts[ctx] = context
        else:
            self.contexts.pop(ctx, None)       # the client left
            if self.current == ctx:
                self.current = None

    def enter(self, ctx: int) -> None:
        if ctx == self.current:
            return
        context = self.contexts.get(ctx, {})
        cwd = context.get("cwd")
        if isinstance(cwd, str) and os.path.isdir(cwd):
            os.chdir(cwd)
        client_path = [p for p in context.get("path", ()) if isinstance(p, str) and p and os.path.exists(p)]
        seen = set()
        sys.path[:] = [p for p in client_path + self.base_path if not (p in seen or seen.add(p))]
        self.current = ctx


def serve(link, runner: JobRunner) -> None:
    """Runs jobs from one connection until the master closes it."""
    from .payload import run_payload  # only workers and clients load pickle machinery
    while True:
        item = link.recv()
        if item is None:
            return
        ftype, body = item
        if ftype == protocol.JOB:
            gid, ctx, payload = protocol.decode_job(body)
            runner.enter(ctx)
            status, data = run_payload(payload)
            link.send(protocol.encode_outcome(gid, status, data))
        elif ftype == protocol.CONTEXT:
            runner.set_context(*protocol.decode_context_for_worker(body))
        elif ftype == protocol.ERROR:
            log.warning("the master closed our connection: %s", bytes(body).decode("utf-8", "replace"))
            return
        else:
            raise ProtocolError(f"the master sent an unexpected {protocol.FRAME_NAMES.get(ftype, ftype)} frame")


def run_worker(host: str, port: int, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT) -> int:
    """One worker process: connect, run jobs, reconnect; returns an exit status."""
    try:
        secret = load_secret()
    except CwError as exc:
        log.error("%s", exc)
        return EXIT_CONFIG
    runner = JobRunner()
    while True:
        try:
            link = open_link(host, port, secret, peer_info("worker"), connect_timeout)
        except BrokenCluster as exc:
            log.error("giving up: %s", exc)
            return EXIT_NO_MASTER
        except AuthenticationError as exc:
            log.error("%s", exc)
            return EXIT_CONFIG
        except (OSError, ProtocolError) as exc:
            log.warning("handshake with %s:%s failed (%s); retrying", host, port, exc)
            time.sleep(1.0)
            continue
        log.info("worker %d connected to %s:%s", os.getpid(), host, port)
        try:
            serve(link, runner)
        except (OSError, ProtocolError) as exc:
            log.warning("lost the master at %s:%s (%s); reconnecting", host, port, exc)
        else:
            log.warning("the master at %s:%s went away; reconnecting", host, port)
        finally:
            link.close()


def _watch_lifeline(fd: int) -> None:
    """Exits this worker when its supervisor dies (the pipe's write end closes)."""
    def watch():
        while os.read(fd, 1):
            pass
        os._exit(0)
    threading.Thread(target=watch, name="cw-lifeline", daemon=True).start()


class Supervisor:
    """Keeps ``n`` worker processes running."""

    def __init__(self, address: str, n: int, connect_timeout: float, log_level: str):
        self.address = address
        self.n = n
        self.connect_timeout = connect_timeout
        self.log_level = log_level
        self.children: dict[int, subprocess.Popen] = {}
        self.stopping = False
        self.lifeline_r, self.lifeline_w = os.pipe()
        self.exit_status = 0

    def spawn(self) -> None:
        cmd = [sys.executable, "-m", "cw.worker", self.address, "--child", str(self.lifeline_r),
               "--connect-timeout", str(self.connect_timeout), "--log-level", self.log_level]
        proc = subprocess.Popen(cmd, pass_fds=(self.lifeline_r,))
        proc.started = time.monotonic()
        self.children[proc.pid] = proc

    def stop(self, signum=None, frame=None) -> None:
        if self.stopping:
            return
        self.stopping = True
        for proc in self.children.values():
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        for _ in range(self.n):
            self.spawn()
        quick_deaths = 0
        while self.children:
            try:
                pid, wait_status = os.wait()
            except ChildProcessError:
                break
            proc = self.children.pop(pid, None)
            if proc is None:
                continue
            code = os.waitstatus_to_exitcode(wait_status)
            proc.returncode = code
            if self.stopping:
                continue
            if code == EXIT_CONFIG:
                log.error("worker %d cannot authenticate; stopping all workers", pid)
                self.exit_status = 2
                self.stop()
                continue
            if code == EXIT_NO_MASTER:
                self.exit_status = EXIT_NO_MASTER
                continue
            if code == 0:
                continue
            lived = time.monotonic() - proc.started
            quick_deaths = quick_deaths + 1 if lived < QUICK_DEATH else 0
            log.warning("worker %d died (exit status %s); starting a new one", pid, code)
            if quick_deaths > 2:
                time.sleep(min(MAX_RESTART_DELAY, 0.1 * 2 ** quick_deaths))
            if not self.stopping:
                self.spawn()
        return self.exit_status


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cw.worker", description="Run cw workers.")
    parser.add_argument("master", nargs="?", default=f"localhost:{PORT}",
                        help=f"the master's HOST[:PORT] (default localhost:{PORT})")
    parser.add_argument("-n", "--processes", type=int, default=1, help="worker processes to run (default 1)")
    parser.add_argument("--connect-timeout", type=float, default=DEFAULT_CONNECT_TIMEOUT,
                        help=f"seconds to keep trying to reach the master (default {DEFAULT_CONNECT_TIMEOUT:g})")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s")
    try:
        host, port = parse_address(args.master)
    except ValueError as exc:
        parser.error(str(exc))
    if args.child is not None:
        # The supervisor forwards Ctrl-C as SIGTERM; a terminal's SIGINT to the
        # whole process group must not kill a job half-way with a traceback.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _watch_lifeline(args.child)
        return run_worker(host, port, args.connect_timeout)
    if args.processes < 1:
        parser.error("-n must be at least 1")
    return Supervisor(f"{host}:{port}", args.processes, args.connect_timeout, args.log_level).run()


if __name__ == "__main__":
    sys.exit(main())
