"""A job's scheduling options, checked and normalised in one place.

The client checks them when a job is submitted (``job_options``: a bad
option is the caller's mistake, a ValueError saying what to write instead);
the master checks what a SUBMIT_WITH frame carries (``check_submitted``: a
bad option there comes from a broken or hostile peer, a ProtocolError with
the same words).  One set of rules serves both, so the master accepts
exactly what the client lets through, in the form the client sends it.

The options:

- ``priority``: a whole number in +-(2**31 - 1); higher goes first.
- ``resources``: {name: amount}.  A name is letters, digits, '_', '.' or
  '-' (case does not matter; ``cpus``, ``gpus`` and ``memory`` are taken as
  ``cpu``, ``gpu`` and ``mem``); an amount is a number >= 0 or a string
  with a binary unit ("8G", "512MiB"), kept as a number (memory in bytes).
  CPUs default to 1 (the worker process a job runs in); GPUs are whole, as
  a job gets its own ids.
- ``tag``: names the jobs a limit (``ClusterExecutor.limit``) counts.
- ``workers``: the worker ids and host names a job may run on.
- ``threads``: its BLAS/OpenMP thread pools' size, a whole number >= 1
  (default: its CPUs, or the worker's ``--job-threads``).

``format_amounts`` writes amounts back for messages.
"""
from __future__ import annotations

import math
import re

from cw.errors import ProtocolError

#: SUBMIT's retries byte that means "use the master's default".
DEFAULT_RETRIES = 0xFF
#: What a job needs when it says nothing: one CPU (the worker process it runs in).
PLAIN = {"cpu": 1}
MAX_KINDS = 32
MAX_PRIORITY = 2 ** 31 - 1           # SUBMIT_WITH carries it as a signed 32-bit number
MAX_TAG = 200
MAX_WORKERS = 256
MAX_THREADS = 4096
MAX_AMOUNT = 1e18                    # beyond any real machine; keeps the books' sums exact enough

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_AMOUNT = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgtp]?)(i?b)?\s*$", re.IGNORECASE)
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")
_KNOWN = {"resources", "tag", "workers", "threads"}


def parse_amount(value, name: str = "amount") -> int | float:
    """A non-negative amount: a number, or a string with an optional binary
    unit ("64G", "1.5T", "512MiB")."""
    if isinstance(value, bool):
        raise ValueError(f"resource {name!r} must be a number, not {value!r}")
    try:
        if isinstance(value, (int, float)):
            amount = float(value)
        elif isinstance(value, str):
            match = _AMOUNT.match(value)
            if not match:
                raise ValueError(f"resource {name!r}: cannot read {value!r} as an amount "
                                 "(examples: 4, 0.5, 8G, 512M)")
            amount = float(match.group(1)) * _UNITS[match.group(2).lower()]
        else:
            raise ValueError(f"resource {name!r} must be a number or a string like '8G', "
                             f"not {type(value).__name__}")
    except OverflowError:              # an int too big for a float
        amount = math.inf
    if not (0 <= amount < MAX_AMOUNT):   # also refuses NaN
        raise ValueError(f"resource {name!r} must be a finite amount >= 0 (below {MAX_AMOUNT:g}), "
                         f"not {value!r}")
    return int(amount) if amount == int(amount) else amount


#: What people write for the built-in resources (Ray's ``memory``, SLURM's
#: ``--cpus``...): taken as the names the master places by.  Any other name is
#: a resource of its own, which a job waits for until a worker offers it.
ALIASES = {"cpus": "cpu", "gpus": "gpu", "memory": "mem"}


def check_name(name) -> str:
    """A resource name, lower-cased, an alias of a built-in one as that one."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"resource name {name!r} is not valid: use letters, digits, '_', '.' or '-' "
                         "(at most 64 characters, starting with a letter)")
    name = name.lower()
    return ALIASES.get(name, name)


def whole_gpus(amount) -> int:
    """A job's GPU count: whole, since each GPU it gets is named by its id."""
    if amount != int(amount):
        raise ValueError(f"a job asks for whole GPUs, not {amount}")
    return int(amount)


def normalize_need(resources) -> dict:
    """A job's ``resources=`` as {name: amount}; CPUs default to 1, amounts
    of 0 are left out, GPUs must be whole.  Returns ``PLAIN`` itself for a
    job that asks for nothing more than one CPU."""
    if resources is None:
        return PLAIN
    if not isinstance(resources, dict):
        raise ValueError(f"resources must be a dict like {{'cpu': 2, 'mem': '8G', 'gpu': 1}}, not {resources!r}")
    if len(resources) > MAX_KINDS:
        raise ValueError(f"resources names {len(resources)} kinds; at most {MAX_KINDS}")
    need = {"cpu": 1}
    given = {}
    for name, value in resources.items():
        key = check_name(name)
        if key in given:
            raise ValueError(f"resources name {key!r} twice ({given[key]!r} and {name!r}); give it once")
        given[key] = name
        need[key] = parse_amount(value, key)
    whole_gpus(need.get("gpu", 0))
    need = {k: v for k, v in need.items() if v or k == "cpu"}
    return PLAIN if need == PLAIN else need


def check_priority(priority) -> int:
    if isinstance(priority, bool) or not isinstance(priority, int) or not -MAX_PRIORITY <= priority <= MAX_PRIORITY:
        raise ValueError(f"priority must be a whole number between {-MAX_PRIORITY} and {MAX_PRIORITY}, "
                         f"not {priority!r}")
    return priority


def check_tag(tag) -> str:
    """A tag, on a job or on a limit."""
    if not isinstance(tag, str) or not tag or len(tag) > MAX_TAG:
        raise ValueError(f"tag must be a non-empty string of at most {MAX_TAG} characters, not {tag!r}")
    return tag


def check_limit(limit) -> int | None:
    """How many jobs of a tag may run at once; None for no limit."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a whole number >= 0, or None for no limit, not {limit!r}")
    return limit


def _worker_id(entry):
    """An entry of ``ClusterExecutor.workers()`` stands for its id."""
    wid = getattr(entry, "id", None)
    return wid if isinstance(wid, int) else entry


def check_workers(workers) -> list:
    """The workers a job may run on: one, or several, worker ids, host names
    or entries of ``ClusterExecutor.workers()``."""
    if isinstance(workers, (str, int)) or _worker_id(workers) is not workers:
        workers = [workers]
    try:
        workers = list(workers)
    except TypeError:
        raise ValueError(f"workers= takes a list of worker ids and host names, not {workers!r}") from None
    if len(workers) > MAX_WORKERS:
        raise ValueError(f"workers= names {len(workers)} workers; at most {MAX_WORKERS}")
    names = [_worker_id(w) for w in workers]
    for w in names:
        if isinstance(w, bool) or not isinstance(w, (int, str)):
            raise ValueError(f"workers= takes worker ids, host names or the entries of executor.workers(), "
                             f"not {w!r}")
    if not names:
        raise ValueError("workers= is empty: the job could run nowhere")
    return names


def check_threads(threads) -> int:
    """A job's BLAS/OpenMP thread count."""
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS:
        raise ValueError(f"threads must be a whole number from 1 to {MAX_THREADS} (the job's BLAS/OpenMP "
                         f"threads), or None for as many as its CPUs, not {threads!r}")
    return threads


def job_options(priority=0, resources=None, tag=None, workers=None, threads=None) -> tuple[int, dict]:
    """(priority, SUBMIT_WITH options) of a job; raises ValueError with the reason."""
    options = {}
    need = normalize_need(resources)
    if need is not PLAIN:
        options["resources"] = need
    if tag is not None:
        options["tag"] = check_tag(tag)
    if workers is not None:
        options["workers"] = check_workers(workers)
    if threads is not None:
        options["threads"] = check_threads(threads)
    return check_priority(priority), options


def check_submitted(options: dict) -> dict:
    """The options a SUBMIT_WITH frame carries (decoded JSON), normalised
    as ``job_options`` does; raises ProtocolError: the master trusts no peer.
    (The frame's priority needs no check: 32 bits hold any it may be.)"""
    unknown = set(options) - _KNOWN
    if unknown:
        raise ProtocolError(f"SUBMIT_WITH has unknown options {sorted(unknown)[:8]}")
    try:
        return job_options(0, **options)[1]
    except ValueError as exc:
        raise ProtocolError(f"SUBMIT_WITH options: {exc}") from None


def check_limit_request(request: dict) -> tuple[str, int | None]:
    """(tag, limit) of a LIMIT frame's JSON; raises ProtocolError."""
    try:
        return check_tag(request.get("tag")), check_limit(request.get("limit"))
    except ValueError as exc:
        raise ProtocolError(f"LIMIT: {exc}") from None


def format_amounts(amounts: dict) -> str:
    """{"cpu": 2, "mem": 8589934592} -> "cpu=2 mem=8G" (for messages)."""
    parts = []
    for name, value in amounts.items():
        if name == "mem" and value >= 1 << 20:
            for unit in "TGM":
                size = _UNITS[unit.lower()]
                if value >= size:
                    value = f"{value / size:.3g}{unit}"
                    break
        parts.append(f"{name}={value}")
    return " ".join(parts)
