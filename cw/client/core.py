"""A client's books, with no I/O: the jobs it submitted and has not heard
the end of, and what the master learnt from it.

The executor (cw.client.executor) is a shell around this: it pickles calls,
sends the frames this returns, feeds in the frames it receives, and turns
the events this returns into completed futures.  The simulator
(tests/simulator.py) wires the same core to the dispatcher and worker cores.

Rules kept here:
- Every job gets an id of its own in this client.  A job ends once: its
  first RESULT ends it, and any later word about it is ignored (it was
  cancelled, or a re-run after a lost master answered twice).
- Cancelling a job that has not ended withdraws it: CANCEL goes to the
  master, whose CANCELLED answer needs nothing more.
- Each unfinished job's SUBMIT frame is kept until the job ends, with what
  the master learnt from this client besides jobs: its context (working
  directory, sys.path), the limits it set and its sticky setup jobs.  When
  the connection to the master is lost and made again (the same master
  after a network cut, or a new one after a restart, which knows nothing),
  ``resubmission`` gives every one of them again, in the order they were
  first sent: a job may run twice (at least once), its future completes
  once.
- Functions sent once (cw.client.functions): a FUNC goes to the master
  before the first job naming its digest, and again to a new master,
  before the resubmitted jobs.  At most ``MAX_FUNCTIONS`` are announced at
  a time (the master bounds what a client makes it hold): to announce
  another, one that no unfinished job names is forgotten (FORGET); when
  every one is in use, the job carries its function by value instead.
- Status requests that were not answered on a lost connection are failed,
  not re-sent: a status is about the moment it was asked.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict
from typing import NamedTuple

from cw.errors import ProtocolError
from cw.wire import frames
from cw.wire.frames import Frame, kind_name


class Closed(NamedTuple):
    """The master ended the connection, saying why."""
    reason: str


class ClientCore:
    #: Functions announced to the master at a time, and their bytes: below the
    #: master's bounds per client (cw.master.functions).
    MAX_FUNCTIONS = 128
    MAX_FUNCTION_BYTES = 128 * 1024 * 1024

    def __init__(self, context: dict):
        self.context_frame = frames.encode_json(Frame.CONTEXT, context)
        self.unfinished: dict[int, object] = {}     # jobid -> its SUBMIT frame, in the order first sent
        self.limits: dict[str, int | None] = {}
        self.setups: list = []                      # SETUP frames, each sent again to a new master
        self.status_requests: set[int] = set()
        self.functions: OrderedDict[bytes, bytes] = OrderedDict()   # digest -> FUNC frame the master holds
        self.function_bytes = 0
        self.function_users: dict[bytes, int] = {}   # digest -> unfinished jobs naming it
        self.job_functions: dict[int, bytes] = {}    # jobid -> the digest it names
        self.deps: dict[int, bytes] = {}             # jobid -> its DEPS frame (cw.client.refs), sent before it
        self.kept: dict[int, object] = {}            # key -> PUT frame of a live Ref, for a new master
        self._ids = itertools.count(1)

    # --- what the client does -------------------------------------------------

    def new_jobid(self) -> int:
        return next(self._ids)

    def announce(self, digest: bytes, data: bytes) -> list | None:
        """The frames to send before a job naming function ``digest`` (FUNC
        the first time, after FORGETs that make room), or None when there is
        no room: the job must carry its function itself."""
        if digest in self.functions:
            self.functions.move_to_end(digest)
            return []
        out = []
        size = len(data) + frames.DIGEST_SIZE
        while self.functions and (len(self.functions) >= self.MAX_FUNCTIONS
                                  or self.function_bytes + size > self.MAX_FUNCTION_BYTES):
            unused = next((d for d in self.functions if not self.function_users.get(d)), None)
            if unused is None:
                return None
            self.function_bytes -= len(self.functions.pop(unused)) - frames.HEADER_SIZE
            out.append(frames.encode_forget(unused))
        if size > self.MAX_FUNCTION_BYTES:
            return None
        frame = self.functions[digest] = frames.encode_function(digest, data)
        self.function_bytes += size
        out.append(frame)
        return out

    def submit(self, jobid: int, retries: int, timeout: float, payload, priority: int = 0,
               options: dict | None = None, digest: bytes | None = None):
        """The frame that submits job ``jobid``; kept until the job ends.
        ``digest``: the function it names (announced first)."""
        if priority or options:
            frame = frames.encode_submit_with(jobid, retries, timeout, priority, options, payload)
        else:
            frame = frames.encode_submit(jobid, retries, timeout, payload)
        self.unfinished[jobid] = frame
        if digest is not None:
            self.job_functions[jobid] = digest
            self.function_users[digest] = self.function_users.get(digest, 0) + 1
        return frame

    def _ended(self, jobid: int) -> None:
        """A job that named a function is over: the function may be forgotten."""
        digest = self.job_functions.pop(jobid, None)
        if digest is not None:
            users = self.function_users[digest] - 1
            if users:
                self.function_users[digest] = users
            else:
                del self.function_users[digest]

    def forget(self, jobid: int) -> None:
        """A job that will not be sent (its submission failed on the way out)."""
        self.unfinished.pop(jobid, None)
        self.deps.pop(jobid, None)
        if self.job_functions:
            self._ended(jobid)

    def cancel(self, jobid: int):
        """The CANCEL frame to send, or None when the job has ended already."""
        if self.unfinished.pop(jobid, None) is None:
            return None
        if self.deps:
            self.deps.pop(jobid, None)
        if self.job_functions:
            self._ended(jobid)
        return frames.encode_cancel(jobid)

    def limit(self, tag: str, limit: int | None) -> bytes:
        self.limits[tag] = limit
        return frames.encode_json(Frame.LIMIT, {"tag": tag, "limit": limit})

    def setup(self, frame) -> None:
        """A sticky setup job sent to the master (kept for a new master)."""
        self.setups.append(frame)

    def status_request(self, reqid: int) -> bytes:
        self.status_requests.add(reqid)
        return frames.encode_status_request(reqid)

    # --- what the master says --------------------------------------------------

    def receive(self, ftype: int, body):
        """The event a frame from the master makes: its decoded message
        (frames.Result, ClientOutput, Notice, StatusReply) when it concerns
        something unfinished, Closed for ERROR, None for nothing to do.
        Raises ProtocolError for a frame a master never sends a client."""
        if ftype == Frame.RESULT:
            result = frames.decode_result(body)
            if self.unfinished.pop(result.jobid, None) is None:
                return None     # cancelled meanwhile, or answered already
            if self.deps:
                self.deps.pop(result.jobid, None)
            if self.job_functions:
                self._ended(result.jobid)
            return result
        if ftype == Frame.OUTPUT:
            output = frames.decode_output_for_client(body)
            return output if output.jobid in self.unfinished else None
        if ftype == Frame.NOTICE:
            notice = frames.decode_notice(body)
            return notice if notice.jobid in self.unfinished else None
        if ftype == Frame.STATUS:
            reply = frames.decode_status(body)
            if reply.reqid in self.status_requests:
                self.status_requests.discard(reply.reqid)
                return reply
            return None
        if ftype in (Frame.PING, Frame.CANCELLED):
            return None          # the link answers pings; a cancelled future is done already
        if ftype == Frame.ERROR:
            return Closed(bytes(body).decode("utf-8", "replace"))
        raise ProtocolError(f"the master sent an unexpected {kind_name(ftype)} frame")

    # --- a lost connection -------------------------------------------------------

    def connection_lost(self) -> set[int]:
        """The status requests that will get no answer (to fail now)."""
        lost, self.status_requests = self.status_requests, set()
        return lost

    def resubmission(self) -> list:
        """Every frame a master that knows nothing of this client must get,
        in order: the context, the limits, the setups, the functions, then
        every unfinished job."""
        out = [self.context_frame]
        out += [frames.encode_json(Frame.LIMIT, {"tag": tag, "limit": limit}) for tag, limit in self.limits.items()]
        out += self.setups
        out += self.functions.values()
        out += self.kept.values()
        deps = self.deps
        for jobid, frame in self.unfinished.items():
            if jobid in deps:
                out.append(deps[jobid])
            out.append(frame)
        return out

    def give_up(self) -> list[int]:
        """The jobs that end with the connection (no ride-through): all of them."""
        jobids = list(self.unfinished)
        self.unfinished.clear()
        self.deps.clear()
        self.job_functions.clear()
        self.function_users.clear()
        return jobids
