"""The client's function cache: a function that travels by value is
pickled once, and its calls name it by the digest of those bytes.

cloudpickle sends a function defined in ``__main__`` (a script, a
notebook), a lambda or a closure by value: its code, and with it the
values of the globals it uses, its defaults, its closure cells and its
``__dict__``.  Pickling that per call costs more than the call's own
arguments, and so does unpickling it on the worker.  So a function object
is pickled once and kept here with its digest; the executor sends its
bytes to the master once (FUNC), and each job names it by digest.

A hit is only as good as the check that the function would still pickle to
the same bytes.  A function object alone is not enough of a key: in a
notebook, ``offset = 2`` after ``def f(x): return x + offset`` changes what
``f`` pickles to.  So each entry remembers the objects its pickle was made
of, and a hit is checked by identity against their current values: the
code, the defaults, the closure cells' contents, the ``__dict__``'s values,
and the current value of every global name the code (and the code nested
in it) mentions; and the same for each function and class defined in
``__main__`` (or a lambda or a closure) among those globals, in turn.  Any
object that is not the one seen: the function is pickled again, and if its
bytes changed, it gets a new digest.  A function redefined under the same
name is another object with another code object: a new entry.

What the check cannot see: a global (or a closure value, a default, an
attribute of a ``__main__`` class or of a bound method's instance) changed
in place, such as ``table.append(3)`` or ``model.weights[0] = 1``: the
object is the same, so the entry is reused, and workers keep the value they
first got.  Rebind the name instead (``table = table + [3]``), or pass the
value as an argument.  (A ProcessPoolExecutor's workers, forked once, do
not see such changes either.)
"""
from __future__ import annotations

import operator
import threading
import types
from collections import OrderedDict

from cw.wire import payload

__all__ = ["FunctionCache", "FUNCTIONS"]

#: Functions (and classes) one entry's check may watch; a function reaching
#: further is pickled with each call, as when there was no cache.
MAX_WATCHED = 64
#: A function pickled bigger than this (a closure over a large array) travels
#: with each call: kept once per worker, it would pin that memory everywhere.
MAX_FUNCTION_BYTES = 16 * 1024 * 1024

_ABSENT = object()      # a global name not defined (yet): defining it changes the pickle
_BY_NAME = object()     # an entry's ``ref`` for a function the standard pickler sends by name


def _names_of(code: types.CodeType, into: set) -> set:
    """Every name the code and the code nested in it may read as a global."""
    into.update(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _names_of(const, into)
    return into


def _travels_by_value(obj) -> bool:
    """A function or class cloudpickle pickles with its content (so its
    globals, or its class dict, are part of the caller's pickle)."""
    module = getattr(obj, "__module__", None)
    if module == "__main__" or module is None:
        return True
    return isinstance(obj, types.FunctionType) and "<" in obj.__qualname__   # a lambda or a closure


class _Watch:
    """What one function's pickle depends on: a list of (kind, object, names)."""

    __slots__ = ("parts",)

    def __init__(self, func):
        self.parts: list | None = []
        seen: set[int] = set()
        if isinstance(func, types.MethodType):
            target = func.__self__
            if not hasattr(target, "__dict__"):
                self.parts = None       # its state lives in slots we do not watch
                return
            self.parts.append(("instance", target, None))
            func = func.__func__
            if _travels_by_value(type(target)):
                self._add(type(target), seen)
        self._add(func, seen)

    def _add(self, obj, seen: set) -> None:
        if self.parts is None or id(obj) in seen:
            return
        seen.add(id(obj))
        if len(seen) > MAX_WATCHED:
            self.parts = None
            return
        if isinstance(obj, type):
            self.parts.append(("class", obj, None))
            members = list(vars(obj).values())
            for member in members:
                inner = getattr(member, "__func__", member)     # staticmethod, classmethod
                if isinstance(inner, types.FunctionType):
                    self._add(inner, seen)
            return
        names = tuple(sorted(_names_of(obj.__code__, set())))
        self.parts.append(("function", obj, names))
        glob = obj.__globals__
        for name in names:
            value = glob.get(name, _ABSENT)
            if isinstance(value, (types.FunctionType, type)) and _travels_by_value(value):
                self._add(value, seen)
        for cell in obj.__closure__ or ():
            try:
                value = cell.cell_contents
            except ValueError:
                continue
            if isinstance(value, (types.FunctionType, type)) and _travels_by_value(value):
                self._add(value, seen)

    def state(self) -> list:
        """The objects the pickle was made of, as they are now."""
        out = []
        for kind, obj, names in self.parts:
            if kind == "function":
                out += (obj.__code__, obj.__defaults__, obj.__kwdefaults__, len(obj.__dict__))
                out += obj.__dict__.values()
                for cell in obj.__closure__ or ():
                    try:
                        out.append(cell.cell_contents)
                    except ValueError:
                        out.append(_ABSENT)
                glob_get = obj.__globals__.get
                out += [glob_get(name, _ABSENT) for name in names]
            else:   # a class's or an instance's attributes
                attrs = vars(obj)
                out.append(len(attrs))
                out += attrs.values()
        return out


class _Entry:
    __slots__ = ("func", "ref", "state", "watch")

    def __init__(self, func, ref, watch: _Watch | None):
        self.func = func        # held, so that its id is not reused while the entry lives
        self.ref = ref          # (digest, pickled bytes), or _BY_NAME
        self.watch = watch
        self.state = watch.state() if watch is not None else None   # held too: ids stay valid


class FunctionCache:
    """Function object -> (digest, pickled bytes), for at most ``max_entries``
    functions and ``max_bytes`` of pickles, least recently used first out.
    Shared by the process's executors (digests name content, not a connection)."""

    def __init__(self, max_entries: int = 256, max_bytes: int = 64 * 1024 * 1024):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self.pickled = 0                # functions pickled by value (misses), for tests
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def lookup(self, func):
        """``(digest, bytes)`` for a function that travels by value, or None for
        one sent by name (or not cacheable): then the call carries it as before."""
        key = (id(func.__func__), id(func.__self__)) if type(func) is types.MethodType else id(func)
        entry = self._entries.get(key)
        if entry is not None:
            if entry.ref is _BY_NAME:
                return None
            if _same_function(entry.func, func) and _unchanged(entry):
                try:
                    self._entries.move_to_end(key)
                except KeyError:
                    pass                # another thread evicted it just now
                return entry.ref
        return self._miss(key, func)

    def _miss(self, key, func):
        data = payload.pickle_by_value(func)      # may raise: the caller reports it
        if data is None:
            if type(func) is types.FunctionType:    # bound methods are made anew at each access
                self._store(key, _Entry(func, _BY_NAME, None), 0)
            return None
        if len(data) > MAX_FUNCTION_BYTES:
            return None
        watch = _Watch(func)
        if watch.parts is None:
            return None
        self.pickled += 1
        entry = _Entry(func, (payload.digest_of(data), data), watch)
        self._store(key, entry, len(data))
        return entry.ref

    def _store(self, key, entry: _Entry, size: int) -> None:
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None and old.ref is not _BY_NAME:
                self.bytes -= len(old.ref[1])
            self._entries[key] = entry
            self.bytes += size
            while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
                _, gone = self._entries.popitem(last=False)
                if gone.ref is not _BY_NAME:
                    self.bytes -= len(gone.ref[1])


def _same_function(held, func) -> bool:
    if type(func) is types.MethodType:
        return type(held) is types.MethodType and held.__func__ is func.__func__ and held.__self__ is func.__self__
    return held is func


def _unchanged(entry: _Entry) -> bool:
    now = entry.watch.state()
    then = entry.state
    return len(now) == len(then) and all(map(operator.is_, now, then))


#: The process's cache.
FUNCTIONS = FunctionCache()
