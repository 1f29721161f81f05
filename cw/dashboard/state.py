"""What the dashboard remembers: the last status, the jobs of the last
minutes (the task stream), throughput and queue depth over time, the last
failures, and the counters behind ``/metrics``.  Fed by cw.dashboard.watch
from its threads; read by the web handlers; one lock guards it all.
Everything is bounded: old jobs, samples and failures fall off."""
from __future__ import annotations

import bisect
import collections
import json
import threading
import time

#: Seconds of jobs the task stream keeps.
STREAM_SECONDS = 300
#: Jobs kept at most (the task stream's bars), whatever their age.
MAX_JOBS = 5000
#: Bars sent to the page at most, the newest.
MAX_BARS = 1500
#: One sample a second of throughput and queue depth, this many kept.
MAX_SAMPLES = 600
#: Failures kept with their tracebacks.
MAX_FAILURES = 20
#: Seconds after which a job the status no longer shows running, and whose
#: end never came (the master drops events beyond its bound), is shown ended.
STALE = 5.0
#: The fields of an EVENTS frame's rows, in the order this module reads them
#: (cw.master.events.FIELDS; the frame names its own, see _in_our_order).
FIELDS = ("job", "client", "worker", "function", "start", "end", "outcome", "traceback", "output")
#: The bounds of cw_job_seconds' buckets.
JOB_SECONDS_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60, 300, 1800, 3600)


class DashboardState:
    def __init__(self, clock=time.time):
        self.clock = clock
        self.lock = threading.Lock()
        self.status: dict = {}
        self.status_at = 0.0
        self.jobs: collections.OrderedDict = collections.OrderedDict()   # (client, job) -> job dict
        self.samples: collections.deque = collections.deque(maxlen=MAX_SAMPLES)   # [t, jobs ended, queued]
        self.failures: collections.deque = collections.deque(maxlen=MAX_FAILURES)
        self.jobs_total: dict[str, int] = {}       # by outcome, since the dashboard started
        self.dropped_total = 0
        self.job_seconds = [0] * (len(JOB_SECONDS_BUCKETS) + 1)   # per bucket, the last one +Inf
        self.job_seconds_sum = 0.0
        self.functions: dict[str, int] = {}        # function -> colour index, in order of appearance
        self._last_counts: dict[str, int] = {}
        self._ended_this_second = 0

    # --- fed by the watch -----------------------------------------------------

    def on_status(self, status: dict) -> None:
        with self.lock:
            self.status = status
            self.status_at = self.clock()
            self.samples.append([round(self.status_at, 1), self._ended_this_second, status.get("queued", 0)])
            self._ended_this_second = 0
            workers = [w for w in status.get("workers", ()) if isinstance(w, dict)]
            live = {w.get("id") for w in workers}
            running = {(int(cid), jobid) for w in workers for cid, jobids in (w.get("current_jobs") or {}).items()
                       for jobid in jobids}
            for key, job in self.jobs.items():
                if job["end"] is not None:
                    continue
                if job["worker"] not in live:       # a job of a worker that left ends with it
                    job["end"], job["outcome"] = self.status_at, "lost"
                elif key not in running and job["start"] is not None and job["start"] < self.status_at - STALE:
                    job["end"], job["outcome"] = self.status_at, "?"   # its end was among the events dropped

    def on_events(self, msg: dict) -> None:
        """An EVENTS message: its ``events`` rows in the order of its ``fields``
        (read as rows, not as a dict per event: up to 500 of them a second)."""
        rows = _in_our_order(msg.get("fields") or FIELDS, msg.get("events") or ())
        with self.lock:
            self.dropped_total += msg.get("dropped", 0) + msg.get("missed", 0)
            counts = msg.get("counts") or {}
            for outcome, n in counts.items():
                before = self._last_counts.get(outcome, 0)
                delta = n - before if n >= before else n      # the master's feed started again
                self.jobs_total[outcome] = self.jobs_total.get(outcome, 0) + delta
                self._ended_this_second += delta
            self._last_counts = dict(counts)
            for row in rows:
                self._job_event(*row)
            self._trim()

    def on_lost(self) -> None:
        with self.lock:
            self._last_counts = {}

    def _job_event(self, jobid, client, worker, function, start, end, outcome, traceback, output) -> None:
        key = (client, jobid)
        job = self.jobs.get(key)
        if job is None or (job["end"] is not None and end is None):   # new, or sent again after it ended
            job = self.jobs[key] = {"client": client, "job": jobid, "worker": worker,
                                    "function": "?" if function is None else function, "start": start, "end": end,
                                    "outcome": outcome, "traceback": traceback, "output": output}
            self.jobs.move_to_end(key)
        else:                                # what this event says adds to what an earlier one said
            job.pop("_bar", None)            # (its bar's text, if kept, is old)
            for name, value in (("worker", worker), ("function", function), ("start", start), ("end", end),
                                ("outcome", outcome), ("traceback", traceback), ("output", output)):
                if value is not None:
                    job[name] = value
        self.functions.setdefault(job["function"], len(self.functions))
        if end is not None:
            start = job["start"] if job["start"] is not None else job["end"]
            seconds = max(0.0, job["end"] - start)
            self.job_seconds[_bucket(seconds)] += 1
            self.job_seconds_sum += seconds
            if job["outcome"] in ("raised", "lost"):
                self.failures.appendleft({k: job[k] for k in ("client", "job", "worker", "function", "end",
                                                              "outcome", "traceback")})

    def _trim(self) -> None:
        horizon = self.clock() - STREAM_SECONDS
        jobs = self.jobs
        while jobs:
            first = next(iter(jobs.values()))
            if len(jobs) <= MAX_JOBS and (first["end"] is None or first["end"] >= horizon):
                break
            jobs.popitem(last=False)

    # --- read by the web handlers ----------------------------------------------

    def view(self, error: str | None = None) -> dict:
        """What the page draws, as JSON."""
        with self.lock:
            return {"bars": [self._bar(b) for b in list(self.jobs.values())[-MAX_BARS:]], **self._view_rest(error)}

    def view_json(self, error: str | None = None) -> str:
        """``view()`` as JSON text, made for every push: each ended job's bar
        is written once and its text kept (a bar's times are floats, whose
        text is most of the cost of the page's 1,500 bars, every second)."""
        with self.lock:
            bars = ",".join([self._bar_json(b) for b in list(self.jobs.values())[-MAX_BARS:]])
            rest = _compact(self._view_rest(error))
            return '{"bars":[' + bars + "]," + rest[1:]

    def _view_rest(self, error) -> dict:
        return {"t": self.clock(), "error": error, "status": self.status, "status_at": self.status_at,
                "functions": list(self.functions), "samples": list(self.samples), "failures": list(self.failures),
                "jobs_total": dict(self.jobs_total)}

    def _bar(self, job: dict) -> list:
        return [job["client"], job["job"], job["worker"], self.functions.get(job["function"], 0), job["start"],
                job["end"], job["outcome"]]

    def _bar_json(self, job: dict) -> str:
        text = job.get("_bar")
        if text is None:
            text = _compact(self._bar(job))
            if job["end"] is not None:          # an ended job's bar changes no more (see _job_event)
                job["_bar"] = text
        return text

    def job(self, client, jobid) -> dict | None:
        with self.lock:
            job = self.jobs.get((client, jobid))
            return {k: v for k, v in job.items() if k != "_bar"} if job is not None else None


#: json.dumps(x, separators=...) makes an encoder per call: one, made once, for the bars.
_compact = json.JSONEncoder(separators=(",", ":")).encode


def _in_our_order(fields, rows):
    """The rows with their values in FIELDS' order (the master's when it is
    this version: the rows as they are); a field the master did not send is None."""
    fields = list(fields)
    if fields == list(FIELDS):
        return rows
    at = [fields.index(name) if name in fields else None for name in FIELDS]
    return [tuple(None if i is None else row[i] for i in at) for row in rows]


def _bucket(seconds: float) -> int:
    """The index of the first bucket whose bound is >= seconds (the last: +Inf)."""
    return bisect.bisect_left(JOB_SECONDS_BUCKETS, seconds)
