"""``cw master``: the command line of the master (cw.master.server runs it).

Usage: ``python -m cw.master [--bind ADDR] [--port N] [--tls]``; when it is
ready it prints ``cw master listening on HOST:PORT`` on stdout
(``tls://HOST:PORT`` with ``--tls``).
"""
from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import signal
import socket
import sys

from cw import PORT, add_version_option, cliargs, settings
from cw.errors import CwError
from cw.master import kept
from cw.master.server import HANDSHAKE_TIMEOUT, _loop_name, event_loop_runner, serve
from cw.wire import tls
from cw.wire.address import format_address, remove_address_file, write_address_file
from cw.wire.auth import load_secret

log = logging.getLogger("cw.master")


def advertised_host(bound: str) -> str:
    """A name other machines can use to reach a master bound to ``bound``."""
    if bound in ("0.0.0.0", "::", ""):
        # The host name, which a cluster's nodes resolve; the fully qualified
        # name when there is a real one (getfqdn says "localhost" on machines
        # whose /etc/hosts maps the host name to 127.0.0.1 first).
        fqdn = socket.getfqdn()
        if "." in fqdn and not fqdn.startswith("localhost"):
            return fqdn
        return socket.gethostname()
    return bound



def main(argv=None, prog: str = "python -m cw.master") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Run a cw master.")
    add_version_option(parser)
    parser.add_argument("--bind", default="127.0.0.1", type=cliargs.bind_address,
                        help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    parser.add_argument("--port", type=cliargs.port, default=PORT,
                        help=f"TCP port (default {PORT}; 0 picks a free one)")
    parser.add_argument("--handshake-timeout", type=cliargs.seconds, default=HANDSHAKE_TIMEOUT,
                        help=f"seconds a new connection has to authenticate (default {HANDSHAKE_TIMEOUT:g})")
    parser.add_argument("--heartbeat", type=cliargs.seconds, default=settings.HEARTBEAT_INTERVAL,
                        help=f"seconds between pings to every peer (default {settings.HEARTBEAT_INTERVAL:g})")
    parser.add_argument("--peer-timeout", type=cliargs.seconds, default=settings.PEER_TIMEOUT,
                        help="seconds of silence after which a worker or client is declared lost "
                             f"(default {settings.PEER_TIMEOUT:g})")
    parser.add_argument("--slots", type=cliargs.count, default=settings.WORKER_SLOTS,
                        help="jobs a worker holds at once: the one it runs and the next ones, sent ahead "
                             f"(default {settings.WORKER_SLOTS}; 1 sends a job only to an idle worker)")
    parser.add_argument("--revoke-timeout", type=cliargs.seconds, default=settings.REVOKE_TIMEOUT,
                        help="seconds a worker has to give back a job sent ahead when asked (a more urgent job "
                             "wants its place, or an idle worker its job) before the job goes to another worker "
                             "anyway; a frozen worker's late start of it is dropped "
                             f"(default {settings.REVOKE_TIMEOUT:g})")
    parser.add_argument("--unplaceable-timeout", type=cliargs.seconds, default=settings.UNPLACEABLE_TIMEOUT,
                        help="seconds a job that no connected worker could run (it needs more than any has, or "
                             "names workers that are gone) waits for one to join before it fails "
                             f"(default {settings.UNPLACEABLE_TIMEOUT:g})")
    parser.add_argument("--kept-bytes", type=kept.parse_size, default=settings.KEPT_BYTES,
                        help="memory for kept values (executor.put, futures passed to jobs): beyond it a put "
                             f"fails, saying so (default {settings.KEPT_BYTES >> 30}G; suffixes K, M, G)")
    parser.add_argument("--address-file", default=None,
                        help="once listening, write the master's reachable address to this file as JSON "
                             "(the SLURM helpers use it to find the master)")
    parser.add_argument("--advertise", default=None,
                        help="host name to publish in --address-file (default: this machine's name when "
                             "bound to every interface, else the bind address)")
    parser.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto",
                        help="event loop: uvloop (faster; pip install \"cw[fast]\"), asyncio (the standard "
                             "library's), or auto: uvloop when installed (default)")
    parser.add_argument("--tls", action="store_true",
                        help="speak only TLS 1.3, with peers holding a certificate of the cluster's CA (created "
                             "with the certificates in tls/ beside the secret file on first use; needs "
                             "pip install \"cluster-workers[tls]\"); peers connect to tls://HOST:PORT")
    cliargs.tls_file_options(parser)
    cliargs.until_stdin_closes_option(parser)
    parser.add_argument("--log-level", default="INFO", type=cliargs.log_level,
                        help="DEBUG, INFO, WARNING, ERROR or CRITICAL (default INFO)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        secret = load_secret(create=True)
        run_loop = event_loop_runner(args.loop)
        tls_context = _tls_context(args)
    except CwError as exc:
        print(f"cw.master: {exc}", file=sys.stderr)
        return 2
    if not cliargs.is_loopback(args.bind):
        log.warning("listening on %s: any machine that can reach it and holds the secret file can run code "
                    "on your workers; keep the secret file private", args.bind)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if args.until_stdin_closes:
            def started_by_gone():
                log.info("standard input ended (the program that started this master is gone): stopping")
                try:
                    loop.call_soon_threadsafe(stop.set)
                except RuntimeError:      # the loop is closed: this master is stopping already
                    pass
            cliargs.watch_stdin(started_by_gone)

        def ready(host, port):
            if args.address_file:
                write_address_file(args.address_file, args.advertise or advertised_host(host), port,
                                   job=os.environ.get("SLURM_JOB_ID"), tls=tls_context is not None)
            shown = format_address(host, port, tls_context is not None)
            log.info("listening on %s with the %s event loop", shown, _loop_name())
            print(f"cw master listening on {shown}", flush=True)

        await serve(args.bind, args.port, secret, ready, stop, handshake_timeout=args.handshake_timeout,
                    heartbeat=args.heartbeat, peer_timeout=args.peer_timeout, slots=args.slots,
                    unplaceable_timeout=args.unplaceable_timeout, revoke_timeout=args.revoke_timeout,
                    kept_bytes=args.kept_bytes, tls_context=tls_context)

    try:
        run_loop(run())
    except OSError as exc:
        if args.address_file and str(exc.filename or "").startswith(args.address_file):
            print(f"cw.master: cannot write the address file {args.address_file}: {exc.strerror}", file=sys.stderr)
            return 1
        print(f"cw.master: cannot listen on {args.bind} port {args.port}: {_bind_advice(exc)}", file=sys.stderr)
        return 1
    finally:
        if args.address_file:
            remove_address_file(args.address_file)
    log.info("master stopped")
    return 0


def _tls_context(args):
    """The master's SSL context for --tls (making the cluster's certificates on first use), else None."""
    given = tls.TlsFiles(args.tls_cert, args.tls_key, args.tls_ca)
    if not args.tls:
        if any(given):
            raise CwError("--tls-cert, --tls-key and --tls-ca need --tls")
        return None
    if not any(given) and not any(os.environ.get(v) for v in (tls.ENV_CERT, tls.ENV_KEY, tls.ENV_CA)):
        tls.ensure_cluster_files()
    return tls.server_context(given)


def _bind_advice(exc: OSError) -> str:
    """Why a bind failed, in words that say what to change."""
    if exc.errno == errno.EADDRINUSE:
        return "the port is in use (another master?); choose another --port, or 0 for any free one"
    if exc.errno == errno.EADDRNOTAVAIL:
        return "no interface of this machine has that address; give one of its addresses, or 0.0.0.0 for all"
    if exc.errno == errno.EACCES:
        return "not allowed (ports below 1024 need privileges); choose a --port of 1024 or more"
    if isinstance(exc, socket.gaierror):
        return f"the host name does not resolve ({exc.strerror}); give an IP address of this machine"
    return exc.strerror or str(exc)


if __name__ == "__main__":
    sys.exit(main())
