"""B6's helper: one process holding many worker connections to a cw master.

``python -m bench.idle_workers HOST PORT COUNT`` opens COUNT authenticated
connections that say HELLO as workers (``cw.wire.link.open_link``), prints
``ready COUNT`` on stdout, then serves all of them with ``selectors``: each
JOB frame is run through ``cw.wire.payload.run_payload`` and its OUTCOME sent
back (with the function the master sent once in a FUNC frame, when the job
names one by digest), PINGs are answered, everything else is ignored.  So they are real, if
slow, workers: one process and one thread for all of them.  It exits when
its stdin closes (the parent's signal to stop) or on SIGTERM.

The secret comes from ``$CW_SECRET_FILE`` like any cw peer's.
"""
from __future__ import annotations

import os
import resource
import selectors
import signal
import sys

from cw.wire import frames
from cw.wire.auth import load_secret
from cw.wire.frames import Frame
from cw.wire.link import open_link, peer_info
from cw.wire.payload import run_payload
from cw.worker.functions import FunctionLRU

_RECV = 256 * 1024


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def decode_job(body):
    """(gid, payload) of a JOB frame, whatever fields the protocol version puts between."""
    fields = frames.decode_job(body)
    return fields[0], fields[-1]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    host, port, count = argv[0], int(argv[1]), int(argv[2])
    raise_fd_limit(count + 256)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    secret = load_secret()
    pong = frames.PONG_FRAME
    ping = Frame.PING
    links = []
    for _ in range(count):
        links.append(open_link(host, port, secret, peer_info("worker"), 30.0))
    sel = selectors.DefaultSelector()
    for link in links:
        sel.register(link.sock, selectors.EVENT_READ, link)
    sel.register(sys.stdin, selectors.EVENT_READ, None)
    print(f"ready {count}", flush=True)
    jobs_run = 0
    functions = FunctionLRU()       # one for all the connections: they share a master

    def handle(link) -> bool:
        nonlocal jobs_run
        while True:
            item = link.decoder.next_frame()
            if item is None:
                return True
            ftype, body = item
            if ftype == Frame.JOB:
                gid, payload = decode_job(body)
                digest = frames.function_digest(payload)
                status, data = run_payload(payload, None, None if digest is None else functions.get(digest))
                link.send(frames.encode_outcome(gid, status, data))
                jobs_run += 1
            elif ftype == Frame.FUNC:
                function = frames.decode_function(body)
                functions.put(function.digest, function.data)
            elif ping is not None and ftype == ping and pong is not None:
                link.send(pong)
            elif ftype == Frame.ERROR:
                return False
            # CONTEXT, WELCOME, ABORT and the rest: nothing to do for no-op jobs.

    # open_link may have read frames past the handshake already (a WELCOME).
    for link in links:
        if link.decoder.buffered and not handle(link):
            sel.unregister(link.sock)
    try:
        while True:
            for key, _ in sel.select():
                link = key.data
                if link is None:                 # stdin: the parent closed it or wrote to it
                    if not os.read(sys.stdin.fileno(), 4096):
                        return 0
                    continue
                data = link.sock.recv(_RECV)
                if not data:
                    sel.unregister(link.sock)
                    continue
                link.decoder.feed(data)
                if not handle(link):
                    sel.unregister(link.sock)
    finally:
        for link in links:
            link.close()
        print(f"ran {jobs_run}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
