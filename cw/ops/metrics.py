"""Prometheus metrics of a master's status, with no dependency.

``status_metrics(status)`` turns the dict ``python -m cw.status --json``
prints into metric families; ``text_format`` writes them in Prometheus'
text exposition format, which ``cw status --prometheus`` prints for a node
exporter's textfile collector.  The dashboard serves the same families
through prometheus_client at ``/metrics``, with the ones only a watcher of
job events can count (cw.dashboard.metrics).  Names follow Prometheus'
conventions: a ``cw_`` prefix, base units (seconds, bytes), ``_total``
for counters, and labels for what varies.
"""
from __future__ import annotations

from typing import NamedTuple


class Family(NamedTuple):
    name: str           # a counter's without its "_total"
    kind: str           # "gauge" or "counter"
    help: str
    samples: list       # [(labels dict, value)]


def _number(value) -> float | None:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _rows(value) -> list:
    return [row for row in value if isinstance(row, dict)] if isinstance(value, list) else []


WORKER_STATES = ("idle", "busy", "lending", "draining")


def status_metrics(status: dict) -> list[Family]:
    """The families a master's status gives; a key the master did not send gives nothing."""
    out: list[Family] = []
    workers = _rows(status.get("workers"))
    states = dict.fromkeys(WORKER_STATES, 0)
    for w in workers:
        states[str(w.get("state"))] = states.get(str(w.get("state")), 0) + 1
    out.append(Family("cw_workers", "gauge", "Worker processes connected, by state.",
                      [({"state": s}, n) for s, n in states.items()]))
    out.append(Family("cw_worker_jobs", "counter", "Jobs each connected worker finished (since it connected).",
                      [({"worker": f"{w.get('host')}:{w.get('pid')}"}, w.get("jobs_done", 0)) for w in workers]))
    out.append(Family("cw_worker_failures", "counter",
                      "Jobs that raised or were lost on each connected worker (since it connected).",
                      [({"worker": f"{w.get('host')}:{w.get('pid')}"}, w.get("failures", 0)) for w in workers]))
    by_priority: dict = {}
    for q in _rows(status.get("queues")):
        key = str(q.get("priority"))
        by_priority[key] = by_priority.get(key, 0) + (_number(q.get("queued")) or 0)
    out.append(Family("cw_queue_jobs", "gauge", "Jobs waiting in the master's queues, by priority.",
                      [({"priority": p}, n) for p, n in sorted(by_priority.items())]))
    waiting = _rows(status.get("waiting"))
    out.append(Family("cw_unplaceable_jobs", "gauge",
                      "Jobs held back because no connected worker could run them now.",
                      [({}, sum(_number(w.get("count")) or 0 for w in waiting))]))
    for key, name, text in (("queued", "cw_jobs_queued", "Jobs queued (with those sent ahead, not started)."),
                            ("running", "cw_jobs_running", "Jobs running on workers.")):
        if _number(status.get(key)) is not None:
            out.append(Family(name, "gauge", text, [({}, status[key])]))
    if "clients" in status:
        out.append(Family("cw_clients", "gauge", "Clients connected.", [({}, len(_rows(status["clients"])))]))
    limits = status.get("limits") if isinstance(status.get("limits"), dict) else {}
    out.append(Family("cw_limit_running", "gauge", "Running jobs of each limited tag.",
                      [({"tag": t}, v.get("running", 0)) for t, v in limits.items() if isinstance(v, dict)]))
    out.append(Family("cw_limit_max", "gauge", "The limit of each limited tag.",
                      [({"tag": t}, v["limit"]) for t, v in limits.items()
                       if isinstance(v, dict) and _number(v.get("limit")) is not None]))
    rate = _number((status.get("throughput") or {}).get("per_s")) if isinstance(status.get("throughput"),
                                                                             dict) else None
    if rate is not None:
        out.append(Family("cw_throughput_jobs_per_second", "gauge",
                          "Jobs finished per second over the master's last minute.", [({}, rate)]))
    master = status.get("master") if isinstance(status.get("master"), dict) else {}
    for key, name, text in (("uptime_s", "cw_master_uptime_seconds", "Seconds since the master started."),
                            ("rss_bytes", "cw_master_resident_memory_bytes", "The master's resident memory.")):
        if _number(master.get(key)) is not None:
            out.append(Family(name, "gauge", text, [({}, master[key])]))
    return out


def _escape(value) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _value(value) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


def text_format(families: list[Family]) -> str:
    """The families in Prometheus' text exposition format (version 0.0.4)."""
    lines = []
    for family in families:
        name = family.name + "_total" if family.kind == "counter" else family.name
        lines.append(f"# HELP {name} {family.help}")
        lines.append(f"# TYPE {name} {family.kind}")
        for labels, value in family.samples:
            inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            lines.append(f"{name}{{{inner}}} {_value(value)}" if inner else f"{name} {_value(value)}")
    return "\n".join(lines) + "\n"
