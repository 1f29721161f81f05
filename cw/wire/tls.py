"""TLS for masters and peers that talk across networks nobody trusts (issue 17).

A master started with ``--tls`` speaks only TLS 1.3, and only with peers
that present a certificate signed by the cluster's CA; it presents one
itself, which the peers verify against the same CA (mutual TLS).  The HMAC
handshake of cw.wire.handshake still runs inside TLS: the certificates
keep strangers off the path, the secret still says who may run code.

Certificates without ceremony: on first use the master creates a private
cluster CA and one certificate for the whole cluster, beside the secret
file (``~/.cw/tls/`` by default; the directory of ``$CW_SECRET_FILE``
otherwise), with the care the secret gets: the directory is 0700, the keys
0600, and the whole directory appears at once (written under a temporary
name, then renamed), so two masters starting together cannot mix halves
and a reader never sees half a directory.  Workers and clients sharing the
home directory find the files there.  A site's own files are named with
``--tls-cert/--tls-key/--tls-ca`` (or ``$CW_TLS_CERT``, ``$CW_TLS_KEY``,
``$CW_TLS_CA``; keyword arguments of ClusterExecutor and ClientThread).

Host names are not checked: the CA is the cluster's own, anyone holding a
certificate it signed is a member, and members connect by whatever name or
address the cluster's nodes use (a SLURM node name, an IP address).

Who speaks first: in cw the master does (its CHALLENGE); in TLS the client
does.  So that a plain peer and a TLS master never wait for each other, a
TLS master first sends one plain ERROR frame, ``BANNER`` (a plain peer shows
it and hangs up at once), then starts TLS.  A TLS peer reads that frame and
starts TLS; finding a CHALLENGE instead, it knows the master is plain and
says so, to the master too.

Creating certificates needs the ``cryptography`` package (``pip install
"cluster-workers[tls]"``); using them needs only the standard library.
"""
from __future__ import annotations

import datetime
import os
import shutil
import socket
import ssl
from pathlib import Path
from typing import NamedTuple

from cw.errors import CwError, HandshakeFailed, TlsError
from cw.wire import frames
from cw.wire.auth import secret_path
from cw.wire.frames import HEADER, Frame
from cw.wire.tlsstream import TlsStream

#: The TLS master's first words, in a plain ERROR frame; a TLS peer looks for this start.
BANNER_START = "this cw master speaks TLS only"
BANNER = frames.encode_error(f"{BANNER_START}: connect to it as tls://HOST:PORT (a client or worker needs the "
                             "cluster's certificates; see the TLS page of the docs)")
ENV_CERT, ENV_KEY, ENV_CA = "CW_TLS_CERT", "CW_TLS_KEY", "CW_TLS_CA"
CA_CERT, CA_KEY, CERT, KEY = "ca.pem", "ca.key", "cert.pem", "key.pem"
#: Years the generated CA and certificate are valid.
VALID_YEARS = 10


class TlsFiles(NamedTuple):
    """A certificate, its key and the CA that signs every peer's (paths; None: the default)."""
    cert: str | None = None
    key: str | None = None
    ca: str | None = None


def tls_dir() -> Path:
    """Where the cluster's own certificates live: ``tls/`` beside the secret file."""
    return secret_path().parent / "tls"


def resolve_files(given: TlsFiles | None = None) -> TlsFiles:
    """The files to use: those given, else $CW_TLS_*, else the cluster's own in tls_dir()."""
    given = given or TlsFiles()
    default = tls_dir()
    return TlsFiles(given.cert or os.environ.get(ENV_CERT) or str(default / CERT),
                    given.key or os.environ.get(ENV_KEY) or str(default / KEY),
                    given.ca or os.environ.get(ENV_CA) or str(default / CA_CERT))


def _need_min_tls13(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def _load(context: ssl.SSLContext, files: TlsFiles, side: str) -> ssl.SSLContext:
    for what, path in (("certificate", files.cert), ("key", files.key), ("CA certificate", files.ca)):
        if not os.path.exists(path):     # TlsError: a worker stops (exit 2) rather than retry
            raise TlsError(
                f"the TLS {what} {path} is missing ({side}): start `cw master --tls` once where this home "
                f"directory is shared (it creates the cluster's certificates in {tls_dir()}), copy that "
                f"directory here, or name your own files with --tls-cert/--tls-key/--tls-ca "
                f"(${ENV_CERT}, ${ENV_KEY}, ${ENV_CA})")
    try:
        context.load_cert_chain(files.cert, files.key)
        context.load_verify_locations(files.ca)
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(f"cannot load the TLS files {files.cert}, {files.key}, {files.ca} ({side}): {exc}; check "
                      "that the key belongs to the certificate and that the files are PEM") from None
    return context


def server_context(files: TlsFiles | None = None) -> ssl.SSLContext:
    """The master's context: TLS 1.3, its certificate, peers' certificates required and verified."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # No session tickets: TLS 1.3 sends them after the handshake, for a
    # resumption cw never uses (peers keep their connections), so each
    # direction carries only application data once the handshake is over.
    context.num_tickets = 0
    return _load(_need_min_tls13(context), resolve_files(files), "master")


def client_context(files: TlsFiles | None = None) -> ssl.SSLContext:
    """A worker's or client's context: TLS 1.3, its certificate, the master's verified (not its name)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False   # the cluster's private CA is the check (see the module's docstring)
    return _load(_need_min_tls13(context), resolve_files(files), "client or worker")


def context_for(address, files: TlsFiles | None = None) -> ssl.SSLContext | None:
    """The client context to reach ``address`` (a MasterAddress) with: None for a plain master."""
    return client_context(files) if getattr(address, "tls", False) else None


def looks_like_tls(data: bytes) -> bool:
    """Whether these first bytes from a peer open a TLS handshake (a record of type 22, version 3.x)."""
    return len(data) >= 2 and data[0] == 0x16 and data[1] == 0x03


def describe_error(exc: ssl.SSLError | OSError, other: str = "master") -> str:
    """An SSL failure in words that say what to check; ``other`` names the other side ("master" or "peer")."""
    reason = getattr(exc, "reason", None) or ""
    verify = getattr(exc, "verify_message", None) or ""
    same_dir = "give both sides the same tls/ directory (the one beside the master's secret file)"
    if "expired" in verify:
        advice = (f"the {other}'s certificate has expired: make new ones (remove the tls/ directory beside the "
                  "secret file, restart the master, copy the new directory to the other machines)")
    elif verify:
        advice = f"the {other}'s certificate is not signed by this side's cluster CA: {same_dir}"
    else:
        advice = {
            "TLSV13_ALERT_CERTIFICATE_REQUIRED": f"the {other} wants a certificate from this side and got none",
            "SSLV3_ALERT_CERTIFICATE_EXPIRED": f"the {other} says this side's certificate has expired",
            "TLSV1_ALERT_UNKNOWN_CA": f"the {other} does not trust this side's certificate (another CA): {same_dir}",
            "SSLV3_ALERT_BAD_CERTIFICATE": f"the {other} refused this side's certificate",
            "PEER_DID_NOT_RETURN_A_CERTIFICATE": f"the {other} presented no certificate: it needs the cluster's "
                                                 "tls/ directory, or --tls-cert and --tls-key",
            "WRONG_VERSION_NUMBER": f"the {other} does not speak TLS",
            "TLSV1_ALERT_PROTOCOL_VERSION": f"the {other} does not speak TLS 1.3",
            "DECRYPTION_FAILED_OR_BAD_RECORD_MAC": "a record was changed on the way (an attacker on the path?)",
        }.get(reason)
    text = verify or reason or str(exc)
    return f"{text}: {advice}" if advice else text


def start_client(sock: socket.socket, context: ssl.SSLContext, address: str) -> TlsStream:
    """Reads a TLS master's plain BANNER from ``sock`` and starts TLS on it
    (a TlsStream: see there why not an ssl.SSLSocket).
    Raises HandshakeFailed, with what to do, when the master is plain or TLS fails."""
    header = _read_exactly(sock, HEADER.size, address)
    length, kind = HEADER.unpack(header)
    if kind == Frame.CHALLENGE:
        # A plain master: say why we leave, so that its log says it too.
        _say_and_close(sock, f"this peer connects with TLS (tls://{address}) but this master speaks plain TCP")
        raise TlsError(f"the master at {address} speaks plain TCP, not TLS: connect to {address} without "
                              "tls://, or restart the master with --tls")
    body = _read_exactly(sock, length, address) if kind == Frame.ERROR and length <= 4096 else b""
    if kind != Frame.ERROR or not body.decode("utf-8", "replace").startswith(BANNER_START):
        raise HandshakeFailed(f"the server at {address} did not open like a cw master (frame type {kind}); "
                              "is that port a cw master?")
    stream = TlsStream(sock, context)
    try:
        stream.handshake()
        return stream
    except ssl.SSLError as exc:
        raise TlsError(f"TLS with the master at {address} failed: {describe_error(exc)}") from None
    except OSError as exc:       # reset or cut: worth another try
        raise HandshakeFailed(f"TLS with the master at {address} broke off: {exc.strerror or exc}") from None


def _read_exactly(sock: socket.socket, n: int, address: str) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise HandshakeFailed(f"the master at {address} closed the connection before the handshake")
        data += chunk
    return bytes(data)


def _say_and_close(sock: socket.socket, text: str) -> None:
    try:
        sock.sendall(frames.encode_error(text))
    except OSError:
        pass


# --- the cluster's own certificates --------------------------------------------------

def ensure_cluster_files() -> TlsFiles:
    """The cluster's CA and certificate in tls_dir(), created on first use (the master's)."""
    directory = tls_dir()
    if not (directory / CERT).exists():
        create_cluster_files(directory)
    return TlsFiles(str(directory / CERT), str(directory / KEY), str(directory / CA_CERT))


def create_cluster_files(directory: Path) -> None:
    """Writes a new CA and a certificate it signs into ``directory``, at once
    (a temporary directory renamed): an existing one is left as it is."""
    directory.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.mkdir(tmp, 0o700)
    try:
        ca_key, ca_cert = make_ca()
        key, cert = issue(ca_key, ca_cert, "cw cluster member")
        for name, data in ((CA_KEY, key_pem(ca_key)), (CA_CERT, cert_pem(ca_cert)),
                           (KEY, key_pem(key)), (CERT, cert_pem(cert))):
            _write_private(tmp / name, data)
        try:
            os.rename(tmp, directory)
        except OSError:
            if not (directory / CERT).exists():   # not another master that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _crypto():
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        raise CwError('making the cluster\'s TLS certificates needs the cryptography package: pip install '
                      '"cluster-workers[tls]", or name your own files with --tls-cert/--tls-key/--tls-ca') from None
    return x509, hashes, serialization, ec, NameOID


def _name(common_name: str):
    x509, _, _, _, NameOID = _crypto()
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(common_name: str = "cw cluster CA"):
    """A new CA: (key, certificate)."""
    x509, hashes, _, ec, _ = _crypto()
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(_name(common_name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=365 * VALID_YEARS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def issue(ca_key, ca_cert, common_name: str, not_before=None, not_after=None):
    """A key and a certificate signed by the CA, good as server and as client."""
    x509, hashes, _, ec, _ = _crypto()
    from cryptography.x509.oid import ExtendedKeyUsageOID
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - datetime.timedelta(hours=1))
            .not_valid_after(not_after or now + datetime.timedelta(days=365 * VALID_YEARS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def key_pem(key) -> bytes:
    _, _, serialization, _, _ = _crypto()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_pem(cert) -> bytes:
    _, _, serialization, _, _ = _crypto()
    return cert.public_bytes(serialization.Encoding.PEM)
