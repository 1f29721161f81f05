"""Coverage-guided fuzzing of cw.wire.frames's decoders with atheris (libFuzzer).

Optional: needs ``pip install atheris``.  Run by hand, from the repository root::

    python tests/fuzz_atheris_decoder.py -runs=20000
    python tests/fuzz_atheris_decoder.py -max_total_time=600 corpus/   # longer, keeping a corpus

Any libFuzzer flag works.  Each input is cut into a frame-size limit and
chunks fed to a ``FrameDecoder``; every frame it yields, and the raw input
itself, go through every ``decode_*`` function.  The harness fails (libFuzzer
prints the input and writes a crash-* file) when anything raises other than
``cw.ProtocolError``, or when the decoder returns frames that are not exactly
the frames the input holds.  tests/test_fuzz.py runs it briefly under pytest.
"""
from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from cw.errors import ProtocolError
    from cw.wire import frames
    from cw.wire.decoder import FrameDecoder

# Found by name, so that new decoders are fuzzed too; each takes the body alone.
DECODERS = [getattr(frames, name) for name in sorted(dir(frames))
            if name.startswith("decode_") and callable(getattr(frames, name))]


def reference_frames(stream: bytes, max_frame: int):
    """The frames a plain reading of the format finds; and whether a length was too big."""
    found, pos = [], 0
    while len(stream) - pos >= frames.HEADER_SIZE:
        length, kind = frames.HEADER.unpack_from(stream, pos)
        if length > max_frame:
            return found, True
        if len(stream) - pos - frames.HEADER_SIZE < length:
            break
        start = pos + frames.HEADER_SIZE
        found.append((kind, stream[start:start + length]))
        pos = start + length
    return found, False


def decode_everything(body: bytes) -> None:
    for decode in DECODERS:
        try:
            decode(body)
        except ProtocolError:
            pass


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    max_frame = fdp.ConsumeIntInRange(0, 1024)
    chunks = []
    while fdp.remaining_bytes():
        chunks.append(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64)))
    stream = b"".join(chunks)

    decoder = FrameDecoder(max_frame)
    got, refused = [], False
    try:
        for chunk in chunks:
            decoder.feed(chunk)
            while (item := decoder.next_frame()) is not None:
                got.append(item)
    except ProtocolError:
        refused = True
    expected, too_big = reference_frames(stream, max_frame)
    if got != expected or refused != too_big:
        raise AssertionError(f"decoder gave {got!r} (refused={refused}), the input holds {expected!r} "
                             f"(too big={too_big})")
    for _, body in got:
        decode_everything(body)
    decode_everything(stream)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
