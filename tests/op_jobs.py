"""Job functions for tests/test_operating.py (workers import this module by
name: the client sends its sys.path, which has the tests' directory)."""
from __future__ import annotations

import importlib
import logging
import os
import sys

from jobs import wait_for


def print_three_ways():
    print("to stdout")
    print("to stderr", file=sys.stderr)
    logging.getLogger("myapp").warning("a warning from myapp")
    return "printed"


def print_nothing():
    return 42


def chatter(tag, directory, other, lines=200):
    """Prints ``lines`` lines tagged ``tag`` before and after a rendezvous with
    the job tagged ``other``: both are running at once while they print."""
    for i in range(lines):
        print(f"{tag} line {i}")
    open(os.path.join(directory, tag), "w").close()
    wait_for(os.path.join(directory, other))
    for i in range(lines, 2 * lines):
        print(f"{tag} line {i}", file=sys.stderr if i % 2 else sys.stdout)
    return tag


def print_then_fail(message):
    print("before the error")
    print("on stderr too", file=sys.stderr)
    raise ValueError(message)


def print_a_lot(megabytes):
    """Prints BEGIN, ``megabytes`` MiB of filler, then END; returns how many characters."""
    chunk = "." * (1 << 20)
    sys.stdout.write("BEGIN\n")
    for _ in range(megabytes):
        sys.stdout.write(chunk)
    sys.stdout.write("\nEND\n")
    return len("BEGIN\n") + megabytes * len(chunk) + len("\nEND\n")


def import_value(module):
    return importlib.import_module(module).VALUE


def installed_here():
    """What this worker process installed (cw.client.install.installed), and its pid."""
    import cw.client.install
    return [list(p) for p in cw.client.install.installed], os.getpid()
