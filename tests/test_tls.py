"""TLS (issue 17): tls:// addresses, the cluster's own certificates, mutual
TLS on both event loops, clear errors when one side speaks TLS and the
other not, and certificates that must be refused.

The secret file of the test session lives in a temporary directory
(conftest), so the cluster's tls/ directory made here lies beside it and
never in the real ~/.cw."""
from __future__ import annotations

import datetime
import json
import os
import stat
import sys
from pathlib import Path

import pytest

pytest.importorskip("cryptography")

from cw.client.discovery import resolve_master  # noqa: E402
from cw.client.executor import ClusterExecutor  # noqa: E402
from cw.errors import TlsError  # noqa: E402
from cw.launch.local import start_master  # noqa: E402
from cw.wire import tls  # noqa: E402
from cw.wire.address import parse_address, read_address_file, write_address_file  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import jobs  # noqa: E402
import sched_jobs  # noqa: E402
from conftest import wait_until  # noqa: E402


@pytest.fixture(params=["asyncio", "uvloop"])
def tls_master(request, tmp_path):
    """A master started with --tls on each event loop; ``.log()`` reads its stderr."""
    log = open(tmp_path / "master.log", "w+")
    cluster = start_master(port=0, args=["--tls", "--loop", request.param, "--log-level", "INFO"], stderr=log)
    cluster.log = lambda: (tmp_path / "master.log").read_text()
    yield cluster
    cluster.stop()
    log.close()


@pytest.fixture
def plain_master(tmp_path):
    log = open(tmp_path / "plain.log", "w+")
    cluster = start_master(port=0, args=["--log-level", "INFO"], stderr=log)
    cluster.log = lambda: (tmp_path / "plain.log").read_text()
    yield cluster
    cluster.stop()
    log.close()


# --- addresses ------------------------------------------------------------------------

def test_tls_addresses_keep_their_scheme(tmp_path, monkeypatch):
    assert parse_address("tls://node7:4100", 5494) == ("node7", 4100)
    assert parse_address("tls://node7:4100", 5494).tls
    assert parse_address("tls://[::1]:4100", 5494) == ("::1", 4100)
    assert not parse_address("node7:4100", 5494).tls
    assert str(parse_address("tls://node7", 5494)) == "tls://node7:5494"
    monkeypatch.setenv("CW_MASTER", "tls://env-host:3000")
    assert resolve_master(None, 5494).tls
    path = tmp_path / "master"
    write_address_file(path, "node3", 4100, tls=True)
    assert read_address_file(path).tls
    found = resolve_master(f"file:{path}", 5494, timeout=0.2)
    assert found == ("node3", 4100) and found.tls
    write_address_file(path, "node3", 4100)
    assert not resolve_master(f"file:{path}", 5494, timeout=0.2).tls


# --- certificates without ceremony ------------------------------------------------------

def test_the_master_makes_the_cluster_certificates_private_and_runs_jobs(tls_master):
    directory = tls.tls_dir()
    assert directory.parent == Path(os.environ["CW_SECRET_FILE"]).parent   # beside the secret, never ~/.cw
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for name in (tls.KEY, tls.CA_KEY):
        assert stat.S_IMODE((directory / name).stat().st_mode) == 0o600
    assert tls_master.address.startswith("tls://")
    tls_master.add_workers(2)
    tls_master.wait_for_workers(2)
    with tls_master.executor() as ex:
        assert list(ex.map(jobs.square, range(20))) == [x * x for x in range(20)]
        big = b"x" * (3 << 20)       # a frame big enough for the direct-buffer and by-reference paths
        assert ex.submit(jobs.identity, big).result(timeout=60) == big
        assert ex.status()["master"]["tls"] is True
        assert ex.submit(sched_jobs.chain, 2).result(timeout=60) == 2    # jobs of jobs reach the master by TLS too
    import subprocess
    proc = subprocess.run([sys.executable, "-m", "cw.status", tls_master.address, "--json", "--timeout", "30"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["workers"]) == 2


def test_a_tls_cluster_on_slurm_publishes_its_scheme():
    from cw.launch.slurm import Options, render_master_script
    assert "--tls" in render_master_script(Options(name="x", tls=True)).split()
    assert "--tls" not in render_master_script(Options(name="x")).split()


def test_creating_the_certificates_twice_keeps_the_first(tmp_path):
    tls.create_cluster_files(tmp_path / "tls")
    first = (tmp_path / "tls" / tls.CA_CERT).read_bytes()
    tls.create_cluster_files(tmp_path / "tls")
    assert (tmp_path / "tls" / tls.CA_CERT).read_bytes() == first
    assert [p.name for p in tmp_path.iterdir()] == ["tls"]      # no temporary directory left behind


# --- one side TLS, the other not: a clear error on both sides, at once --------------------

def test_a_plain_client_of_a_tls_master_is_told_at_once(tls_master):
    with pytest.raises(TlsError, match="speaks TLS only"):
        ClusterExecutor(f"{tls_master.host}:{tls_master.port}", connect_timeout=30)
    wait_until(lambda: "the TLS handshake failed" in tls_master.log(), what="the master's log line")


def test_a_tls_client_of_a_plain_master_is_told_at_once(plain_master):
    with pytest.raises(TlsError, match="speaks plain TCP, not TLS"):
        ClusterExecutor(f"tls://{plain_master.host}:{plain_master.port}", connect_timeout=30)
    wait_until(lambda: "this master speaks plain TCP" in plain_master.log(), what="the master's log line")


# --- certificates that must be refused ----------------------------------------------------

def _write_pair(directory: Path, key, cert) -> tuple[str, str]:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "key.pem").write_bytes(tls.key_pem(key))
    (directory / "cert.pem").write_bytes(tls.cert_pem(cert))
    return str(directory / "cert.pem"), str(directory / "key.pem")


def _cluster_ca():
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    directory = tls.tls_dir()
    ca_cert = x509.load_pem_x509_certificate((directory / tls.CA_CERT).read_bytes())
    ca_key = serialization.load_pem_private_key((directory / tls.CA_KEY).read_bytes(), None)
    return ca_key, ca_cert


def test_a_certificate_of_another_ca_is_refused(tls_master, tmp_path):
    other_key, other_ca = tls.make_ca("another cluster")
    cert, key = _write_pair(tmp_path / "other", *tls.issue(other_key, other_ca, "intruder"))
    with pytest.raises(TlsError, match="TLS"):
        ClusterExecutor(tls_master.address, connect_timeout=30, tls_cert=cert, tls_key=key)
    wait_until(lambda: "the TLS handshake failed" in tls_master.log(), what="the master's log line")
    # The other way round: our master's certificate is not signed by the CA this client trusts.
    (tmp_path / "other" / "ca.pem").write_bytes(tls.cert_pem(other_ca))
    with pytest.raises(TlsError, match="not signed by this side's cluster CA"):
        ClusterExecutor(tls_master.address, connect_timeout=30, tls_ca=str(tmp_path / "other" / "ca.pem"))


def test_an_expired_certificate_is_refused(tls_master, tmp_path):
    ca_key, ca_cert = _cluster_ca()
    now = datetime.datetime.now(datetime.timezone.utc)
    old = tls.issue(ca_key, ca_cert, "expired", not_before=now - datetime.timedelta(days=30),
                    not_after=now - datetime.timedelta(days=1))
    cert, key = _write_pair(tmp_path / "expired", *old)
    with pytest.raises(TlsError, match="TLS"):
        ClusterExecutor(tls_master.address, connect_timeout=30, tls_cert=cert, tls_key=key)
    wait_until(lambda: "expired" in tls_master.log(), what="the master's log line naming the expiry")


def test_the_right_secret_without_a_certificate_is_refused(tls_master):
    import ssl

    from cw.wire.auth import load_secret
    from cw.wire.link import open_link, peer_info
    no_cert = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    no_cert.check_hostname = False
    no_cert.load_verify_locations(str(tls.tls_dir() / tls.CA_CERT))
    with pytest.raises(TlsError, match="certificate"):
        open_link(tls_master.host, tls_master.port, load_secret(), peer_info("client"), 30, no_cert)
    wait_until(lambda: "the TLS handshake failed" in tls_master.log(), what="the master's log line")


def test_a_sites_own_files_are_taken(tls_master, tmp_path):
    ca_key, ca_cert = _cluster_ca()
    cert, key = _write_pair(tmp_path / "site", *tls.issue(ca_key, ca_cert, "site client"))
    with ClusterExecutor(tls_master.address, connect_timeout=30, tls_cert=cert, tls_key=key) as ex:
        assert ex.status()["master"]["tls"] is True


def test_missing_files_say_where_they_were_looked_for(tls_master, tmp_path):
    with pytest.raises(TlsError, match="missing"):
        ClusterExecutor(tls_master.address, connect_timeout=5, tls_cert=str(tmp_path / "nope.pem"))
    # A worker stops at once (exit 2: its configuration is wrong) rather than
    # retrying until --connect-timeout as if the master were not there yet.
    import subprocess
    stopped = subprocess.run([sys.executable, "-m", "cw.worker", tls_master.address, "-n", "1", "--tls-cert",
                              str(tmp_path / "nope.pem"), "--connect-timeout", "600"],
                             stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 2, stopped.stderr
    assert "nope.pem is missing" in stopped.stderr


def test_a_worker_takes_a_sites_files_and_hands_them_to_its_processes(tls_master, tmp_path):
    import subprocess
    ca_key, ca_cert = _cluster_ca()
    cert, key = _write_pair(tmp_path / "worker", *tls.issue(ca_key, ca_cert, "site worker"))
    proc = subprocess.Popen([sys.executable, "-m", "cw.worker", tls_master.address, "-n", "1", "--tls-cert", cert,
                             "--tls-key", key, "--connect-timeout", "60", "--log-level", "WARNING"],
                            stdin=subprocess.DEVNULL)
    tls_master.workers.append(proc)
    tls_master.wait_for_workers(1)
    with tls_master.executor() as ex:
        assert ex.submit(jobs.square, 7).result(timeout=60) == 49
    # The flags do reach the worker processes: a CA the master's certificate is not signed by stops them.
    _, other_ca = tls.make_ca("another cluster")
    (tmp_path / "other-ca.pem").write_bytes(tls.cert_pem(other_ca))
    refused = subprocess.run([sys.executable, "-m", "cw.worker", tls_master.address, "-n", "1", "--tls-ca",
                              str(tmp_path / "other-ca.pem"), "--connect-timeout", "30"],
                             stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2, refused.stderr
    assert "not signed by this side's cluster CA" in refused.stderr
