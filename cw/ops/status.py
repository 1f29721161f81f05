"""``python -m cw.status``: what a running master sees, for people and for scripts.

    python -m cw.status [HOST[:PORT]] [--port N] [--json | --prometheus] [--watch [SECONDS]]

The program connects like any client, asks the master for its status (the dict
``ClusterExecutor.status()`` returns) and prints it: as aligned tables, or with
``--json`` as one JSON object per report.  ``--watch`` asks again every SECONDS
until Ctrl-C.  ``--prometheus`` prints it in Prometheus' text format
(cw.ops.metrics), for a node exporter's textfile collector.

``format_status`` does the formatting and nothing else, so it can be tested on
hand-written dicts.  Masters of different versions send different keys; every
key is optional here and only what the master sent is shown.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable

from cw import PORT, add_version_option, cliargs

#: Seconds between two reports of ``--watch`` when none is given.
DEFAULT_WATCH = 2.0
#: Seconds to reach the master and to get its answer (``--timeout``).
DEFAULT_TIMEOUT = 5.0
#: Job ids listed in a worker's CURRENT column before the rest are counted.
MAX_CURRENT = 3
#: ANSI: cursor home, then erase the screen.
CLEAR_SCREEN = "\x1b[H\x1b[2J"

log = logging.getLogger("cw.status")


# --- small formatters ------------------------------------------------------------

def format_duration(seconds) -> str:
    """12 -> '12s', 307 -> '5m07s', 7380 -> '2h03m', 273600 -> '3d04h'."""
    if not isinstance(seconds, (int, float)) or seconds != seconds or seconds < 0:
        return "?"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def format_bytes(n) -> str:
    """A byte count in the fewest characters: 8589934592 -> '8G', 1610612736 -> '1.5G'."""
    if not isinstance(n, (int, float)):
        return str(n)
    for unit, size in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:g}B" if isinstance(n, float) else f"{n}B"


def _is_byte_resource(name: str) -> bool:
    return name in ("mem", "memory", "disk", "scratch", "tmp") or name.endswith(("_bytes", "_mem"))


def format_resources(resources) -> str:
    """{'cpu': 2, 'mem': 8589934592, 'gpu': 1} -> 'cpu=2 mem=8G gpu=1'."""
    if not isinstance(resources, dict):
        return _text(resources)
    parts = []
    for name, value in resources.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            parts.append(f"{name}={value}")
        elif _is_byte_resource(str(name)):
            parts.append(f"{name}={format_bytes(value)}")
        else:
            parts.append(f"{name}={value:g}")
    return " ".join(parts) or "-"


def format_current(jobs) -> str:
    """The jobs a worker runs: '17', '17,18', '1,2,3+4' (4 more)."""
    if not isinstance(jobs, (list, tuple)):
        return _text(jobs)
    if not jobs:
        return "-"
    shown = ",".join(str(j) for j in jobs[:MAX_CURRENT])
    return shown if len(jobs) <= MAX_CURRENT else f"{shown}+{len(jobs) - MAX_CURRENT}"


def _text(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _number(value) -> float | None:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _rows(value) -> list[dict]:
    """The dicts of a list the master sent; anything else counts as nothing."""
    return [row for row in value if isinstance(row, dict)] if isinstance(value, list) else []


# --- tables ----------------------------------------------------------------------

class Column:
    """One column of a table: its title, the key it shows, how to show it."""

    def __init__(self, title: str, key: str, fmt: Callable[[object], str] = _text, right: bool = False):
        self.title, self.key, self.fmt, self.right = title, key, fmt, right


def _num_col(title: str, key: str, fmt: Callable[[object], str] = _text) -> Column:
    return Column(title, key, fmt, right=True)


WORKER_COLUMNS = [
    _num_col("ID", "id"), Column("HOST", "host"), _num_col("PID", "pid"), Column("NODE", "node"),
    Column("STATE", "state"), Column("RESOURCES", "resources", format_resources),
    Column("CURRENT", "current", format_current), _num_col("HELD", "held"), _num_col("DONE", "jobs_done"),
    _num_col("FAILURES", "failures"), _num_col("CONNECTED", "connected_s", format_duration),
]
CLIENT_COLUMNS = [
    _num_col("ID", "id"), Column("HOST", "host"), _num_col("PID", "pid"), _num_col("SUBMITTED", "submitted"),
    _num_col("DONE", "done"), _num_col("FAILED", "failed"), _num_col("QUEUED", "queued"),
    _num_col("RUNNING", "running"), Column("PAUSED", "paused"), _num_col("WEIGHT", "weight"),
]
QUEUE_COLUMNS = [_num_col("CLIENT", "client"), _num_col("PRIORITY", "priority"), _num_col("QUEUED", "queued")]
LIMIT_COLUMNS = [Column("LIMIT", "name"), _num_col("RUNNING", "running"), _num_col("MAX", "limit")]
WAITING_COLUMNS = [_num_col("CLIENT", "client"), _num_col("JOBS", "count"),
                   _num_col("WAITING", "since_s", format_duration), Column("REASON", "reason")]


def format_table(rows: list[dict], columns: Iterable[Column], indent: str = "  ") -> list[str]:
    """Aligned lines: a title row, then one line per row.  A column none of
    the rows has a value for is left out (older masters send fewer keys)."""
    shown = [c for c in columns if any(c.key in row for row in rows)]
    cells = [[c.title for c in shown]]
    cells += [[c.fmt(row[c.key]) if c.key in row else "" for c in shown] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(shown))]
    lines = []
    for line in cells:
        parts = [cell.rjust(w) if c.right else cell.ljust(w) for cell, w, c in zip(line, widths, shown, strict=True)]
        lines.append((indent + "  ".join(parts)).rstrip())
    return lines


def _section(title: str, rows: list[dict], columns: list[Column], empty: str) -> list[str]:
    if not rows:
        return ["", f"{title}: {empty}"]
    return ["", f"{title} ({len(rows)})", *format_table(rows, columns)]


# --- the report --------------------------------------------------------------------

def _header(status: dict, address: str | None) -> str:
    master = status.get("master") if isinstance(status.get("master"), dict) else {}
    where = master.get("host") or address
    head = "cw master"
    if where:
        head += f" {where}"
    if master.get("pid") is not None:
        head += f" pid {master['pid']}"
    if master.get("version"):
        head += f" (version {master['version']})"
    facts = []
    uptime = _number(master.get("uptime_s", status.get("uptime_s")))
    if uptime is not None:
        facts.append(f"up {format_duration(uptime)}")
    rss = _number(master.get("rss_bytes"))
    if rss is not None:
        facts.append(f"{rss / (1 << 20):.0f} MiB")
    if isinstance(master.get("event_loop"), str):
        facts.append(f"{_text(master['event_loop'])} loop")
    parts = [head + (", " + ", ".join(facts) if facts else "")]
    throughput = _throughput(status.get("throughput"))
    if throughput:
        parts.append(throughput)
    totals = [f"{_text(status[key])} {key}" for key in ("queued", "running") if key in status]
    if totals:
        parts.append(", ".join(totals))
    return "; ".join(parts)


def _throughput(info) -> str:
    if not isinstance(info, dict):
        return ""
    window, jobs, rate = _number(info.get("window_s")), _number(info.get("jobs")), _number(info.get("per_s"))
    if rate is None and jobs is not None and window:
        rate = jobs / window
    if rate is None:
        return ""
    text = f"{rate:.1f} jobs/s"
    if window is not None:
        text += f" over the last {window:g} s"
    return text


def _limit_rows(limits) -> list[dict]:
    if not isinstance(limits, dict):
        return []
    return [{"name": name, **value} if isinstance(value, dict) else {"name": name, "limit": value}
            for name, value in limits.items()]


def format_status(status: dict, *, address: str | None = None) -> str:
    """The master's status as text: a header line, then the workers, clients,
    queues, limits and waiting jobs, each as an aligned table.  ``address``
    (where we reached the master) names it when the master does not say."""
    if not isinstance(status, dict):
        return f"cw master{' ' + address if address else ''}: unexpected status {status!r}"
    lines = [_header(status, address)]
    if "workers" in status:
        workers = _rows(status["workers"])
        lines += _section("WORKERS", workers, WORKER_COLUMNS, "no workers connected")
        states: dict[str, int] = {}
        for w in workers:
            states[_text(w.get("state"))] = states.get(_text(w.get("state")), 0) + 1
        if workers and "state" in workers[0]:
            lines.append("  " + ", ".join(f"{n} {s}" for s, n in sorted(states.items())))
    if "clients" in status:
        lines += _section("CLIENTS", _rows(status["clients"]), CLIENT_COLUMNS, "no clients connected")
    if "queues" in status:
        queues = sorted(_rows(status["queues"]),
                        key=lambda q: (str(q.get("client")), -(_number(q.get("priority")) or 0)))
        lines += _section("QUEUES", queues, QUEUE_COLUMNS, "no jobs queued")
    if "limits" in status:
        lines += _section("LIMITS", _limit_rows(status["limits"]), LIMIT_COLUMNS, "none set")
    if "waiting" in status:
        lines += _section("WAITING", _rows(status["waiting"]), WAITING_COLUMNS, "no job is held back")
    return "\n".join(lines)


# --- the program ---------------------------------------------------------------------

def _where(host: str | None, port: int) -> tuple[str, int, str]:
    """Where the master should be (``tls://HOST:PORT`` for a TLS master), its
    port, and why we look there (for the error message)."""
    from cw.client.discovery import ENV_MASTER, resolve_master
    found = resolve_master(host, port)
    found_host, found_port = found
    if host:
        why = "as given"
    elif os.environ.get(ENV_MASTER):
        why = f"from ${ENV_MASTER}"
    elif (found_host, found_port) != ("localhost", port):
        why = "the address the SLURM cluster published"
    else:
        why = f"the default: no HOST given and ${ENV_MASTER} unset"
    return str(found) if found.tls else found_host, found_port, why


def _parse_args(argv, prog: str = "python -m cw.status") -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description="Show what a cw master sees: workers, clients, queues.")
    add_version_option(parser)
    parser.add_argument("address", nargs="?", metavar="HOST[:PORT]", type=cliargs.master_address,
                        help="the master (default: $CW_MASTER, the SLURM cluster's master, else localhost)")
    parser.add_argument("--port", type=cliargs.port, default=PORT,
                        help=f"the master's port when HOST has none ({PORT})")
    shape = parser.add_mutually_exclusive_group()
    shape.add_argument("--json", action="store_true", help="print the status as one JSON object")
    shape.add_argument("--prometheus", action="store_true",
                       help="print Prometheus metrics (text format), e.g. for node_exporter's textfile collector")
    parser.add_argument("--watch", nargs="?", const=str(DEFAULT_WATCH), default=None, metavar="SECONDS",
                        help=f"print a new report every SECONDS (default {DEFAULT_WATCH:g}) until Ctrl-C")
    parser.add_argument("--timeout", type=cliargs.seconds, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help=f"seconds to reach the master and to get its answer ({DEFAULT_TIMEOUT:g})")
    args = parser.parse_args(argv)
    if args.watch is not None:
        try:
            args.watch = float(args.watch)
        except ValueError:
            # `--watch HOST:PORT`: argparse gave the address to --watch.
            if args.address is not None:
                parser.error(f"--watch takes a number of seconds, not {args.watch!r}")
            args.address, args.watch = args.watch, DEFAULT_WATCH
        if not args.watch > 0:
            parser.error("--watch needs a positive number of seconds")
    if not args.timeout > 0:
        parser.error("--timeout needs a positive number of seconds")
    return args


def _render(status: dict, args, address: str) -> str:
    if getattr(args, "prometheus", False):
        from cw.ops.metrics import status_metrics, text_format
        return text_format(status_metrics(status)).rstrip("\n")
    return json.dumps(status) if args.json else format_status(status, address=address)


def _watch(executor, args, address: str, out) -> None:
    """Prints a report every ``args.watch`` seconds until interrupted."""
    tty = out.isatty()
    first = True
    while True:
        text = _render(executor.status(timeout=args.timeout), args, address)
        if tty and not (args.json or args.prometheus):
            stamp = time.strftime("%H:%M:%S")
            out.write(f"{CLEAR_SCREEN}{text}\n\nevery {args.watch:g} s, {stamp}; Ctrl-C to stop\n")
        elif args.json:
            out.write(text + "\n")          # JSON lines: one object per report
        else:
            out.write(("" if first else "\n") + text + "\n")
        out.flush()
        first = False
        time.sleep(args.watch)


def main(argv=None, prog: str = "python -m cw.status") -> int:
    args = _parse_args(argv, prog)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="cw.status: %(message)s")
    from cw.client.executor import ClusterExecutor
    from cw.errors import CwError
    try:
        host, port, why = _where(args.address, args.port)
    except ValueError as exc:
        print(f"cw.status: {exc}", file=sys.stderr)
        return 2
    address = host if host.startswith("tls://") else f"{host}:{port}"
    executor = None
    try:
        try:
            executor = ClusterExecutor(host, port, connect_timeout=args.timeout)
        except CwError as exc:
            print(f"cw.status: {_connect_error(exc, address, why, args.timeout)}", file=sys.stderr)
            return 1
        if args.watch is not None:
            _watch(executor, args, address, sys.stdout)
        else:
            print(_render(executor.status(timeout=args.timeout), args, address), flush=True)
        return 0
    except KeyboardInterrupt:
        return 0 if args.watch is not None else 130
    except CwError as exc:
        print(f"cw.status: {_one_line(exc)}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`| head`): say nothing more, and keep Python
        # from complaining about stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        if executor is not None:
            executor.shutdown(wait=False)


def _connect_error(exc: BaseException, address: str, why: str, timeout: float) -> str:
    """One line: where we looked, what went wrong, what to do."""
    from cw.errors import BrokenCluster
    from cw.wire.link import HandshakeFailed
    if isinstance(exc, BrokenCluster) and not isinstance(exc, HandshakeFailed):
        cause = exc.__context__  # the last OSError of the connection attempts
        reason = getattr(cause, "strerror", None) or (str(cause) if cause else "")
        return (f"no cw master answered at {address} ({why}) within {timeout:g} s"
                f"{': ' + reason if reason else ''}; start one with `python -m cw.master`, "
                f"or give its address: python -m cw.status HOST:PORT")
    return f"{_one_line(exc)} (master looked for at {address}, {why})"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
