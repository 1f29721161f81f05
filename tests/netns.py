"""Several hosts on one machine, for multi-host tests: network namespaces on a
private bridge, each with its own hostname, that a test can cut off and heal.

::

    switch namespace (cwt<pid>-<n>-sw)        host namespaces (cwt<pid>-<n>-<name>)
    +-------------------------------+          +------------------------------+
    | bridge br0                    |          | eth0 198.18.0.x/24, lo       |
    |   port p-<name> ===== veth ========== eth0 | own hostname (UTS namespace) |
    +-------------------------------+          +------------------------------+

The bridge lives in a namespace of its own, not in the machine's: the
machine's routing table never learns 198.18.0.0/24, so no packet of a test
can leave these namespaces, and two test runs at once cannot collide (every
name carries the test process's pid).  A cut sets the host's bridge port to
"disabled", so the switch drops the host's frames both ways while its link
stays up and its processes keep running, as when a switch or cable fails
further away.  (Taking the link down instead would also flush the host's
neighbour table; a port that stops forwarding is the plainer partition.)

Use the ``network`` fixture: it skips the test where namespaces cannot be made
(not root, no ``ip``), unless ``$CW_REQUIRE_NETNS=1`` (CI) makes that a failure,
and removes every namespace, and every process started in one, at teardown.
Should the test process die before its teardown, its processes die with it
(parent-death signal) and the next run removes its namespaces.
"""
from __future__ import annotations

import ipaddress
import itertools
import os
import queue
import re
import shutil
import signal
import subprocess
import threading
import time

import pytest
from conftest import skip_unless_required

#: The only addresses these tests use (RFC 2544's benchmarking range).
SUBNET = ipaddress.ip_network("198.18.0.0/24")
#: Seconds an ``ip`` command may take before the harness counts it as hung.
IP_TIMEOUT = 20.0
#: Seconds a process gets to exit on SIGTERM at teardown before it is killed.
STOP_TIMEOUT = 5.0

_networks = itertools.count(1)


class NetnsUnavailable(RuntimeError):
    """This machine cannot make network namespaces (why is the message)."""


def ip(*args: str) -> str:
    """Runs ``ip ARGS``; raises with its error output when it fails."""
    return run_tool("ip", *args)


def run_tool(*args: str) -> str:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=IP_TIMEOUT,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(args)}` failed (status {proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def unavailable_reason() -> str | None:
    """Why this machine cannot run the harness, or None when it can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "bridge", "setpriv", "unshare", "hostname"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (ip and bridge: apt-get install iproute2)"
    return None


class Host:
    """One machine: a network namespace with its own hostname, plugged into the
    network's bridge with one address."""

    def __init__(self, network: Network, name: str, address: str):
        self.network = network
        self.name = name                      # also its hostname
        self.address = address
        self.netns = f"{network.prefix}-{name}"
        self.port = f"p-{name}"               # its port on the bridge, in the switch namespace
        self.procs: list[subprocess.Popen] = []
        self.is_cut = False

    def _plug(self) -> None:
        sw = self.network.switch
        ip("netns", "add", self.netns)
        try:
            ip("-n", sw, "link", "add", self.port, "type", "veth", "peer", "name", "eth0", "netns", self.netns)
            ip("-n", sw, "link", "set", self.port, "master", "br0", "up")
            ip("-n", self.netns, "link", "set", "lo", "up")
            ip("-n", self.netns, "addr", "add", f"{self.address}/{SUBNET.prefixlen}", "dev", "eth0")
            ip("-n", self.netns, "link", "set", "eth0", "up")
        except BaseException:
            ip("netns", "del", self.netns)
            raise

    def popen(self, args: list[str], **kwargs) -> subprocess.Popen:
        """Starts ``args`` in this host (its network and hostname; the rest,
        files and environment included, is the machine's).  The Popen's pid is
        the program's own: ``ip netns exec``, ``setpriv``, ``unshare`` and
        ``sh`` each exec the next.  With ``stdout=subprocess.PIPE``, read its lines with
        ``read_line`` (text mode unless told otherwise)."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("text", True)
        proc = subprocess.Popen(self._wrap(args), **kwargs)
        self.procs.append(proc)
        if kwargs.get("stdout") == subprocess.PIPE:
            # A thread hands over whole lines: a selector on the pipe cannot
            # see lines already in the file object's buffer, and would wait
            # for a second line that came with the first.
            proc.lines = queue.Queue()
            threading.Thread(target=_pump, args=(proc.stdout, proc.lines), daemon=True,
                             name=f"netns-{self.name}-{proc.pid}").start()
        return proc

    def _wrap(self, args: list[str]) -> list[str]:
        # setpriv: the program gets SIGKILL if the test process dies without
        # its teardown (pytest-timeout ends a hung run with os._exit).
        return ["ip", "netns", "exec", self.netns, "setpriv", "--pdeathsig", "KILL", "unshare", "--uts",
                "sh", "-c", 'hostname "$0" && exec "$@"', self.name, *args]

    def run(self, args: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Runs ``args`` in this host to the end; its output is captured."""
        try:
            return subprocess.run(self._wrap(args), capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{args} on {self.name} did not finish within {timeout:g} s") from None

    def cut(self) -> None:
        """Partitions this host from all others; its processes go on running."""
        self._port_state("disabled")
        self.is_cut = True

    def heal(self) -> None:
        """Ends a cut: the switch forwards this host's frames again."""
        self._port_state("forwarding")
        self.is_cut = False

    def _port_state(self, state: str) -> None:
        # With STP off the bridge takes a port state set by hand; "disabled"
        # drops every frame to and from the port (and learns nothing from it).
        # (`ip link set ... type bridge_slave state 0` is silently ignored by
        # iproute2 6.1, hence `bridge`, from the same package.)
        run_tool("bridge", "-n", self.network.switch, "link", "set", "dev", self.port, "state", state)
        shown = run_tool("bridge", "-n", self.network.switch, "link", "show", "dev", self.port)
        if f"state {state}" not in shown:
            raise RuntimeError(f"the bridge port of {self.name} did not go to state {state}: {shown.strip()}")

    def pids(self) -> list[int]:
        """Every process in this host's network namespace (all started here)."""
        out = ip("netns", "pids", self.netns)
        return [int(p) for p in out.split()]

    def remove(self) -> None:
        """Stops every process started in this host (SIGTERM, then SIGKILL),
        then removes the namespace and with it the veth pair."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for proc in self.procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        # Children of those (a worker supervisor's workers) that outlived them:
        # they are in this namespace, which only this harness puts processes in.
        leftovers = self.pids()
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in self.procs:
            # stdout with a pump is the pump's: it closes it at the end of output.
            for stream in (proc.stdin, None if hasattr(proc, "lines") else proc.stdout, proc.stderr):
                if stream is not None:
                    try:
                        stream.close()
                    except BrokenPipeError:
                        pass  # unread input of a process that is gone
        self.procs.clear()
        ip("netns", "del", self.netns)


def remove_stale() -> None:
    """Removes the namespaces of earlier runs whose test process is gone (it
    was killed before its teardown), with any process still in them; only
    names this harness makes (cwt<pid>-<n>-...) are touched."""
    for line in ip("netns", "list").splitlines():
        name = line.split()[0] if line.split() else ""
        match = re.fullmatch(r"cwt(\d+)-\d+-[\w-]+", name)
        if match is None or _alive(int(match.group(1))):
            continue
        for pid in ip("netns", "pids", name).split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        ip("netns", "del", name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


class Network:
    """A private bridge in a switch namespace, and the hosts plugged into it.
    Addresses come from 198.18.0.0/24 in order (.1 first)."""

    def __init__(self, prefix: str | None = None):
        reason = unavailable_reason()
        if reason:
            raise NetnsUnavailable(reason)
        self.prefix = prefix or f"cwt{os.getpid()}-{next(_networks)}"
        self.switch = f"{self.prefix}-sw"
        self.hosts: dict[str, Host] = {}
        self._addresses = SUBNET.hosts()
        try:
            remove_stale()
            ip("netns", "add", self.switch)
        except RuntimeError as exc:
            raise NetnsUnavailable(str(exc)) from None
        try:
            # The bridge gets no address: it only switches frames between hosts.
            ip("-n", self.switch, "link", "add", "br0", "type", "bridge", "stp_state", "0")
            ip("-n", self.switch, "link", "set", "br0", "up")
        except BaseException:
            ip("netns", "del", self.switch)
            raise

    def add_host(self, name: str) -> Host:
        """A new host named ``name`` (its hostname; letters, digits, '-'; short)."""
        if name in self.hosts or name == "sw" or len(f"p-{name}") > 15:
            raise ValueError(f"host name {name!r} is taken or too long (at most 13 characters)")
        host = Host(self, name, str(next(self._addresses)))
        host._plug()
        self.hosts[name] = host
        return host

    def close(self) -> None:
        """Removes every host and the switch; safe to call after a failure."""
        errors = []
        for host in list(self.hosts.values()):
            try:
                host.remove()
            except Exception as exc:  # go on: the other namespaces must go too
                errors.append(exc)
            del self.hosts[host.name]
        try:
            ip("netns", "del", self.switch)
        except Exception as exc:
            errors.append(exc)
        if errors:
            raise errors[0]


def _pump(stream, lines: queue.Queue) -> None:
    with stream:
        for line in stream:
            lines.put(line)
    lines.put("")   # end of output


def read_line(proc: subprocess.Popen, timeout: float) -> str:
    """The next line of ``proc``'s stdout (started by ``Host.popen`` with
    ``stdout=subprocess.PIPE``), or AssertionError after ``timeout`` s (a hang)
    or at the end of its output (it ended)."""
    try:
        line = proc.lines.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError(f"process {proc.pid} ({proc.args[-3:]}) printed no line within {timeout:g} s") from None
    if not line:
        proc.lines.put("")   # it stays ended for the next reader
        raise AssertionError(f"process {proc.pid} ({proc.args[-3:]}) ended (status {proc.wait()}) "
                             "before printing the line awaited")
    return line


@pytest.fixture
def network():
    """A fresh private network; every host and process in it is gone after
    the test.  Skips where namespaces cannot be made, unless
    $CW_REQUIRE_NETNS=1 makes that a failure (CI)."""
    try:
        net = Network()
    except NetnsUnavailable as exc:
        skip_unless_required(f"multi-host tests need network namespaces: {exc}", "CW_REQUIRE_NETNS")
    try:
        yield net
    finally:
        net.close()
