"""``/metrics``: the dashboard's Prometheus metrics, made with prometheus_client.

The master's status gives the gauges (cw.ops.metrics, shared with
``cw status --prometheus``); the job events the dashboard watches give

- ``cw_jobs_total{outcome}``: jobs ended since the dashboard started, by
  outcome (ok, raised, lost, cancelled);
- ``cw_job_seconds``: a histogram of the jobs' run times (start to end on
  their worker, as the master saw them);
- ``cw_events_dropped_total``: job events the master did not send (it keeps
  a bounded number between two frames); ``cw_jobs_total`` counts them still;
- ``cw_up``: 1 while the dashboard is connected to the master.
"""
from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import CollectorRegistry

from cw.dashboard.state import JOB_SECONDS_BUCKETS, DashboardState
from cw.ops.metrics import status_metrics

OUTCOMES = ("ok", "raised", "lost", "cancelled")


class ClusterCollector:
    """A prometheus_client collector that reads the dashboard's state on each scrape."""

    def __init__(self, state: DashboardState, connected):
        self.state = state
        self.connected = connected          # () -> bool

    def collect(self):
        state = self.state
        with state.lock:
            status = dict(state.status)
            jobs_total = dict(state.jobs_total)
            buckets = list(state.job_seconds)
            seconds_sum = state.job_seconds_sum
            dropped = state.dropped_total
        up = GaugeMetricFamily("cw_up", "1 while the dashboard is connected to the master, else 0.")
        up.add_metric([], 1 if self.connected() else 0)
        yield up
        for family in status_metrics(status):
            labels = sorted({k for sample_labels, _ in family.samples for k in sample_labels})
            maker = CounterMetricFamily if family.kind == "counter" else GaugeMetricFamily
            metric = maker(family.name, family.help, labels=labels)
            for sample_labels, value in family.samples:
                metric.add_metric([str(sample_labels.get(k, "")) for k in labels], value)
            yield metric
        total = CounterMetricFamily("cw_jobs", "Jobs ended since the dashboard started, by outcome.",
                                    labels=["outcome"])
        for outcome in sorted(set(OUTCOMES) | set(jobs_total)):
            total.add_metric([outcome], jobs_total.get(outcome, 0))
        yield total
        hist = HistogramMetricFamily("cw_job_seconds", "Run time of the jobs that ended, in seconds.")
        cumulative, running = [], 0
        for bound, count in zip((*map(str, JOB_SECONDS_BUCKETS), "+Inf"), buckets, strict=True):
            running += count
            cumulative.append((bound, running))
        hist.add_metric([], cumulative, seconds_sum)
        yield hist
        lost = CounterMetricFamily("cw_events_dropped", "Job events the master dropped instead of queueing.")
        lost.add_metric([], dropped)
        yield lost


def registry(state: DashboardState, connected) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(ClusterCollector(state, connected))
    return reg
