"""Unit tests of cw.wire.decoder.FrameDecoder: whole frames out of any cut of
the byte stream, oversized lengths refused at the header, garbage."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cw.errors import ProtocolError
from cw.wire import frames as f
from cw.wire.decoder import FrameDecoder
from cw.wire.frames import Frame, Status


def raw(encoded) -> bytes:
    return b"".join(encoded) if isinstance(encoded, tuple) else encoded


def drain(dec):
    got = []
    while (item := dec.next_frame()) is not None:
        got.append(item)
    return got


def _many_frames():
    return [
        f.frame(Frame.HELLO, b""),
        raw(f.encode_submit(1, 3, 0.0, b"a" * 300)),
        f.encode_cancel(1),
        raw(f.encode_job(2, 1, 0.0, b"")),
        raw(f.encode_result(3, Status.OK, b"h:1", bytes(range(256)))),
        f.encode_error("bye"),
    ] * 5


def test_decoder_one_byte_at_a_time_returns_all_frames_in_order():
    """Fed a stream of many frames byte by byte, the decoder returns each frame once, in order."""
    sent = _many_frames()
    stream = b"".join(sent)
    dec = FrameDecoder()
    got = []
    for i in range(len(stream)):
        dec.feed(stream[i:i + 1])
        got.extend(drain(dec))
    assert got == [(one[4], one[5:]) for one in sent]
    assert dec.buffered == 0


@pytest.mark.parametrize("encoded", [f.frame(Frame.HELLO, b""), raw(f.encode_submit(1, 2, 0.0, b"xyz" * 10))])
def test_decoder_frame_split_at_every_position(encoded):
    """A frame cut in two anywhere is returned only once its last byte arrives."""
    for cut in range(len(encoded) + 1):
        dec = FrameDecoder()
        dec.feed(encoded[:cut])
        if cut < len(encoded):
            assert dec.next_frame() is None
            assert dec.buffered == cut
        dec.feed(encoded[cut:])
        assert drain(dec) == [(encoded[4], encoded[5:])]
        assert dec.buffered == 0


def test_decoder_two_frames_split_at_every_position():
    """Two back-to-back frames cut anywhere come out whole and in order."""
    stream = raw(f.encode_job(1, 2, 0.0, b"first")) + f.encode_cancel(9)
    for cut in range(len(stream) + 1):
        dec = FrameDecoder()
        dec.feed(stream[:cut])
        got = drain(dec)
        dec.feed(stream[cut:])
        got += drain(dec)
        assert [kind for kind, _ in got] == [Frame.JOB, Frame.CANCEL]
        assert f.decode_job(got[0][1]) == f.Job(1, 2, 0.0, b"first") and f.decode_cancel(got[1][1]) == 9


def test_oversized_length_raises_at_header_before_body():
    """A length above max_frame raises ProtocolError once the 5-byte header is in, without waiting for the body."""
    dec = FrameDecoder(f.PREAUTH_MAX_FRAME)
    header = f.HEADER.pack(f.PREAUTH_MAX_FRAME + 1, Frame.HELLO)
    for byte in header[:-1]:
        dec.feed(bytes([byte]))
        assert dec.next_frame() is None
    dec.feed(header[-1:])
    with pytest.raises(ProtocolError, match="exceeds"):
        dec.next_frame()
    assert dec.buffered == f.HEADER_SIZE


def test_huge_length_raises_even_with_default_limit():
    """A 4 GiB length prefix is refused at once by a decoder with the default limit."""
    dec = FrameDecoder()
    dec.feed(f.HEADER.pack(2**32 - 1, Frame.JOB) + b"abc")
    with pytest.raises(ProtocolError):
        dec.next_frame()
    assert dec.buffered < 16


def test_frame_of_exactly_max_frame_is_accepted_and_limit_can_be_raised():
    """The limit is inclusive, and raising max_frame after the handshake admits bigger frames."""
    dec = FrameDecoder(f.PREAUTH_MAX_FRAME)
    dec.feed(f.frame(Frame.HELLO, b"x" * f.PREAUTH_MAX_FRAME))
    assert dec.next_frame() == (Frame.HELLO, b"x" * f.PREAUTH_MAX_FRAME)
    dec.max_frame = f.DEFAULT_MAX_FRAME
    dec.feed(f.frame(Frame.HELLO, b"y" * (f.PREAUTH_MAX_FRAME + 1)))
    assert dec.next_frame() == (Frame.HELLO, b"y" * (f.PREAUTH_MAX_FRAME + 1))


def reference_parse(stream: bytes, max_frame: int):
    """Frames a plain reading of the format finds in ``stream``, and whether a length exceeds max_frame."""
    found, pos = [], 0
    while len(stream) - pos >= f.HEADER_SIZE:
        length, kind = f.HEADER.unpack_from(stream, pos)
        if length > max_frame:
            return found, True
        if len(stream) - pos - f.HEADER_SIZE < length:
            break
        found.append((kind, stream[pos + f.HEADER_SIZE:pos + f.HEADER_SIZE + length]))
        pos += f.HEADER_SIZE + length
    return found, False


@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(st.binary(max_size=64), max_size=20))
def test_random_bytes_to_preauth_decoder_raise_only_protocol_error(chunks):
    """Random bytes fed to a pre-auth FrameDecoder give the frames they hold, or ProtocolError, nothing else."""
    expected, too_big = reference_parse(b"".join(chunks), f.PREAUTH_MAX_FRAME)
    dec = FrameDecoder(f.PREAUTH_MAX_FRAME)
    got = []
    try:
        for chunk in chunks:
            dec.feed(chunk)
            got += drain(dec)
    except ProtocolError:
        assert too_big
    else:
        assert not too_big
    assert got == expected




def test_data_is_empty_once_every_whole_frame_was_taken():
    # A reader looks at ``data`` before it calls next_frame (cw.wire.link): it
    # must be empty exactly when nothing is left to decode.
    dec = FrameDecoder()
    first, second = f.frame(Frame.PING), raw(f.encode_outcome(7, Status.OK, b"x" * 40))
    dec.feed(first + second[:10])
    assert dec.next_frame() == (Frame.PING, b"")
    assert dec.next_frame() is None and dec.data          # part of the outcome: keep it
    dec.feed(second[10:])
    assert dec.next_frame() is not None
    assert not dec.data and dec.next_frame() is None
