"""``python -m bench.dashboard``: what watching a cluster costs it.

B1's headline (submit N no-op calls of a script function, wait for all) on
one cw cluster, in rounds that alternate between no dashboard and a
``cw dashboard`` process connected to the master (subscribed to job events,
asking for the status every second, and a client of /events reading the
page's pushes, as an open browser tab would).  Alternating rounds see the
same machine load; the medians' ratio is printed, the issue-16 target being
>= 0.95.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from . import procinfo, systems


def noop(*args):
    return None


def batch(system, n: int, watching: tuple = ()) -> tuple[float, dict]:
    """(calls per second, {process group: CPU microseconds per call}) of n
    submits and waiting for all.  The groups: the master, the workers (with
    their supervisors), the client (this process) and the watching processes.
    On a machine whose cores the cluster keeps busy, what any of them uses
    more is taken from the others: the sum says how much."""
    groups = {"master": [system.master_pid], "workers": system.worker_pids() + [p.pid for p in system.cluster.workers],
              "client": [os.getpid()], "dashboard": list(watching)}

    def cpu():
        return {name: sum(procinfo.cpu_seconds(pid) for pid in pids) for name, pids in groups.items()}
    before = cpu()
    t0 = time.perf_counter()
    futures = [system.submit(noop) for _ in range(n)]
    system.results(futures)
    elapsed = time.perf_counter() - t0
    after = cpu()
    return n / elapsed, {name: (after[name] - before[name]) / n * 1e6 for name in groups}


#: A browser tab's share: a process reading the page's pushes; it prints how many it got at their end.
_READER = ("import sys, urllib.request\n"
           "pushes = 0\n"
           "try:\n"
           "    for line in urllib.request.urlopen(sys.argv[1], timeout=60):\n"
           "        pushes += line.startswith(b'data:')\n"
           "except Exception:\n"  # the stream ends when the dashboard stops (IncompleteRead, reset)
           "    pass\n"
           "print(pushes)\n")


class Watcher:
    """A dashboard process on the cluster, and another process reading its
    /events as a browser tab would (not a thread of the benchmark's client,
    whose GIL it would share)."""

    def __init__(self, address: str, folder: str, options=()):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cw.dashboard", address, "--http", "127.0.0.1:0",
             "--db", os.path.join(folder, "jobs.sqlite"), *options], stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("cw dashboard listening on "):
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"the dashboard did not start: {line!r}")
        url = line.split(" on ", 1)[1].strip()
        self.reader = subprocess.Popen([sys.executable, "-c", _READER, url.split("/?")[0] + "/events"],
                                       stdout=subprocess.PIPE, text=True)
        self.pushes = 0

    def stop(self) -> None:
        self.proc.terminate()             # its reader sees the stream end, prints its count and exits
        for proc in (self.proc, self.reader):
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.pushes = int(self.reader.stdout.read().strip() or 0)
        self.reader.stdout.close()
        self.proc.stdout.close()


def dispatcher_cost(jobs: int = 50_000, runs: int = 7) -> tuple[float, float]:
    """(CPU µs a job, unwatched and watched) of the master's dispatcher alone:
    submit and outcome calls with no sockets, an events frame taken every
    4,000 jobs (8,000 jobs/s, a frame every 0.5 s); the least of ``runs``."""
    from cw.master import events
    from cw.master.dispatch import Dispatcher
    from cw.wire import payload
    from cw.wire.frames import Status
    call = payload.joined(payload.dumps_call(noop, (), {}))

    def run(watched: bool) -> float:
        d = Dispatcher(slots=1)
        feed = events.EventFeed(d.functions)
        if watched:
            d.events = feed
        d.add_client(1, {})
        d.add_worker(2, {"host": "h", "pid": 1})
        worker = d.workers[2]
        t0 = time.process_time()
        for jobid in range(jobs):
            d.submit(1, jobid, 0, 0.0, call)
            d.outcome(2, worker.jobs[0].gid, Status.OK, b"")
            d.outbox.clear()
            if jobid % 4000 == 0:
                feed.take()
        return (time.process_time() - t0) / jobs * 1e6

    unwatched, watched = [], []
    for _ in range(runs):
        unwatched.append(run(False))
        watched.append(run(True))
    return min(unwatched), min(watched)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dashboard", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20_000, help="calls per batch (B1: 20,000)")
    parser.add_argument("--rounds", type=int, default=5, help="batches with and without, alternating (5)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="worker processes (cores)")
    parser.add_argument("--nice", type=int, default=None, metavar="N",
                        help="start the dashboard with --nice N (default: its own default)")
    parser.add_argument("--dispatcher", action="store_true",
                        help="measure the master's dispatcher alone, watched and not (no processes)")
    args = parser.parse_args(argv)
    if args.dispatcher:
        unwatched, watched = dispatcher_cost()
        print(f"dispatcher CPU per job (least of 7 runs of 50,000): {unwatched:.2f} us unwatched, "
              f"{watched:.2f} us watched (+{watched - unwatched:.2f} us)")
        return 0
    options = () if args.nice is None else ("--nice", str(args.nice))
    system = systems.start("cw", args.workers)
    folder = tempfile.mkdtemp(prefix="cw-bench-dashboard-")
    without, with_dashboard, cpu_without, cpu_with, loads = [], [], [], [], []
    pushes = 0
    try:
        batch(system, min(2000, args.calls))        # warm up
        for _ in range(args.rounds):
            rate, cpu = batch(system, args.calls)
            without.append(rate)
            cpu_without.append(cpu)
            watcher = Watcher(system.cluster.address, folder, options)
            try:
                time.sleep(1.5)       # connected, subscribed, and past its first status and push
                rate, cpu = batch(system, args.calls, (watcher.proc.pid, watcher.reader.pid))
                with_dashboard.append(rate)
                cpu_with.append(cpu)
            finally:
                watcher.stop()
                pushes += watcher.pushes
            loads.append(os.getloadavg()[0])
    finally:
        system.close()
    a, b = statistics.median(without), statistics.median(with_dashboard)
    print(f"B1 submit x{args.calls:,}, wait all, {args.workers} workers, {args.rounds} rounds each, alternating"
          + (f", the dashboard with --nice {args.nice}" if args.nice is not None else ""))
    print(f"  without a dashboard: {a:,.0f} calls/s (median of {', '.join(f'{x:,.0f}' for x in without)})")
    print(f"  with a dashboard:    {b:,.0f} calls/s (median of {', '.join(f'{x:,.0f}' for x in with_dashboard)})")
    print(f"  ratio with/without: {b / a:.3f} (target >= 0.95); the page got {pushes} pushes meanwhile")
    paired = statistics.median(w / o for w, o in zip(with_dashboard, without, strict=True))
    print(f"  median of the rounds' own ratios (each with-round over the without-round just before): {paired:.3f}")
    print("  CPU us per call, median of the rounds (without -> with a dashboard):")
    for name in ("master", "workers", "client", "dashboard", "total"):
        def value(row, name=name):
            return sum(row.values()) if name == "total" else row[name]
        c, d = statistics.median(map(value, cpu_without)), statistics.median(map(value, cpu_with))
        each = statistics.median(value(w) - value(o) for w, o in zip(cpu_with, cpu_without, strict=True))
        print(f"    {name:9s} {c:6.1f} -> {d:6.1f}  (rounds' own differences: median {each:+.1f})")
    print(f"  load average (1 min) after each pair of rounds: {', '.join(f'{x:.1f}' for x in loads)}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
