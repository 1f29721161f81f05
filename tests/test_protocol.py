"""cw.wire.protocol, the old names of cw.wire.frames and cw.wire.handshake,
kept while other code still says ``protocol.X``.  Delete with the module."""
from __future__ import annotations

import pytest

from cw.wire import decoder, frames, handshake, protocol
from cw.wire import options as job_options
from cw.wire.frames import Frame, Status

#: Every public name the module had before it was split, and where it lives now.
OLD_NAMES = {
    frames: ["VERSION", "HEADER", "HEADER_SIZE", "DEFAULT_MAX_FRAME", "PREAUTH_MAX_FRAME", "LARGE_FRAME",
             "frame", "PING_FRAME", "PONG_FRAME", "LEND_FRAME", "RECLAIM_FRAME",
             "encode_json", "encode_submit", "encode_submit_with", "encode_job_env", "encode_notice",
             "encode_output", "encode_output_for_client", "encode_cancel", "encode_job", "encode_outcome",
             "encode_result", "encode_abort", "encode_revoke", "encode_revoked", "encode_cancelled",
             "encode_context_for_worker", "encode_status_request", "encode_status", "encode_error",
             "decode_json", "decode_submit", "decode_submit_with", "decode_limit", "decode_job_env", "decode_notice",
             "decode_cancel",
             "decode_job", "decode_abort", "decode_revoke", "decode_revoked", "decode_outcome", "decode_result",
             "decode_cancelled", "decode_context_for_worker", "decode_status_request", "decode_status",
             "decode_output", "decode_output_for_client"],
    decoder: ["FrameDecoder"],
    handshake: ["NONCE_SIZE", "MAC_SIZE", "AUTH_FAILED", "server_challenge", "peer_response", "verify_response",
                "verify_proof"],
}


@pytest.mark.parametrize("module, name", [(m, n) for m, names in OLD_NAMES.items() for n in names],
                         ids=lambda x: x if isinstance(x, str) else x.__name__.rpartition(".")[2])
def test_old_name_is_the_new_object(module, name):
    assert getattr(protocol, name) is getattr(module, name)


def test_frame_kinds_and_status_codes_keep_their_old_names():
    for kind in Frame:
        assert getattr(protocol, kind.name) is kind
    for status in Status:
        assert getattr(protocol, status.name) is status
    assert protocol.FRAME_NAMES == {kind.value: kind.name for kind in Frame}
    assert protocol.FRAME_NAMES[14] == "JOB"


def test_check_options_is_the_options_modules_check():
    assert protocol.check_options is job_options.check_submitted
    assert protocol.decode_submit_with is frames.decode_submit_with
