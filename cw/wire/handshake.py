"""The handshake that opens every connection: pure functions, no I/O.

Master and peer (a client or a worker) prove to each other that they hold
the same secret, without sending it, before anything else is said::

    master -> peer   CHALLENGE  version, master nonce
    peer -> master   RESPONSE   peer nonce, HMAC(secret, "cw-peer" | master nonce | peer nonce)
    master -> peer   PROOF      HMAC(secret, "cw-master" | peer nonce | master nonce)

The master sends CHALLENGE (``server_challenge``) as soon as a peer connects.
The peer answers it (``peer_response``), which also checks that both speak
the same protocol version.  The master checks the peer's MAC
(``verify_response``) and sends its own; the peer checks that one
(``verify_proof``), so a peer never talks to an impostor either.  Then the
peer says HELLO.

Fresh nonces on both sides make a recorded exchange useless to replay, and
the distinct labels stop a reflected MAC from passing for the other side's.
A master that refuses a peer sends ERROR instead of PROOF; its text starts
with ``AUTH_FAILED`` when, and only when, the secrets differ, which retrying
cannot fix.
"""
from __future__ import annotations

import hashlib
import hmac
import os

from cw.errors import AuthenticationError, ProtocolError
from cw.wire.frames import VERSION, Frame, frame

NONCE_SIZE = 32
MAC_SIZE = 32
#: How the master's ERROR frame starts when the peer's secret is wrong (and
#: only then): a peer must tell that, which retrying cannot fix, from a
#: handshake cut short for another reason.
AUTH_FAILED = "authentication failed"
_PEER_LABEL = b"cw-peer"
_SERVER_LABEL = b"cw-master"


def _mac(secret: bytes, label: bytes, first: bytes, second: bytes) -> bytes:
    return hmac.new(secret, label + first + second, hashlib.sha256).digest()


def server_challenge() -> tuple[bytes, bytes]:
    """Returns (master nonce, CHALLENGE frame)."""
    nonce = os.urandom(NONCE_SIZE)
    return nonce, frame(Frame.CHALLENGE, bytes([VERSION]) + nonce)


def peer_response(secret: bytes, kind: int, body: bytes) -> tuple[bytes, bytes]:
    """Answers a CHALLENGE frame; returns (peer nonce, RESPONSE frame)."""
    if kind == Frame.ERROR:
        raise AuthenticationError(f"the master refused the connection: {bytes(body).decode('utf-8', 'replace')}")
    if kind != Frame.CHALLENGE or len(body) != 1 + NONCE_SIZE:
        raise ProtocolError("the server did not start with a cw challenge; is it a cw master?")
    if body[0] != VERSION:
        raise ProtocolError(f"the master speaks cw protocol version {body[0]}, this side speaks {VERSION}; "
                            "install the same cw version on every machine")
    server_nonce = bytes(body[1:])
    nonce = os.urandom(NONCE_SIZE)
    return nonce, frame(Frame.RESPONSE, nonce + _mac(secret, _PEER_LABEL, server_nonce, nonce))


def verify_response(secret: bytes, server_nonce: bytes, kind: int, body: bytes) -> bytes:
    """Checks a peer's RESPONSE; returns the PROOF frame to send back."""
    if kind != Frame.RESPONSE or len(body) != NONCE_SIZE + MAC_SIZE:
        raise ProtocolError(f"expected a handshake response, got frame type {kind} of {len(body)} bytes")
    peer_nonce, mac = bytes(body[:NONCE_SIZE]), bytes(body[NONCE_SIZE:])
    if not hmac.compare_digest(mac, _mac(secret, _PEER_LABEL, server_nonce, peer_nonce)):
        raise AuthenticationError("the peer's handshake does not match our secret")
    return frame(Frame.PROOF, _mac(secret, _SERVER_LABEL, peer_nonce, server_nonce))


def verify_proof(secret: bytes, challenge_body: bytes, peer_nonce: bytes, kind: int, body: bytes) -> None:
    """Checks the master's PROOF, so a peer never talks to an impostor."""
    if kind == Frame.ERROR:
        text = bytes(body).decode("utf-8", "replace")
        if text.startswith(AUTH_FAILED):
            raise AuthenticationError(
                f"the master refused our handshake ({text}); this machine's secret file differs from "
                "the master's: copy the master's secret file here")
        raise ProtocolError(f"the master ended the handshake: {text}")  # e.g. its handshake timeout
    if kind != Frame.PROOF or len(body) != MAC_SIZE:
        raise ProtocolError(f"expected the master's handshake proof, got frame type {kind}")
    server_nonce = bytes(challenge_body[1:])
    if not hmac.compare_digest(bytes(body), _mac(secret, _SERVER_LABEL, peer_nonce, server_nonce)):
        raise AuthenticationError("the master's handshake proof does not match our secret: it is not our master, "
                                  "or it uses another secret file")
