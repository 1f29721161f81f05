"""The shared secret every cw peer proves it knows.

The secret lives in a file (``$CW_SECRET_FILE``, else ``~/.cw/secret``) that
only its owner can read.  It never travels on a command line or in the
environment: ``ps`` shows both to every user of the machine.
"""
from __future__ import annotations

import binascii
import os
import stat
from pathlib import Path

from cw.errors import SecretFileError

SECRET_BYTES = 32
MIN_SECRET_BYTES = 16
ENV_VAR = "CW_SECRET_FILE"


def secret_path() -> Path:
    override = os.environ.get(ENV_VAR)
    return Path(override).expanduser() if override else Path.home() / ".cw" / "secret"


def load_secret(create: bool = False) -> bytes:
    """Reads the secret; with ``create`` (the master), makes a new one if there is none."""
    path = secret_path()
    if create and not path.exists():
        _create(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise SecretFileError(
            f"no cw secret file at {path}: start `python -m cw.master` once on this machine (it creates "
            f"one), or copy the master's secret file here with mode 0600, or point ${ENV_VAR} at it") from None
    except OSError as exc:
        raise SecretFileError(f"cannot open the cw secret file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SecretFileError(
                f"the cw secret file {path} is readable by other users (mode {stat.S_IMODE(mode):04o}); "
                f"anyone who can read it can run code on your workers: run `chmod 600 {path}`")
        raw = f.read(4096)
    secret = _decode(raw.strip())
    if len(secret) < MIN_SECRET_BYTES:
        raise SecretFileError(
            f"the cw secret file {path} holds {len(secret)} bytes; at least {MIN_SECRET_BYTES} are needed: "
            f"delete it and let the master create a new one, or write {SECRET_BYTES} random bytes into it")
    return secret


def _decode(text: bytes) -> bytes:
    # The master writes hex, so the file can be copied around as text; a file
    # of raw bytes written by hand is accepted as it is.
    try:
        return binascii.unhexlify(text)
    except (binascii.Error, ValueError):
        return text


def _create(path: Path) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        # O_EXCL with mode 0600: the file is never readable by others, not even
        # for an instant, and two masters starting at once cannot both write it.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "wb") as f:
        f.write(binascii.hexlify(os.urandom(SECRET_BYTES)) + b"\n")
