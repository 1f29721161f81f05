"""Command jobs: run a program, here or on a worker, and get back its outcome.

    >>> executor.submit(cw.command, ["make", "-j4"], cwd="/src").result()
    CommandResult(argv=['make', '-j4'], returncode=0, stdout='...', stderr='', host='node7')

``command`` is a plain module-level function, so it travels to a worker like
any other job.  With ``image=`` the program runs in a container through
docker, podman or apptainer, whichever the machine has, limited to the CPUs
and memory the job asked for (the worker exports them as ``CW_JOB_CPUS`` and
``CW_JOB_MEM``).

The program runs in a process group of its own, so a timeout kills everything
it started, not just its first process.  A cw worker stops a cancelled or
timed-out job by exiting on the spot, which would leave that group running;
a small "lifeline" shell started next to it kills the group when the process
that called ``command`` goes away without saying goodbye.

    command() --Popen--> program group (stdout, stderr read by two threads)
        |
        +--lifeline pipe--> sh: "read" returns a line  -> exit quietly
                                "read" sees EOF         -> kill the group (and the container)
"""
from __future__ import annotations

import errno
import logging
import os
import secrets
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from cw.errors import ContainerEngineError, ContainerEngineMissing

log = logging.getLogger(__name__)

MAX_OUTPUT = 16 * 2**20          # bytes kept per stream: the first half and the last half
ENGINES = ("docker", "podman", "apptainer", "singularity")   # in order of preference
_APPTAINER_STYLE = ("apptainer", "singularity")
_GRACE = 10.0                    # seconds to wait for pipes to close once the group was killed


class CommandResult(NamedTuple):
    """What a program did: its exit status, its output (decoded, bounded) and where it ran."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    host: str

    def check(self) -> CommandResult:
        """Returns self if the program succeeded, else raises ``subprocess.CalledProcessError``."""
        if self.returncode != 0:
            raise subprocess.CalledProcessError(self.returncode, self.argv, self.stdout, self.stderr)
        return self


def command(argv: Sequence[str], cwd: str | os.PathLike | None = None, env: Mapping[str, str] | None = None,
            timeout: float | None = None, image: str | None = None, check: bool = False,
            input: str | bytes | None = None, max_output: int = MAX_OUTPUT) -> CommandResult:
    """Runs ``argv`` (with ``env`` merged over this machine's environment) and returns its outcome.

    Each of stdout and stderr keeps at most ``max_output`` bytes, its start and
    its end, with a note of how many bytes were dropped between them.  After
    ``timeout`` seconds the program and everything it started are killed and
    ``subprocess.TimeoutExpired`` is raised with the output so far (as str).
    With ``check=True`` a non-zero exit status raises ``CalledProcessError``.
    """
    argv = _checked_argv(argv)
    host = socket.gethostname()
    env = {str(key): str(value) for key, value in (env or {}).items()}
    if cwd is not None:
        cwd = os.fspath(cwd)
        if not os.path.isdir(cwd):
            raise FileNotFoundError(errno.ENOENT, f"working directory {cwd!r} does not exist on host {host}: "
                                    "create it there, or pass a cwd that every worker has")
    engine = name = None
    if image is None:
        run_argv, popen_cwd, popen_env = argv, cwd, ({**os.environ, **env} if env else None)
    else:
        engine = find_engine()
        if os.path.basename(engine) not in _APPTAINER_STYLE:
            # Killing the docker client leaves its container running: name it, to kill it too.
            name = f"cw-{os.getpid()}-{secrets.token_hex(4)}"
        cpus, memory = _job_resources()
        run_argv = container_argv(engine, image, argv, cwd, env, cpus, memory, name=name)
        popen_cwd = popen_env = None    # the engine gets cwd and env as flags, for the container
    log.debug("running %s on %s", run_argv, host)
    try:
        proc = subprocess.Popen(run_argv, cwd=popen_cwd, env=popen_env, start_new_session=True,
                                stdin=subprocess.DEVNULL if input is None else subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except FileNotFoundError:
        path = (popen_env or os.environ).get("PATH", os.defpath)
        raise FileNotFoundError(errno.ENOENT, f"program {run_argv[0]!r} was not found on host {host} "
                                f"(PATH={path}): install it there or fix PATH") from None
    lifeline = _Lifeline(proc.pid, engine, name)
    out, err = _Capture(proc.stdout, max_output), _Capture(proc.stderr, max_output)
    if input is not None:
        _feed(proc.stdin, input.encode() if isinstance(input, str) else input)
    try:
        finished = _wait(proc, (out, err), timeout)
    except BaseException:                # KeyboardInterrupt and the like: leave nothing running
        lifeline.cut()
        raise
    if not finished:
        lifeline.cut()
        for reader in (out, err):
            reader.join(_GRACE)          # a process that left the group may hold a pipe open
        raise subprocess.TimeoutExpired(argv, timeout, out.text(), err.text())
    lifeline.release()
    result = CommandResult(argv, proc.returncode, out.text(), err.text(), host)
    if engine is not None and _engine_failed(engine, result):
        raise ContainerEngineError(f"{engine} could not run {argv[0]!r} in image {image!r} on host {host} "
                                   f"(exit status {result.returncode}): {result.stderr.strip()}")
    return result.check() if check else result


def find_engine() -> str:
    """The path of the container engine to use: ``$CW_CONTAINER_ENGINE``, or the
    first of docker, podman, apptainer, singularity on PATH."""
    wanted = os.environ.get("CW_CONTAINER_ENGINE")
    for candidate in [wanted] if wanted else ENGINES:
        path = shutil.which(candidate)
        if path:
            return path
    host = socket.gethostname()
    if wanted:
        raise ContainerEngineMissing(f"the container engine CW_CONTAINER_ENGINE={wanted!r} was not found on host "
                                     f"{host}: install it there, or unset CW_CONTAINER_ENGINE to use whichever of "
                                     "docker, podman or apptainer the host has")
    raise ContainerEngineMissing(f"none of docker, podman, apptainer (or singularity) was found on host {host} "
                                 f"(PATH={os.environ.get('PATH', os.defpath)}): install one of them there to run "
                                 "commands with image=, or put it on the worker's PATH")


def container_argv(engine: str, image: str, argv: Sequence[str], cwd: str | None = None,
                   env: Mapping[str, str] | None = None, cpus: float | None = None, memory: int | None = None,
                   *, name: str | None = None) -> list[str]:
    """The argv that runs ``argv`` in ``image`` with ``engine`` (a name or a path).

    apptainer and singularity get ``exec``; anything else is taken to speak
    docker's ``run`` (podman, nerdctl do).  ``env`` is only what the user
    passed, never this machine's whole environment; ``memory`` is in bytes.
    """
    limits = []
    if cpus is not None:
        limits += ["--cpus", f"{cpus:g}"]
    if memory is not None:
        limits += ["--memory", str(int(memory))]
    if os.path.basename(engine) in _APPTAINER_STYLE:
        args = [engine, "exec", *limits]
        for key, value in (env or {}).items():
            args += ["--env", f"{key}={value}"]
        if cwd is not None:
            args += ["--pwd", cwd, "--bind", cwd]
    else:
        args = [engine, "run", "--rm", "-i"]   # -i: the program gets our stdin (input=)
        if name is not None:
            args += ["--name", name]
        args += limits
        for key, value in (env or {}).items():
            args += ["-e", f"{key}={value}"]
        if cwd is not None:
            args += ["-v", f"{cwd}:{cwd}", "-w", cwd]
    return [*args, image, *argv]


def _checked_argv(argv) -> list[str]:
    if isinstance(argv, (str, bytes)):
        raise TypeError(f"command() takes argv as a list of strings such as ['ls', '-l'], not {argv!r}; "
                        f"for shell syntax (pipes, globs, &&) pass ['sh', '-c', {argv!r}]")
    argv = [os.fspath(arg) if isinstance(arg, os.PathLike) else arg for arg in argv]
    for arg in argv:
        if not isinstance(arg, str):
            raise TypeError(f"command() argv items must be strings, not {type(arg).__name__} ({arg!r})")
    if not argv:
        raise ValueError("command() needs a program to run: argv is empty")
    return argv


def _job_resources() -> tuple[float | None, int | None]:
    """The CPUs and memory (bytes) the worker gave this job, from its environment."""
    values = []
    for var, kind in (("CW_JOB_CPUS", float), ("CW_JOB_MEM", int)):
        text = os.environ.get(var, "").strip()
        try:
            values.append(kind(text) if text else None)
        except ValueError:
            raise ValueError(f"${var}={text!r} on host {socket.gethostname()} is not a number") from None
    return values[0], values[1]


def _engine_failed(engine: str, result: CommandResult) -> bool:
    """Whether the engine, rather than the program, failed: docker and podman
    reserve 125 for that; apptainer exits 255 after a FATAL message."""
    if os.path.basename(engine) in _APPTAINER_STYLE:
        return result.returncode == 255 and "FATAL" in result.stderr
    return result.returncode == 125


def _wait(proc: subprocess.Popen, readers, timeout: float | None) -> bool:
    """Waits for the program to exit and its pipes to close; False if ``timeout`` came first."""
    deadline = None if timeout is None else time.monotonic() + timeout

    def left():
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    try:
        proc.wait(left())
    except subprocess.TimeoutExpired:
        return False
    for reader in readers:
        reader.join(left())
        if reader.is_alive():    # something the program started in the background still writes
            return False
    return True


def _feed(pipe, data: bytes) -> None:
    """Writes ``input`` from a thread, so a program that writes before it reads cannot deadlock us."""
    def write():
        try:
            with pipe:
                pipe.write(data)
        except (BrokenPipeError, OSError):
            pass                 # the program exited without reading it all, as `head` does
    threading.Thread(target=write, name="cw-command-input", daemon=True).start()


class _Capture(threading.Thread):
    """Reads one pipe to its end as it fills, keeping its first and last bytes,
    ``limit`` in all, so a program that prints gigabytes costs us little memory."""

    def __init__(self, pipe, limit: int):
        super().__init__(name="cw-command-output", daemon=True)
        self.pipe = pipe
        self.head_limit = limit // 2
        self.tail_limit = limit - self.head_limit
        self.head, self.tail, self.dropped = bytearray(), bytearray(), 0
        self.start()

    def run(self) -> None:
        with self.pipe:
            while chunk := os.read(self.pipe.fileno(), 1 << 16):
                room = self.head_limit - len(self.head)
                if room > 0:
                    self.head += chunk[:room]
                    chunk = chunk[room:]
                self.tail += chunk
                # Trim in batches: deleting from the front of a bytearray copies the rest.
                if len(self.tail) > max(2 * self.tail_limit, 1 << 20):
                    self._trim()

    def _trim(self) -> None:
        excess = len(self.tail) - self.tail_limit
        if excess > 0:
            del self.tail[:excess]
            self.dropped += excess

    def text(self) -> str:
        self._trim()
        data = bytes(self.head)
        if self.dropped:
            data += f"\n[... cw.command dropped {self.dropped} bytes of output here ...]\n".encode()
        return (data + bytes(self.tail)).decode("utf-8", errors="replace")


class _Lifeline:
    """A shell that kills the program's process group (and its container) unless
    told goodbye: it sees EOF when we cut the pipe or when this process dies."""

    _SCRIPT = 'read _ || { kill -s KILL -- "-$1"; [ -z "$3" ] || "$2" kill "$3"; } >/dev/null 2>&1'

    def __init__(self, pgid: int, engine: str | None, container: str | None):
        read_end, self._pipe = os.pipe()     # our end is not inherited by the program (PEP 446)
        try:
            self._shell = subprocess.Popen(["sh", "-c", self._SCRIPT, "cw-lifeline", str(pgid), engine or "",
                                            container or ""], stdin=read_end,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        finally:
            os.close(read_end)

    def release(self) -> None:
        """The program finished: the shell leaves quietly."""
        self._close(b"\n")

    def cut(self) -> None:
        """Kills the group now, and waits until the kill was sent."""
        self._close(b"")

    def _close(self, goodbye: bytes) -> None:
        try:
            os.write(self._pipe, goodbye)
        finally:
            os.close(self._pipe)
        try:
            self._shell.wait(_GRACE)
        except subprocess.TimeoutExpired:
            log.warning("the lifeline shell of a command did not exit in %s s", _GRACE)
