"""The names cw.wire.frames, cw.wire.decoder and cw.wire.handshake had when
they were one module, kept while code that says ``protocol.X`` is moved to
them; new code imports those modules.
"""
from __future__ import annotations

from cw.wire import options as job_options
from cw.wire.decoder import FrameDecoder  # noqa: F401 - re-exported
from cw.wire.frames import (  # noqa: F401 - re-exported
    DEFAULT_MAX_FRAME,
    HEADER,
    HEADER_SIZE,
    LARGE_FRAME,
    LEND_FRAME,
    PING_FRAME,
    PONG_FRAME,
    PREAUTH_MAX_FRAME,
    RECLAIM_FRAME,
    VERSION,
    Frame,
    Status,
    decode_abort,
    decode_cancel,
    decode_cancelled,
    decode_context_for_worker,
    decode_job,
    decode_job_env,
    decode_json,
    decode_limit,
    decode_notice,
    decode_outcome,
    decode_output,
    decode_output_for_client,
    decode_result,
    decode_revoke,
    decode_revoked,
    decode_status,
    decode_status_request,
    decode_submit,
    decode_submit_with,
    encode_abort,
    encode_cancel,
    encode_cancelled,
    encode_context_for_worker,
    encode_error,
    encode_job,
    encode_job_env,
    encode_json,
    encode_notice,
    encode_outcome,
    encode_output,
    encode_output_for_client,
    encode_result,
    encode_revoke,
    encode_revoked,
    encode_status,
    encode_status_request,
    encode_submit,
    encode_submit_with,
    frame,
)
from cw.wire.handshake import (  # noqa: F401 - re-exported
    AUTH_FAILED,
    MAC_SIZE,
    NONCE_SIZE,
    peer_response,
    server_challenge,
    verify_proof,
    verify_response,
)

# Frame kinds and outcome status codes as module constants: protocol.JOB, protocol.OK, ...
globals().update(Frame.__members__)
globals().update(Status.__members__)
FRAME_NAMES = {kind.value: kind.name for kind in Frame}


check_options = job_options.check_submitted
