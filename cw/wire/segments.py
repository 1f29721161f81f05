"""Big frames between processes of one machine, by reference instead of through the socket.

A frame with a big payload (a 100 MB argument or result) crosses a socket
as a copy into the kernel and a copy out, and through the master twice.  When
both ends of a link run on one machine, the sender instead writes the payload
once into a memfd (an anonymous file in memory) and sends a small BY_SEGMENT
frame naming it: its own pid and descriptor number, the file's inode, where
the payload lies in the file, and the frame's fixed fields.  The receiver
opens ``/proc/<pid>/fd/<fd>``, checks the inode, maps the file (MAP_PRIVATE:
an unpickled numpy array stays writable and a change never reaches the
sender) and answers RELEASE with the frame's token; the sender closes its
descriptor then.  The master re-sends the same file to a worker or client
of its machine without touching the bytes, and sends the bytes themselves
(read from the mapping) to peers on other machines.

Why memfd and not ``/dev/shm`` names: the kernel frees a memfd when its
last descriptor and mapping are gone, so a peer killed at any moment leaves
nothing behind, where a name in ``/dev/shm`` outlives a dead creator.  Why
``/proc/<pid>/fd`` and not SCM_RIGHTS: the master's asyncio transports
cannot carry descriptors; opening the sender's descriptor needs no side
channel, and RELEASE bounds how long the sender holds it (until the link closes at most).

The sender seals the file (no write, no shrink) before naming it, and a
receiver opens only sealed memfds of cw: a mapping cannot change under a
job nor fault (SIGBUS) on a file shrunk under it, and a peer cannot make us
read any other file.  A sender holds at most HELD_MAX unreleased bytes for a
peer; beyond that big frames take the socket, whose backpressure applies.

The payload sits at ``offset`` (a page or more into the file): the gap before
it lets the receiver write the frame's fields just before the payload in its
private mapping, so that the frame's body is one contiguous buffer, as the
decoders expect.

Whether a link may do this is tested once, at HELLO: each end publishes a
probe (boot id, pid, a memfd's descriptor and inode) and the other end must
open it and find the same inode.  A host name is not enough (containers
in pid namespaces of their own share the kernel but not /proc; one name may
stand for several machines): the probe proves the thing that matters, that
this peer can open our descriptors.  Processes in separate network
namespaces of one kernel and one pid namespace pass it, rightly.
"""
from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import struct
import threading
import weakref

from cw.errors import ProtocolError
from cw.wire.frames import HEADER, Frame, frame

#: Frames at least this big go by reference on a link of one machine.
MIN_SIZE = 1 << 20
#: Bytes of segments a sender holds for one peer (not yet RELEASEd) beyond which
#: it sends big frames through the socket again (one frame always goes by
#: reference when nothing is held).  A peer that stops reading then fills the
#: socket, and the usual backpressure holds the sender back, instead of
#: segments piling up for it.
HELD_MAX = 64 * 1024 * 1024
#: kind u8, pid u32, fd u32, inode u64, offset u64, payload length u64, token u64, then the fields.
_REF = struct.Struct("!BIIQQQQ")
_TOKEN = struct.Struct("!Q")
_PAGE = mmap.PAGESIZE
_MEMFD_NAME = "cw-segment"


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


_probe_lock = threading.Lock()
_probe: dict | None = None


def probe() -> dict | None:
    """What this process publishes in HELLO or WELCOME so that a peer can
    test whether it can open our segments (None where memfds do not exist)."""
    global _probe
    with _probe_lock:
        if _probe is not None and _probe["pid"] != os.getpid():   # a forked child: its own probe
            _probe = None
        if _probe is None and hasattr(os, "memfd_create") and boot_id():
            fd = os.memfd_create("cw-probe", os.MFD_CLOEXEC)   # kept open for the process's life
            _probe = {"boot": boot_id(), "pid": os.getpid(), "fd": fd, "ino": os.fstat(fd).st_ino}
        return _probe


def can_open(peer_probe) -> bool:
    """Whether we can open the peer's segments: same kernel (boot id) and its
    probe descriptor opens here as the same file (same pid namespace, allowed)."""
    if not isinstance(peer_probe, dict) or probe() is None or peer_probe.get("boot") != boot_id():
        return False
    try:
        fd = _open(peer_probe.get("pid"), peer_probe.get("fd"), peer_probe.get("ino"))
    except (OSError, ProtocolError, TypeError):
        return False
    os.close(fd)
    return True


def _open(pid: int, fd: int, ino: int) -> int:
    path = f"/proc/{int(pid)}/fd/{int(fd)}"
    # Only cw's own memfds: a peer must not make us read any file some process has open.
    if not os.readlink(path).startswith("/memfd:cw-"):
        raise ProtocolError(f"descriptor {fd} of pid {pid} is not a cw segment")
    new = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    if os.fstat(new).st_ino != ino:
        os.close(new)
        raise ProtocolError(f"descriptor {fd} of pid {pid} is not the segment it was sent as "
                            "(the sender exited and another process took its pid?)")
    return new


# --- sending ------------------------------------------------------------------

def write_segment(fields_room: int, payload_chunks) -> tuple[int, int, int]:
    """A new memfd holding the payload at a page-aligned offset with at least
    ``fields_room`` bytes before it; returns ``(fd, offset, length)``."""
    offset = max(_PAGE, -(-fields_room // _PAGE) * _PAGE)
    fd = os.memfd_create(_MEMFD_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.lseek(fd, offset, os.SEEK_SET)
        length = 0
        for chunk in payload_chunks:
            view = memoryview(chunk).cast("B")
            while view:                      # write() into a memfd may take less than asked
                n = os.write(fd, view)
                view = view[n:]
                length += n
        # Sealed: nobody can change or shrink it now, so a receiver's mapping
        # holds what was sent and never faults (SIGBUS) on a truncated file.
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                    | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd, offset, length


def encode_ref(kind: int, fd: int, offset: int, length: int, token: int, fields: bytes) -> bytes:
    ino = os.fstat(fd).st_ino
    return frame(Frame.BY_SEGMENT, _REF.pack(kind, os.getpid(), fd, ino, offset, length, token) + bytes(fields))


def encode_release(token: int) -> bytes:
    return frame(Frame.RELEASE, _TOKEN.pack(token))


def decode_release(body) -> int:
    if len(body) != _TOKEN.size:
        raise ProtocolError(f"RELEASE body of {len(body)} bytes; expected {_TOKEN.size}")
    return _TOKEN.unpack(body)[0]


def may_hold(held_bytes: int, size: int) -> bool:
    """Whether a frame of ``size`` bytes may go by reference with ``held_bytes`` unreleased (see HELD_MAX)."""
    return held_bytes == 0 or held_bytes + size <= HELD_MAX


def split_frame(chunks) -> tuple[int, bytes, list]:
    """``(kind, fields, payload chunks)`` of a frame given as (head and fields, payload chunks...)."""
    head = chunks[0]
    kind = head[4]
    return kind, head[HEADER.size:], list(chunks[1:])


# --- receiving ------------------------------------------------------------------

class Segment:
    """What a receiver knows of a segment it mapped: enough to send it on by reference."""

    __slots__ = ("fd", "ino", "offset", "length")

    def __init__(self, fd: int, ino: int, offset: int, length: int):
        self.fd, self.ino, self.offset, self.length = fd, ino, offset, length


#: id(mapping) -> Segment, for mappings whose descriptor we keep to send them on.
_KEPT: dict[int, Segment] = {}


def open_ref(body, keep_fd: bool = False):
    """Maps the segment a BY_SEGMENT body names.  Returns ``(kind, frame body,
    token)``; the body is a view of a private mapping (fields written in front
    of the payload).  With ``keep_fd`` our descriptor stays open as long as
    the mapping lives, so that ``kept_segment`` can name it to another peer."""
    if len(body) < _REF.size:
        raise ProtocolError(f"BY_SEGMENT body of {len(body)} bytes is shorter than its {_REF.size} fixed bytes")
    kind, pid, fd, ino, offset, length, token = _REF.unpack_from(body)
    fields = bytes(body[_REF.size:])
    try:
        new = _open(pid, fd, ino)
    except OSError as exc:
        raise ProtocolError(f"cannot open the shared segment {fd} of pid {pid} ({exc.strerror or exc}); "
                            "was the sender killed?") from exc
    try:
        size = os.fstat(new).st_size
        if not fcntl.fcntl(new, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK:
            raise ProtocolError(f"the segment {fd} of pid {pid} is not sealed: its sender could shrink it "
                                "under our mapping; refusing it")
        if len(fields) > offset or offset + length > size:
            raise ProtocolError(f"BY_SEGMENT names bytes {offset}..{offset + length} of a {size}-byte segment "
                                f"with {len(fields)} bytes of fields")
        mapping = _map_private(new, size)
    except BaseException:
        os.close(new)
        raise
    if keep_fd:
        _KEPT[id(mapping)] = Segment(new, ino, offset, length)
        weakref.finalize(mapping, _forget, id(mapping), new)
    else:
        os.close(new)
    start = offset - len(fields)
    view = memoryview(mapping).cast("B")
    view[start:offset] = fields
    return kind, view[start:offset + length], token


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


def _map_private(fd: int, size: int):
    """A private, writable mapping of the whole file as a ctypes byte array,
    unmapped when the array and every view of it are gone.  (Python 3.11's
    ``mmap.mmap`` keeps a duplicate descriptor per mapping: a master with a
    thousand big jobs waiting would run out of descriptors.)"""
    addr = _libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE, fd, 0)
    if addr is None or addr == _MAP_FAILED:
        errno = ctypes.get_errno()
        raise OSError(errno, f"cannot map a {size}-byte segment: {os.strerror(errno)}")
    mapping = (ctypes.c_ubyte * size).from_address(addr)
    weakref.finalize(mapping, _libc.munmap, addr, size)
    return mapping


def kept_count() -> int:
    """How many segments' descriptors we keep open (see ``open_ref``)."""
    return len(_KEPT)


def _forget(key: int, fd: int) -> None:
    _KEPT.pop(key, None)
    os.close(fd)


def kept_segment(payload) -> tuple[Segment, object] | None:
    """The kept segment whose whole payload ``payload`` is, with its mapping (None otherwise)."""
    if type(payload) is not memoryview:
        return None
    segment = _KEPT.get(id(payload.obj))
    if segment is None or segment.length != len(payload):
        return None
    return segment, payload.obj


def encode_kept_ref(kind: int, segment: Segment, token: int, fields: bytes) -> bytes:
    return frame(Frame.BY_SEGMENT, _REF.pack(kind, os.getpid(), segment.fd, segment.ino, segment.offset,
                                             segment.length, token) + bytes(fields))
