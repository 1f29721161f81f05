"""Checked types for the command lines' options: a bad value is refused
by argparse with a message that names the option, what was given and what
is allowed, before anything starts; and the options several commands
share.  Imports nothing of cw but errors, so every command line (the
master's too) can use it."""
from __future__ import annotations

import argparse
import ipaddress
import os
import threading

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def port(text: str) -> int:
    """A TCP port: 0 to 65535 (0: any free one, where a server binds)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number; give 0 to 65535") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port number; give 0 to 65535")
    return value


def log_level(text: str) -> str:
    """A logging level, in any case: DEBUG, INFO, WARNING, ERROR or CRITICAL."""
    level = text.upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a log level; give one of {', '.join(LOG_LEVELS)}")
    return level


def seconds(text: str) -> float:
    """A duration above 0 seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < 1e9:
        raise argparse.ArgumentTypeError(f"{text} is not a duration; give a number of seconds above 0")
    return value


def whole_seconds(text: str) -> int:
    """A whole number of seconds, 0 or more (SLURM takes no fractions)."""
    return _whole_number(text, 0, " of seconds", "is not a duration; give 0 or more seconds")


def count(text: str) -> int:
    """A whole number of at least 1."""
    return _whole_number(text, 1, "", "is too few; give 1 or more")


def _whole_number(text: str, least: int, unit: str, below: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number{unit}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"{value} {below}")
    return value


def master_address(text: str) -> str:
    """HOST[:PORT], [V6]:PORT (either after tls:// for a master started with
    --tls), slurm:NAME or file:PATH, checked for its form (whether the host
    exists is found out by connecting)."""
    if text.startswith("tls://"):
        if text[len("tls://"):].startswith(("slurm:", "file:")):
            raise argparse.ArgumentTypeError(f"{text!r}: slurm: and file: addresses need no tls://, the master "
                                             "publishes its scheme; give slurm:NAME or file:PATH")
        master_address(text[len("tls://"):])
        return text
    if text.startswith(("slurm:", "file:")):
        if text.partition(":")[2]:
            return text
        raise argparse.ArgumentTypeError(f"{text!r} names nothing; give slurm:NAME or file:PATH")
    host, port_text = text, None
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise argparse.ArgumentTypeError(f"{text!r} is not an address; give [V6ADDRESS]:PORT")
            port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    if port_text is not None:
        port(port_text)
    if not host and port_text is None:
        raise argparse.ArgumentTypeError("the address is empty; give HOST[:PORT]")
    return text


def tls_file_options(parser: argparse.ArgumentParser) -> None:
    """--tls-cert, --tls-key, --tls-ca: a site's own TLS files instead of the cluster's (cw.wire.tls)."""
    parser.add_argument("--tls-cert", default=None, metavar="PEM",
                        help="this side's TLS certificate (default $CW_TLS_CERT, else tls/cert.pem beside the "
                             "secret file)")
    parser.add_argument("--tls-key", default=None, metavar="PEM",
                        help="its private key (default $CW_TLS_KEY, else tls/key.pem)")
    parser.add_argument("--tls-ca", default=None, metavar="PEM",
                        help="the CA that must sign every peer's certificate (default $CW_TLS_CA, else tls/ca.pem)")


def until_stdin_closes_option(parser: argparse.ArgumentParser) -> None:
    """--until-stdin-closes: the process ends with the program that started it (see watch_stdin)."""
    parser.add_argument("--until-stdin-closes", action="store_true",
                        help="stop when standard input ends: a program that starts this process with a pipe as "
                             "its input, and keeps the other end, takes it down with it however it ends, even "
                             "killed (cw.allocate and cw.start do)")


def watch_for_end(fd: int, on_end, name: str = "cw-lifeline") -> None:
    """Calls ``on_end()``, on a thread of its own, once the pipe ``fd`` ends:
    its other end is closed, as the kernel does when the process that held it
    exits or is killed.  (Anything written to it is read and ignored.)"""
    def watch():
        try:
            while os.read(fd, 4096):
                pass
        except OSError:
            pass
        on_end()
    threading.Thread(target=watch, name=name, daemon=True).start()


def watch_stdin(on_end) -> None:
    """``watch_for_end`` on standard input (--until-stdin-closes)."""
    watch_for_end(0, on_end, "cw-stdin-lifeline")


def export_tls_files(args: argparse.Namespace) -> None:
    """Puts --tls-* into $CW_TLS_*, which the processes this one starts inherit."""
    for value, name in ((args.tls_cert, "CW_TLS_CERT"), (args.tls_key, "CW_TLS_KEY"), (args.tls_ca, "CW_TLS_CA")):
        if value:
            os.environ[name] = os.path.abspath(value)


def is_loopback(host: str) -> bool:
    """Whether a bind address reaches this machine only (nobody else can connect)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_address(text: str) -> str:
    """An IP address or host name to listen on."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        if not text or any(c.isspace() for c in text) or "/" in text or ":" in text:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not an address to listen on; give an IP address of this machine "
                "(127.0.0.1, 0.0.0.0 for every interface) or its host name") from None
    return text
