"""Big frames by reference between processes of one machine (cw/wire/segments.py).

Real processes: a master, workers, clients.  A segment shows in a process's
/proc/PID/fd and /proc/PID/maps as ``memfd:cw-segment``; after a peer is
killed mid-transfer no survivor may keep one (nor the 100 MB as RssShmem).
"""
from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import textwrap

import jobs
import numpy as np
import pytest
from conftest import wait_until

from cw.errors import CwError, ProtocolError
from cw.launch.local import READY_PREFIX, LocalCluster, read_line
from cw.wire import frames, segments
from cw.wire.decoder import FrameDecoder
from cw.wire.link import Link

MB = 1_000_000
BIG = 100 * MB
TESTS = os.path.dirname(os.path.abspath(__file__))

pytestmark = pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="memfd_create is Linux only")


def segment_refs(pid: int) -> int:
    """How many descriptors and mappings of cw segments process ``pid`` has."""
    count = 0
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                count += "cw-segment" in os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                pass
        with open(f"/proc/{pid}/maps") as f:
            count += sum("cw-segment" in line for line in f)
    except (FileNotFoundError, ProcessLookupError):
        return 0                      # gone: it keeps nothing
    return count


def shmem_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssShmem:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


def worker_pids(ex) -> list[int]:
    return [w["pid"] for w in ex.status()["workers"]]


def holds_nothing(pids) -> bool:
    held = {pid: (segment_refs(pid), shmem_kib(pid)) for pid in pids}
    print("held (segments, RssShmem KiB):", held)       # shown when the wait times out
    return all(refs == 0 and kib < 20_000 for refs, kib in held.values())


def started_pid(started_dir: str) -> int:
    names = wait_until(lambda: os.listdir(started_dir), 60, "the job to start")
    return int(names[0])


# --- the path is taken, the bytes arrive -------------------------------------------

def test_a_big_argument_and_result_go_by_reference_on_one_machine(cluster):
    data = os.urandom(BIG)
    with cluster.executor() as ex:
        before = ex.status()["master"]["by_reference"]
        back = ex.submit(jobs.identity, data).result(timeout=120)
        after = ex.status()["master"]["by_reference"]
        assert back == data
        # client -> master -> worker, and worker -> master -> client: four frames by reference.
        assert after["received"] - before["received"] == 2
        assert after["sent"] - before["sent"] == 2
        assert ex._link.sent_by_reference == 1 and ex._link.received_by_reference == 1


def test_a_job_that_changes_its_numpy_argument_leaves_the_clients_array_alone(cluster):
    def bump(x):
        x += 1                      # in place: the worker's mapping is private and writable
        return float(x[0]), float(x[-1])

    array = np.zeros(4 * MB)        # 32 MB
    with cluster.executor() as ex:
        assert ex.submit(bump, array).result(timeout=120) == (1.0, 1.0)
        assert ex._link.sent_by_reference == 1
    assert not array.any()


def test_a_worker_that_cannot_open_our_segments_gets_the_bytes(master, tmp_path):
    """A worker in a pid namespace of its own (as in a container) shares the
    kernel but cannot open the master's /proc/PID/fd: the probe at HELLO
    says so, and the master sends it the bytes."""
    if subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", "true"]).returncode:
        pytest.skip("unshare --pid does not work here (needs root)")
    worker = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", sys.executable,
                               "-m", "cw.worker", master.address, "-n", "1", "--log-level", "WARNING"],
                              stdin=subprocess.DEVNULL)
    try:
        master.wait_for_workers(1)
        data = os.urandom(BIG)
        with master.executor() as ex:
            assert ex.submit(jobs.identity, data).result(timeout=120) == data
            counts = ex.status()["master"]["by_reference"]
            # The client's argument came by reference; nothing went on by reference.
            assert counts == {"received": 1, "sent": 0}
            assert ex._link.received_by_reference == 0
    finally:
        worker.kill()                 # (--kill-child: the namespace's processes die with it)
        worker.wait(30)


def test_the_probe_refuses_a_peer_we_cannot_open():
    mine = segments.probe()
    assert segments.can_open(mine)
    assert not segments.can_open({**mine, "boot": "another machine"})
    assert not segments.can_open({**mine, "ino": mine["ino"] + 1})
    assert not segments.can_open(None)


def test_a_segment_maps_privately_with_its_fields_in_front():
    fd, offset, length = segments.write_segment(3, [b"ab" * 1000, b"cd"])
    try:
        ref = memoryview(segments.encode_ref(14, fd, offset, length, 7, b"xyz"))[5:]
        kind, body, token = segments.open_ref(ref)
        assert (kind, token, bytes(body)) == (14, 7, b"xyz" + b"ab" * 1000 + b"cd")
        body[3:5] = b"ZZ"                   # private: the next receiver still sees what was sent
        assert bytes(segments.open_ref(ref)[1][3:5]) == b"ab"
    finally:
        os.close(fd)


def test_only_sealed_cw_segments_are_opened():
    other = os.memfd_create("not-cw")
    unsealed = os.memfd_create("cw-segment")
    try:
        for fd in (other, unsealed):
            os.write(fd, b"x" * 8192)
            ref = memoryview(segments.encode_ref(14, fd, 4096, 10, 1, b""))[5:]
            with pytest.raises(ProtocolError):
                segments.open_ref(ref)
    finally:
        os.close(other)
        os.close(unsealed)


def test_a_sender_holds_a_bounded_amount_for_a_peer_that_does_not_release():
    """Beyond HELD_MAX unreleased bytes big frames take the socket again, whose
    backpressure then holds the sender back (tests/test_reliability.py: the master's side)."""
    a, b = socket.socketpair()
    link = Link(a, FrameDecoder(frames.DEFAULT_MAX_FRAME), "test peer")
    link.sharing = True
    try:
        big = frames.encode_submit(1, 0, 0.0, (b"p", b"\x01" * (10 * MB)))
        sent = [link._by_reference((big,))[0] for _ in range(20)]
        by_reference = [type(f) is bytes for f in sent]
        assert by_reference[0] and not by_reference[-1]
        assert link._held_bytes <= segments.HELD_MAX
    finally:
        link.close()
        b.close()
    assert link._held_bytes == 0


def test_many_waiting_big_jobs_do_not_use_up_the_masters_descriptors(tmp_path):
    """A master allowed 64 descriptors keeps at most 16 segments open; the
    other payloads of 80 queued jobs are mapped, closed, and sent as bytes."""
    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    proc = subprocess.Popen([sys.executable, "-m", "cw.master", "--port", "0", "--log-level", "WARNING"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True, preexec_fn=low_limit)
    cluster = None
    try:
        line = read_line(proc, 60)
        host, _, port = line[len(READY_PREFIX):].strip().rpartition(":")
        cluster = LocalCluster(proc, host, int(port))
        arg = os.urandom(MB + MB // 10)
        with cluster.executor() as ex:
            futures = [ex.submit(len, arg) for _ in range(80)]      # no worker yet: they all wait
            wait_until(lambda: ex.status()["master"]["by_reference"]["received"] == 80, 60,
                       "the master to receive the 80 jobs")
            cluster.add_workers(2)
            assert [f.result(timeout=120) for f in futures] == [len(arg)] * 80
            assert 0 < ex.status()["master"]["by_reference"]["sent"] <= 16 + 2
    finally:
        if cluster is not None:
            cluster.stop()
        else:
            proc.kill()
            proc.wait(30)


# --- a peer killed mid-transfer leaves nothing behind ------------------------------

CLIENT = textwrap.dedent("""
    import sys
    import jobs
    from cw.client.executor import ClusterExecutor
    host, port, started, release = sys.argv[1:]
    ex = ClusterExecutor(host, int(port))
    future = ex.submit(jobs.block, started, release, b"\\x01" * 100_000_000)
    print("submitted", flush=True)
    sys.stdin.read()
""")


def test_a_client_killed_mid_transfer_leaves_no_segment(cluster, tmp_path):
    started, release = tmp_path / "started", str(tmp_path / "release")
    started.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])}
    client = subprocess.Popen([sys.executable, "-c", CLIENT, cluster.host, str(cluster.port), str(started),
                               release], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    try:
        worker = started_pid(str(started))
        assert segment_refs(worker) > 0      # the argument is mapped, not copied
        os.kill(client.pid, signal.SIGKILL)
        client.wait(30)
        open(release, "w").close()           # the job returns its 100 MB, which nobody wants now
        with cluster.executor() as ex:
            survivors = [cluster.master.pid, *worker_pids(ex)]
            wait_until(lambda: holds_nothing(survivors), 60, "the survivors to let go of every segment")
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(30)


def test_a_worker_killed_mid_transfer_leaves_no_segment(cluster, tmp_path):
    started, release = tmp_path / "started", str(tmp_path / "release")
    started.mkdir()
    with cluster.executor(max_retries=0) as ex:
        future = ex.submit(jobs.block, str(started), release, b"\x01" * BIG)
        worker = started_pid(str(started))
        assert segment_refs(worker) > 0
        os.kill(worker, signal.SIGKILL)
        with pytest.raises(CwError):
            future.result(timeout=60)        # lost with its worker (no retries)
        open(release, "w").close()
        survivors = [cluster.master.pid, os.getpid(), *(p for p in worker_pids(ex) if p != worker)]
        wait_until(lambda: holds_nothing(survivors), 60, "the survivors to let go of every segment")


def test_a_master_killed_mid_transfer_leaves_no_segment(cluster, tmp_path):
    started, release = tmp_path / "started", str(tmp_path / "release")
    started.mkdir()
    ex = cluster.executor()
    try:
        workers = worker_pids(ex)
        ex.submit(jobs.block, str(started), release, b"\x01" * BIG)
        worker = started_pid(str(started))
        assert segment_refs(worker) > 0
        os.kill(cluster.master.pid, signal.SIGKILL)
        open(release, "w").close()           # the job ends; its result has nowhere to go
        # (The client waits for the master to come back, keeping its job to submit again;
        # the workers try to reconnect: all of them live on, and must let go of the segments.)
        wait_until(lambda: holds_nothing([os.getpid(), *workers]), 60,
                   "the client and the workers to let go of every segment")
    finally:
        ex.shutdown(wait=False)   # (cancel_futures=True fails while the client has no link: noted)
