"""The supervisor: keeps N worker processes of one machine running.

::

    supervisor --spawn--> worker process --TCP--> master
        ^                     |
        +-- exit channel -----+   (a pipe: why it exits on purpose)
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

from cw.worker import threads
from cw.worker.channel import EXIT_NO_MASTER, ExitChannel

log = logging.getLogger("cw.worker")

#: A child that dies sooner than this after starting counts as crash-looping.
QUICK_DEATH = 1.0
MAX_RESTART_DELAY = 10.0
#: Seconds running jobs get when the program that started the workers is gone (--until-stdin-closes).
STOP_GRACE = 2.0


class Supervisor:
    """Keeps ``n`` worker processes running."""

    def __init__(self, address: str, port: int, n: int, connect_timeout: float, log_level: str,
                 offer: dict | None = None, job_threads=threads.CPUS):
        self.offer = offer or {}
        self.job_threads = job_threads
        self.address = address
        self.port = port
        self.n = n
        self.connect_timeout = connect_timeout
        self.log_level = log_level
        self.children: dict[int, subprocess.Popen] = {}
        self.stopping = False
        self.stop_requests = 0
        self.lifeline_r, self.lifeline_w = os.pipe()
        self.exit_status = 0

    def spawn(self) -> None:
        cmd = [sys.executable, "-m", "cw.worker", self.address, "--port", str(self.port),
               "--child", str(self.lifeline_r),
               "--connect-timeout", str(self.connect_timeout), "--log-level", self.log_level,
               "--offer", json.dumps(self.offer), "--job-threads", str(self.job_threads)]
        channel_r, channel_w = os.pipe()
        cmd += ["--exit-channel", str(channel_w)]
        try:
            # Its thread variables are set before it imports anything: numpy
            # (if a job imports it) starts with a job's count, not one per core.
            # A job that reads its standard input gets its end at once, never
            # this supervisor's terminal or lifeline pipe.
            proc = subprocess.Popen(cmd, pass_fds=(self.lifeline_r, channel_w), stdin=subprocess.DEVNULL,
                                    env=threads.worker_environ(os.environ, self.job_threads))
        except BaseException:
            os.close(channel_r)
            raise
        finally:
            os.close(channel_w)
        proc.started = time.monotonic()
        proc.exit_channel = channel_r
        self.children[proc.pid] = proc
        if self.stopping:   # stop() ran while it started: it missed this one
            proc.send_signal(signal.SIGUSR1)

    def stop(self, signum=None, frame=None) -> None:
        """First call: workers finish their jobs and exit (SIGUSR1).  Second:
        they are killed now.  SLURM signals every process of a job, so a worker
        may get SIGTERM from SLURM and SIGUSR1 from here at once: both mean
        "drain", the same request, which is why this does not forward SIGTERM."""
        self.stop_requests += 1
        if self.stop_requests == 1:
            self.stopping = True
            sig = signal.SIGUSR1
        else:
            sig = signal.SIGKILL
        for proc in self.children.values():
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                pass

    def started_by_gone(self) -> None:
        """(--until-stdin-closes, on the watching thread.)  Nobody waits for
        these workers' results any more: running jobs get STOP_GRACE seconds,
        then die.  Signals to itself, so that ``stop`` runs on the main thread."""
        log.info("standard input ended (the program that started these workers is gone): stopping")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(STOP_GRACE)
        os.kill(os.getpid(), signal.SIGTERM)

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
            reason, was_ready = ExitChannel.read(proc.exit_channel)
            os.close(proc.exit_channel)
            if self.stopping:
                continue
            if reason == ExitChannel.CONFIG:
                log.error("worker %d cannot authenticate; stopping all workers", pid)
                self.exit_status = 2
                self.stop()
                continue
            if reason == ExitChannel.NO_MASTER:
                self.exit_status = EXIT_NO_MASTER
                continue
            if reason in (ExitChannel.DRAINED, ExitChannel.STOPPED):
                continue
            if reason == ExitChannel.REPLACE:
                self.spawn()      # it stopped a timed-out or cancelled job on purpose
                continue
            # A process that never reached a master and died quickly is
            # crash-looping (a broken environment): wait longer each time.
            lived = time.monotonic() - proc.started
            quick_deaths = quick_deaths + 1 if lived < QUICK_DEATH and not was_ready else 0
            how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
            log.warning("worker %d %s without saying why (most likely a job ended it); starting a new one", pid, how)
            if quick_deaths > 2:
                time.sleep(min(MAX_RESTART_DELAY, 0.1 * 2 ** quick_deaths))
            if not self.stopping:
                self.spawn()
        return self.exit_status
