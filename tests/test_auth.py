"""Unit tests of cw.auth: where the secret file lives, how it is made, what is refused."""
from __future__ import annotations

import binascii
import os
import stat

import pytest

from cw.errors import SecretFileError
from cw.wire import auth


@pytest.fixture
def secret_file(tmp_path, monkeypatch):
    """CW_SECRET_FILE pointing at a file in a directory that does not exist yet."""
    path = tmp_path / "cwdir" / "secret"
    monkeypatch.setenv("CW_SECRET_FILE", str(path))
    return path


def write(path, data: bytes, mode=0o600):
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)


def mode_of(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_create_makes_private_dir_and_file_with_32_byte_secret(secret_file):
    """load_secret(create=True) makes the directory 0700 and the file 0600, holding the secret it returns."""
    secret = auth.load_secret(create=True)
    assert len(secret) >= 32
    assert mode_of(secret_file.parent) == 0o700
    assert mode_of(secret_file) == 0o600
    assert binascii.unhexlify(secret_file.read_bytes().strip()) == secret


def test_second_load_returns_same_secret(secret_file):
    """An existing secret is reused, with or without create."""
    first = auth.load_secret(create=True)
    assert auth.load_secret(create=True) == first
    assert auth.load_secret() == first


def test_missing_file_without_create_names_path_and_fix(secret_file):
    """Without create, a missing file raises SecretFileError naming the path and how to get one; nothing is made."""
    with pytest.raises(SecretFileError) as info:
        auth.load_secret()
    message = str(info.value)
    assert str(secret_file) in message
    assert "python -m cw.master" in message and "CW_SECRET_FILE" in message
    assert not secret_file.exists()


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_file_readable_by_others_is_refused(secret_file, mode):
    """A secret file with any group or other permission is refused with a 'chmod 600' hint."""
    write(secret_file, os.urandom(32).hex().encode(), mode)
    for create in (False, True):
        with pytest.raises(SecretFileError, match="chmod 600") as info:
            auth.load_secret(create=create)
        assert str(secret_file) in str(info.value)


@pytest.mark.parametrize("content", [b"", b"\n", b"abcd" * 7 + b"\n", b"short"],
                         ids=["empty", "newline", "14-byte-hex", "5-raw-bytes"])
def test_empty_or_too_short_secret_is_refused(secret_file, content):
    """A secret below MIN_SECRET_BYTES (16) is refused, whether hex or raw."""
    write(secret_file, content)
    with pytest.raises(SecretFileError, match="at least 16"):
        auth.load_secret()


def test_minimum_length_secret_is_accepted(secret_file):
    """Exactly MIN_SECRET_BYTES of secret (as hex) is enough."""
    write(secret_file, b"ab" * auth.MIN_SECRET_BYTES + b"\n")
    assert auth.load_secret() == b"\xab" * auth.MIN_SECRET_BYTES


def test_raw_non_hex_secret_is_accepted_as_is(secret_file):
    """A file of 32 raw bytes that are not hex text is used as the secret unchanged."""
    raw = bytes(range(0x80, 0xA0))
    write(secret_file, raw)
    assert auth.load_secret() == raw


def test_default_path_is_home_dot_cw_secret(tmp_path, monkeypatch):
    """With CW_SECRET_FILE unset the secret lives in ~/.cw/secret."""
    monkeypatch.delenv("CW_SECRET_FILE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    expected = tmp_path / ".cw" / "secret"
    assert auth.secret_path() == expected
    secret = auth.load_secret(create=True)
    assert expected.exists() and mode_of(expected) == 0o600
    assert auth.load_secret() == secret
