"""Job functions for the tests.  Workers import this module by name, which
works because a client sends its sys.path along (the tests' directory is on it)."""
from __future__ import annotations

import os
import threading
import time


def identity(x):
    return x


def square(x):
    return x * x


def add(x, y):
    return x + y


def pid():
    return os.getpid()


def pid_and_thread():
    return os.getpid(), threading.get_ident()


def fail(message):
    raise ValueError(message)


def wait_for(path, timeout=60.0):
    """Blocks until ``path`` exists (the test's release signal)."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.01)


def block(started_dir, release, value=None):
    """Records that it started (a file named after its pid), then waits for ``release``."""
    with open(os.path.join(started_dir, str(os.getpid())), "a") as f:
        f.write("started\n")
    wait_for(release)
    return value


def append_line(path, text="ran"):
    with open(path, "a") as f:
        f.write(text + "\n")
    return text


def hard_exit():
    os._exit(7)


def sleep(seconds, value=None):
    time.sleep(seconds)
    return value


def filled(n):
    """``n`` bytes, all of them written (unlike ``bytes(n)``, whose pages the
    kernel maps lazily): a big result."""
    return b"\x01" * n



_KEPT = {}


def kept_array(mb, say=None):
    """An array this worker process keeps between jobs (made on first use),
    returned as it is; ``say`` is printed first (job output)."""
    import numpy as np
    if say is not None:
        print(say)
    if "array" not in _KEPT:
        _KEPT["array"] = np.zeros(mb * (1 << 20), dtype=np.uint8)
    return _KEPT["array"]


def fill_kept_array(value):
    _KEPT["array"][:] = value
