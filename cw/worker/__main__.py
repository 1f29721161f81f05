"""``python -m cw.worker [HOST[:PORT]] -n N``: a supervisor and its worker processes."""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys

from cw import PORT, add_version_option, cliargs
from cw.worker import channel, threads
from cw.worker.channel import EXIT_CONFIG, EXIT_NO_MASTER, ExitChannel
from cw.worker.session import DEFAULT_CONNECT_TIMEOUT, master_resolver, run_worker
from cw.worker.supervisor import Supervisor

log = logging.getLogger("cw.worker")


def main(argv=None, prog: str = "python -m cw.worker") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Run cw workers.")
    add_version_option(parser)
    parser.add_argument("master", nargs="?", default=f"localhost:{PORT}", type=cliargs.master_address,
                        help=f"the master's HOST[:PORT] (default localhost:{PORT}; tls://HOST[:PORT] for a "
                             "master started with --tls), slurm:NAME for the "
                             "master of the SLURM cluster NAME, or file:PATH for the master that publishes its "
                             "address in PATH (cw.master --address-file PATH); both are read again at every "
                             "reconnection")
    parser.add_argument("--port", type=cliargs.port, default=PORT,
                        help=f"the master's port when HOST gives none (default {PORT})")
    parser.add_argument("-n", "--processes", type=cliargs.count, default=1, help="worker processes to run (default 1)")
    parser.add_argument("--connect-timeout", type=cliargs.seconds, default=DEFAULT_CONNECT_TIMEOUT,
                        help=f"seconds to keep trying to reach the master (default {DEFAULT_CONNECT_TIMEOUT:g})")
    parser.add_argument("--resources", default="",
                        help="what this machine offers jobs, e.g. gpu=2,mem=64G,license=3 (default: cpu = -n, "
                             "mem = the machine's memory, gpu = the GPUs nvidia-smi lists, or those in "
                             "CUDA_VISIBLE_DEVICES)")
    parser.add_argument("--job-threads", default="cpus", metavar="cpus|N|off",
                        help="BLAS/OpenMP threads of each job: 'cpus' (default) as many as the CPUs it asked for "
                             "(1 unless resources={'cpu': N}), N for every job, 'off' to leave the libraries' "
                             "own counts and OMP_NUM_THREADS and friends alone; a job's threads= overrides it")
    cliargs.tls_file_options(parser)
    parser.add_argument("--log-level", default="INFO", type=cliargs.log_level,
                        help="DEBUG, INFO, WARNING, ERROR or CRITICAL (default INFO)")
    cliargs.until_stdin_closes_option(parser)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--offer", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--exit-channel", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cliargs.export_tls_files(args)    # to the worker processes, and the executors of their jobs
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s")
    try:
        resolve = master_resolver(args.master, args.port, args.connect_timeout)
        job_threads = threads.parse_policy(args.job_threads)
    except ValueError as exc:
        parser.error(str(exc))
    if args.child is not None:
        # The supervisor forwards Ctrl-C as SIGTERM; a terminal's SIGINT to the
        # whole process group must not kill a job half-way with a traceback.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        channel.watch_lifeline(args.child)
        channel.open_exit_channel(args.exit_channel)
        status = run_worker(resolve, args.connect_timeout, json.loads(args.offer) if args.offer else None,
                            job_threads)
        channel.exit_channel.say({EXIT_CONFIG: ExitChannel.CONFIG, EXIT_NO_MASTER: ExitChannel.NO_MASTER}.get(
            status, ExitChannel.DRAINED))
        return status
    from cw.errors import CwError
    from cw.wire.auth import load_secret
    try:
        load_secret()      # a missing or unsafe secret file: said once, here, not by every worker process
    except CwError as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 2           # as the supervisor's exit when its workers find the secret wrong
    from cw.wire.options import format_amounts
    from cw.worker import machine as resources
    try:
        declared = resources.parse_spec(args.resources)
    except ValueError as exc:
        parser.error(str(exc))
    offer = resources.node_resources(args.processes, declared, resources.detect_gpus(),
                                     resources.physical_memory())
    offer["node"] = f"{socket.gethostname()}:{os.getpid()}"
    log.info("this machine offers %s%s", format_amounts(offer["resources"]),
             f" (GPU ids {','.join(offer['gpu_ids'])})" if offer["gpu_ids"] else "")
    supervisor = Supervisor(args.master, args.port, args.processes, args.connect_timeout, args.log_level, offer,
                            job_threads)
    if args.until_stdin_closes:
        cliargs.watch_stdin(supervisor.started_by_gone)
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
