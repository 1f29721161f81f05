"""Unit tests of the client's pure core (cw.client.core): no socket, no thread."""
from __future__ import annotations

import pytest

from cw.client.core import ClientCore, Closed
from cw.errors import ProtocolError
from cw.wire import frames
from cw.wire.decoder import FrameDecoder
from cw.wire.frames import ClientOutput, Frame, Notice, Result, Status, StatusReply


def body(frame):
    """The body of one encoded frame (bytes or a (head, payload...) tuple)."""
    data = b"".join(bytes(c) for c in frame) if isinstance(frame, tuple) else frame
    dec = FrameDecoder()
    dec.feed(data)
    ftype, b = dec.next_frame()
    return ftype, bytes(b)


def result_frame(jobid, status=Status.OK, payload=b"value"):
    return body(frames.encode_result(jobid, status, b"h:1", payload))


def test_a_result_ends_its_job_once():
    core = ClientCore({"cwd": "/", "path": []})
    jobid = core.new_jobid()
    core.submit(jobid, 0xFF, 0.0, b"call")
    assert core.receive(*result_frame(jobid)) == Result(jobid, Status.OK, b"h:1", b"value")
    assert core.receive(*result_frame(jobid)) is None          # a re-run's second answer
    assert core.unfinished == {}


def test_a_cancelled_job_ignores_its_late_result_and_cancels_once():
    core = ClientCore({})
    jobid = core.new_jobid()
    core.submit(jobid, 0xFF, 0.0, b"call")
    assert body(core.cancel(jobid)) == (Frame.CANCEL, body(frames.encode_cancel(jobid))[1])
    assert core.cancel(jobid) is None
    assert core.receive(*result_frame(jobid)) is None


def test_output_and_notices_of_unfinished_jobs_only():
    core = ClientCore({})
    jobid = core.new_jobid()
    core.submit(jobid, 0xFF, 0.0, b"call")
    output = core.receive(*body(frames.encode_output_for_client(jobid, b"h:1", b"hi\n")))
    assert output == ClientOutput(jobid, b"h:1", "hi\n")
    assert core.receive(*body(frames.encode_notice(jobid, "no GPU"))) == Notice(jobid, "no GPU")
    core.receive(*result_frame(jobid))
    assert core.receive(*body(frames.encode_notice(jobid, "no GPU"))) is None


def test_resubmission_sends_context_limits_setups_then_unfinished_jobs_in_order():
    core = ClientCore({"cwd": "/w", "path": ["/w"]})
    ids = [core.new_jobid() for _ in range(4)]
    sent = {i: core.submit(i, 0xFF, 0.0, b"call-%d" % i, priority=5 if i == ids[3] else 0) for i in ids}
    core.limit("db", 2)
    setup = frames.frame(Frame.SETUP, b"setup-payload")
    core.setup(setup)
    core.receive(*result_frame(ids[1]))
    core.cancel(ids[2])
    again = core.resubmission()
    assert [body(f)[0] for f in again] == [Frame.CONTEXT, Frame.LIMIT, Frame.SETUP, Frame.SUBMIT, Frame.SUBMIT_WITH]
    assert again[3] is sent[ids[0]] and again[4] is sent[ids[3]]
    assert frames.decode_json(body(again[1])[1]) == {"tag": "db", "limit": 2}


def test_status_answers_match_requests_and_a_lost_connection_fails_the_open_ones():
    core = ClientCore({})
    core.status_request(7)
    core.status_request(8)
    assert core.receive(*body(frames.encode_status(7, {"workers": []}))) == StatusReply(7, {"workers": []})
    assert core.receive(*body(frames.encode_status(7, {}))) is None
    assert core.connection_lost() == {8}
    assert core.connection_lost() == set()


def test_give_up_ends_every_unfinished_job():
    core = ClientCore({})
    ids = [core.new_jobid() for _ in range(3)]
    for i in ids:
        core.submit(i, 0xFF, 0.0, b"x")
    core.forget(ids[0])
    assert core.give_up() == ids[1:]
    assert core.resubmission()[1:] == []


def test_error_closes_and_unknown_frames_are_refused():
    core = ClientCore({})
    assert core.receive(Frame.ERROR, b"bad secret") == Closed("bad secret")
    assert core.receive(Frame.PING, b"") is None
    with pytest.raises(ProtocolError, match="unexpected JOB frame"):
        core.receive(Frame.JOB, b"")
