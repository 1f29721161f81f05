"""B5's measurement in a fresh process, so each system's peak RSS is its own.

``python -m bench.b5_child SYSTEM NCALLS NWORKERS [LIMIT_S]`` starts the
system, submits NCALLS no-op calls at once (a list of futures), waits for
every result and prints one JSON line: the time, the peak RSS growth of this
client process and, for cw, of the master process.  With LIMIT_S it stops
waiting after that many seconds and reports how many calls were done.
"""
from __future__ import annotations

import json
import sys
import time

from . import jobs, procinfo, systems


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    name, ncalls, nworkers = argv[0], int(argv[1]), int(argv[2])
    limit = float(argv[3]) if len(argv) > 3 else None
    system = systems.start(name, nworkers)
    try:
        master = system.master_pid
        reset_ok = procinfo.reset_hwm()
        client_before = procinfo.rss_kib()
        client_hwm_before = procinfo.hwm_kib()
        if master is not None:
            procinfo.reset_hwm(master)
            master_before = procinfo.rss_kib(master)
            master_hwm_before = procinfo.hwm_kib(master)
        t0 = time.perf_counter()
        futures = [system.submit(jobs.noop) for _ in range(ncalls)]
        t_submitted = time.perf_counter()
        done = system.wait(futures, None if limit is None else max(0.0, limit - (t_submitted - t0)))
        elapsed = time.perf_counter() - t0
        if done == ncalls:
            assert len(system.results(futures)) == ncalls
        out = {
            "time_s": elapsed if done == ncalls else None,
            "done": done,
            "elapsed_s": elapsed,
            "submit_s": t_submitted - t0,
            "client_peak_growth_mib": (procinfo.hwm_kib() - client_before) / 1024,
            "client_peak_mib": procinfo.hwm_kib() / 1024,
            "client_hwm_reset": reset_ok,
            "client_hwm_before_mib": client_hwm_before / 1024,
        }
        if master is not None:
            out["master_peak_growth_mib"] = (procinfo.hwm_kib(master) - master_before) / 1024
            out["master_peak_mib"] = procinfo.hwm_kib(master) / 1024
            out["master_hwm_before_mib"] = master_hwm_before / 1024
        # The figures are taken: report them before anything can go wrong in the teardown.
        print(json.dumps(out), flush=True)
        if done < ncalls:
            system.cancel(futures)
        del futures
    finally:
        try:
            system.close()
        except Exception as exc:  # noqa: BLE001 - a teardown error must not lose the figures
            print(f"closing {name} failed: {exc!r}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
