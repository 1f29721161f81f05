"""Job options (cw.wire.options): the client (at submit) and the master (decoding
SUBMIT_WITH and LIMIT frames) give the same verdicts, with the same messages, on
one table of good and bad options; the client raises ValueError, the master
ProtocolError."""
from __future__ import annotations

import json

import pytest

from cw.client import WorkerDescription
from cw.client.executor import scheduling_options
from cw.errors import ProtocolError
from cw.wire import frames
from cw.wire import options as o
from cw.wire.frames import Frame

G = 1 << 30

#: (resources, tag, workers) -> the options the master gets, as the client sends them.
GOOD = [
    ((None, None, None), {}),
    (({}, None, None), {}),
    (({"cpu": 1}, None, None), {}),
    (({"license": 0}, None, None), {}),                               # amounts of 0 are left out
    (({"gpu": 1, "mem": "8G"}, None, None), {"resources": {"cpu": 1, "gpu": 1, "mem": 8 * G}}),
    (({"cpu": 0, "gpu": 2.0}, None, None), {"resources": {"cpu": 0, "gpu": 2}}),
    (({"GPU": 1, "Scratch": "1.5T"}, None, None), {"resources": {"cpu": 1, "gpu": 1, "scratch": 3 << 39}}),
    (({"mem": "512MiB", "cpu": 0.5}, None, None), {"resources": {"cpu": 0.5, "mem": 512 << 20}}),
    # The names people write for the built-in ones (Ray's, SLURM's) are those.
    (({"cpus": 4, "Memory": "8G", "GPUs": 1}, None, None), {"resources": {"cpu": 4, "mem": 8 * G, "gpu": 1}}),
    (({"cpus": 1}, None, None), {}),
    ((None, "db", None), {"tag": "db"}),
    ((None, "x" * 200, None), {"tag": "x" * 200}),
    ((None, None, [3, "h1"]), {"workers": [3, "h1"]}),
    ((None, None, "h1"), {"workers": ["h1"]}),
    ((None, None, 7), {"workers": [7]}),
    ((None, None, list(range(256))), {"workers": list(range(256))}),
    (({"gpu": 1}, "train", ["h2"]), {"resources": {"cpu": 1, "gpu": 1}, "tag": "train", "workers": ["h2"]}),
]

#: (resources, tag, workers) -> words of the message, on both sides.
BAD = [
    (({"gpu": 0.5}, None, None), "whole GPUs, not 0.5"),
    (({"mem": "lots"}, None, None), "cannot read 'lots' as an amount"),
    ((["gpu"], None, None), "resources must be a dict"),
    (({"mem": -1}, None, None), "resource 'mem' must be a finite amount >= 0"),
    (({"mem": 1e19}, None, None), "below 1e+18"),
    (({"mem": 10 ** 400}, None, None), "resource 'mem' must be a finite amount"),
    (({"mem": float("nan")}, None, None), "resource 'mem' must be a finite amount"),
    (({"mem": float("inf")}, None, None), "resource 'mem' must be a finite amount"),
    (({"cpu": True}, None, None), "resource 'cpu' must be a number, not True"),
    (({"disk": None}, None, None), "resource 'disk' must be a number or a string"),
    (({"disk": [1]}, None, None), "resource 'disk' must be a number or a string"),
    (({"2gpu": 1}, None, None), "resource name '2gpu' is not valid"),
    (({"cpu": 2, "CPUs": 4}, None, None), "resources name 'cpu' twice ('cpu' and 'CPUs')"),
    (({"a" * 65: 1}, None, None), "is not valid"),
    (({f"r{i}": 1 for i in range(33)}, None, None), "resources names 33 kinds; at most 32"),
    ((None, "", None), "tag must be a non-empty string"),
    ((None, "x" * 201, None), "tag must be a non-empty string of at most 200"),
    ((None, 5, None), "tag must be a non-empty string"),
    ((None, None, []), "workers= is empty"),
    ((None, None, [True]), "not True"),
    ((None, None, [1.5]), "not 1.5"),
    ((None, None, [None]), "not None"),
    ((None, None, [[1]]), "not [1]"),
    ((None, None, 1.5), "workers= takes a list"),
    ((None, None, list(range(257))), "workers= names 257 workers; at most 256"),
]


def client_side(resources, tag, workers):
    return scheduling_options(0, resources, tag, workers)[1]


def master_side(resources, tag, workers):
    """What the master makes of a SUBMIT_WITH frame carrying these options as they are."""
    raw = {k: v for k, v in (("resources", resources), ("tag", tag), ("workers", workers)) if v is not None}
    frame = b"".join(frames.encode_submit_with(1, 0, 0.0, 0, raw, b"payload"))
    *_, options, payload = frames.decode_submit_with(frame[frames.HEADER_SIZE:])
    assert bytes(payload) == b"payload"
    return options


@pytest.mark.parametrize("given, expected", GOOD, ids=[str(g) for g, _ in GOOD])
def test_good_options_come_out_the_same_on_both_sides(given, expected):
    sent = client_side(*given)
    assert sent == expected
    assert master_side(*given) == expected
    # What the client sends, the master takes as it is.
    assert o.check_submitted(json.loads(json.dumps(sent))) == expected


@pytest.mark.parametrize("given, words", BAD, ids=[w for _, w in BAD])
def test_bad_options_are_refused_on_both_sides_with_the_same_words(given, words):
    with pytest.raises(ValueError) as client_error:
        client_side(*given)
    with pytest.raises(ProtocolError) as master_error:
        master_side(*given)
    assert words in str(client_error.value)
    assert str(client_error.value) in str(master_error.value)    # the same message, said to be the peer's


def test_options_the_client_alone_can_give():
    """Priorities (SUBMIT_WITH carries 32 bits) and entries of executor.workers() (not JSON)."""
    for bad in (1.5, True, "high", 2 ** 31, -(2 ** 31)):
        with pytest.raises(ValueError, match="priority must be a whole number"):
            scheduling_options(bad)
    assert scheduling_options(-5)[0] == -5
    entry = WorkerDescription(4, "h4", 104, None, {}, "idle", 0)
    assert scheduling_options(0, workers=entry)[1] == {"workers": [4]}
    assert scheduling_options(0, workers=[entry, "h9"])[1] == {"workers": [4, "h9"]}
    assert scheduling_options(0, workers=(w for w in [2, 3]))[1] == {"workers": [2, 3]}


def test_the_master_refuses_options_it_does_not_know():
    with pytest.raises(ProtocolError, match="unknown options"):
        o.check_submitted({"resources": {"gpu": 1}, "colour": "red"})


@pytest.mark.parametrize("tag, limit, words", [
    ("db", 2, None), ("db", 0, None), ("db", None, None),
    ("", 1, "tag must be a non-empty string"), ("x" * 201, 1, "at most 200"), (7, 1, "tag must be"),
    ("db", -1, "limit must be a whole number >= 0"), ("db", 1.5, "limit must be"), ("db", True, "limit must be"),
])
def test_limits_get_the_same_verdict_on_both_sides(tag, limit, words):
    body = frames.encode_json(Frame.LIMIT, {"tag": tag, "limit": limit})[frames.HEADER_SIZE:]
    if words is None:
        assert (o.check_tag(tag), o.check_limit(limit)) == frames.decode_limit(body) == (tag, limit)
        return
    with pytest.raises(ValueError, match=words):
        o.check_tag(tag), o.check_limit(limit)
    with pytest.raises(ProtocolError, match=words):
        frames.decode_limit(body)


def test_amounts_are_written_back_for_messages():
    assert o.format_amounts({"cpu": 2, "mem": 8 * G, "gpu": 1}) == "cpu=2 mem=8G gpu=1"
    assert o.format_amounts({"mem": 1536 << 20}) == "mem=1.5G"
