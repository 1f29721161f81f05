"""``cw``: one command for every part, ``cw master``, ``cw worker``,
``cw status``, ``cw slurm start|stop|status``, ``cw demo`` and
``cw --version``.  Each subcommand is the same program as its
``python -m cw.X`` form (which keeps working), given the rest of the line."""
from __future__ import annotations

import argparse
import importlib
import sys

from cw import add_version_option

#: subcommand -> (module, what it does)
COMMANDS = {
    "master": ("cw.master.server", "run a master: it routes jobs between clients and workers"),
    "worker": ("cw.worker.__main__", "run worker processes on this machine"),
    "status": ("cw.ops.status", "show what a master sees: workers, clients, queues"),
    "slurm": ("cw.launch.slurm", "start, stop or inspect a cluster on SLURM"),
    "demo": ("cw.demo", "run a small numpy demo on a local cluster"),
    "dashboard": ("cw.dashboard.__main__", "serve a live web page, Prometheus metrics and a REST API for jobs"),
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        prog="cw", description="cw (cluster-workers): spread Python function calls over many machines.",
        epilog="`cw COMMAND --help` describes each command's options.")
    add_version_option(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, summary) in COMMANDS.items():
        commands.add_parser(name, help=summary, add_help=False)
    # Only the command's name is parsed here: everything after it goes to that command as it is.
    args = parser.parse_args(argv[:1])
    module = importlib.import_module(COMMANDS[args.command][0])
    return module.main(argv[1:], prog=f"cw {args.command}")


if __name__ == "__main__":
    sys.exit(main())
