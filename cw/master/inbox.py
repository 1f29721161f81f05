"""Frames in: what each frame a client or a worker sends means to the
dispatcher.  The master's asyncio shell and the protocol simulator
(tests/simulator.py) both pass frames through here, so both drive the
dispatcher in the same way."""
from __future__ import annotations

from cw.errors import ProtocolError
from cw.master.dispatch import Dispatcher
from cw.wire import frames
from cw.wire import kept as kept_wire
from cw.wire.frames import Frame, kind_name

# Plain ints: a frame's kind arrives as an int, and comparing it with a Frame
# member costs a class attribute lookup, several times the comparison.
CLIENT_FRAMES = frozenset(map(int, (Frame.SUBMIT, Frame.SUBMIT_WITH, Frame.CANCEL, Frame.SETUP, Frame.LIMIT,
                                    Frame.CONTEXT, Frame.FUNC, Frame.FORGET, Frame.DEPS, Frame.PUT,
                                    Frame.RELEASE_KEY)))
WORKER_FRAMES = frozenset(map(int, (Frame.OUTCOME, Frame.REVOKED, Frame.OUTPUT, Frame.LEND, Frame.RECLAIM,
                                    Frame.DRAIN, Frame.NEED, Frame.FETCH)))
SUBMIT, OUTCOME = int(Frame.SUBMIT), int(Frame.OUTCOME)    # one of each per job


def client_frame(d: Dispatcher, cid: int, ftype: int, body) -> None:
    """A frame of CLIENT_FRAMES from client ``cid`` (the shell answers
    status requests and pings).  Raises ProtocolError for a bad body."""
    if ftype == SUBMIT:
        submit = frames.decode_submit(body)
        if not (d.kept.deps and d.kept.hold(cid, submit)):    # (held: it waits for kept values)
            d.submit(cid, *submit)
    elif ftype == Frame.SUBMIT_WITH:
        jobid, retries, timeout, priority, options, payload = frames.decode_submit_with(body)
        submit = (jobid, retries, timeout, payload, priority, options)
        if not (d.kept.deps and d.kept.hold(cid, submit)):
            d.submit(cid, *submit)
    elif ftype == Frame.CANCEL:
        d.cancel(cid, frames.decode_cancel(body))
    elif ftype == Frame.SETUP:
        d.add_setup(body)
    elif ftype == Frame.LIMIT:
        limit = frames.decode_limit(body)
        d.set_limit(limit.tag, limit.limit)
    elif ftype == Frame.CONTEXT:
        d.set_context(cid, body)
    elif ftype == Frame.FUNC:
        d.add_function(cid, *frames.decode_function(body))
    elif ftype == Frame.FORGET:
        d.forget_function(cid, frames.decode_digest(body, "FORGET"))
    elif ftype == Frame.DEPS:
        jobid, deps = kept_wire.decode_deps(body)
        d.kept.deps[(cid, jobid)] = deps
    elif ftype == Frame.PUT:
        d.put(cid, kept_wire.decode_put(body))
    elif ftype == Frame.RELEASE_KEY:
        d.kept.release(cid, kept_wire.decode_key(body, "RELEASE_KEY")[0])
    else:
        raise ProtocolError(f"a client may not send frame type {kind_name(ftype)}")

def worker_frame(d: Dispatcher, wid: int, ftype: int, body) -> None:
    """A frame of WORKER_FRAMES from worker ``wid``.  Raises ProtocolError
    for a bad body or a frame that breaks the rules (an outcome of a job
    it does not run...): the shell then drops the worker."""
    if ftype == OUTCOME:
        d.outcome(wid, *frames.decode_outcome(body))
    elif ftype == Frame.REVOKED:
        revoked = frames.decode_revoked(body)
        d.revoked(wid, revoked.gid, revoked.given_back)
    elif ftype == Frame.OUTPUT:
        output = frames.decode_output(body)
        d.output(wid, output.gid, output.text)
    elif ftype == Frame.LEND:
        d.lend(wid)
    elif ftype == Frame.RECLAIM:
        d.reclaim(wid)
    elif ftype == Frame.DRAIN:
        d.drain_worker(wid, frames.decode_drain(body))
    elif ftype == Frame.NEED:
        d.need(wid, frames.decode_digest(body, "NEED"))
    elif ftype == Frame.FETCH:
        d.kept.fetch(wid, kept_wire.decode_key(body, "FETCH")[0])
    else:
        raise ProtocolError(f"a worker may not send frame type {kind_name(ftype)}")

