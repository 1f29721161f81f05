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
from itertools import repeat

from cw.client import refs
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


_names_by_code: dict = {}


def _names(code: types.CodeType) -> tuple:
    """Every name the code and the code nested in it may read as a global
    (remembered: a lambda made anew for each call has the same code)."""
    names = _names_by_code.get(code)
    if names is None:
        if len(_names_by_code) > 4096:
            _names_by_code.clear()
        names = _names_by_code[code] = tuple(sorted(_collect_names(code, set())))
    return names


def _collect_names(code: types.CodeType, into: set) -> set:
    into.update(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _collect_names(const, into)
    return into


def _cell_value(cell):
    try:
        return cell.cell_contents
    except ValueError:
        return _ABSENT


def _travels_by_value(obj) -> bool:
    """A function or class cloudpickle pickles with its content (so its
    globals, or its class dict, are part of the caller's pickle)."""
    module = getattr(obj, "__module__", None)
    if module == "__main__" or module is None:
        return True
    return isinstance(obj, types.FunctionType) and "<" in obj.__qualname__   # a lambda or a closure


class _Watch:
    """What one function's pickle is made of: functions (with the global
    names their code reads) and namespaces (classes, a bound method's
    instance) whose attributes it holds.  ``ok`` is False when that is
    too much to watch (the function is then pickled with each call)."""

    __slots__ = ("functions", "namespaces", "ok")

    def __init__(self, func):
        self.functions: list = []
        self.namespaces: list = []
        self.ok = True
        seen: set[int] = set()
        if isinstance(func, types.MethodType):
            target = func.__self__
            if not hasattr(target, "__dict__"):
                self.ok = False         # its state lives in slots we do not watch
                return
            self.namespaces.append(target)
            func = func.__func__
            if _travels_by_value(type(target)):
                self._add(type(target), seen)
        self._add(func, seen)

    def _add(self, obj, seen: set) -> None:
        if not self.ok or id(obj) in seen:
            return
        seen.add(id(obj))
        if len(seen) > MAX_WATCHED:
            self.ok = False
            return
        if isinstance(obj, type):
            self.namespaces.append(obj)
            for member in list(vars(obj).values()):
                inner = getattr(member, "__func__", member)     # staticmethod, classmethod
                if isinstance(inner, types.FunctionType):
                    self._add(inner, seen)
            return
        names = _names(obj.__code__)
        self.functions.append((obj, names))
        glob_get = obj.__globals__.get
        inner = [glob_get(name) for name in names]
        inner += map(_cell_value, obj.__closure__ or ())
        for value in inner:
            if isinstance(value, (types.FunctionType, type)) and _travels_by_value(value):
                self._add(value, seen)

    def state(self) -> list:
        """The objects the pickle was made of, as they are now (a name's
        value replaced, or a value added or removed, changes the list)."""
        out: list = []
        extend = out.extend
        for obj, names in self.functions:
            extend((obj.__code__, obj.__defaults__, obj.__kwdefaults__))
            attrs = obj.__dict__
            if attrs:
                extend(attrs.values())
            closure = obj.__closure__
            if closure:
                extend(map(_cell_value, closure))
            extend(map(obj.__globals__.get, names, repeat(_ABSENT, len(names))))   # (no comprehension's frame)
        for obj in self.namespaces:
            extend(vars(obj).values())
        return out


class _Entry:
    __slots__ = ("code", "func", "ref", "state", "watch")

    def __init__(self, func, ref, watch: _Watch | None):
        self.func = func        # held, so that its id is not reused while the entry lives
        self.ref = ref          # (digest, pickled bytes), or _BY_NAME
        self.watch = watch
        self.state = watch.state() if watch is not None else None   # held too: ids stay valid
        self.code = func.__code__ if type(func) is types.FunctionType else None


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
        self._by_code: dict = {}        # code object -> the last entry of a function with that code
        self._lock = threading.Lock()

    def lookup(self, func):
        """``(digest, bytes)`` for a function that travels by value, or None for
        one sent by name (or not cacheable): then the call carries it as before."""
        method = type(func) is types.MethodType
        key = (id(func.__func__), id(func.__self__)) if method else id(func)
        entry = self._entries.get(key)
        if entry is not None:
            if entry.ref is _BY_NAME:
                return None
            if (_same_method(entry.func, func) if method else entry.func is func) and _unchanged(entry):
                try:
                    self._entries.move_to_end(key)
                except KeyError:
                    pass                # another thread evicted it just now
                return entry.ref
        return self._miss(key, func)

    def _miss(self, key, func):
        if type(func) is types.MethodType and not (_travels_by_value(type(func.__self__))
                                                   or _travels_by_value(func.__func__)):
            return None     # a module class's method: pickled with its call, as before (no second pickling)
        if type(func) is types.FunctionType:
            twin = self._by_code.get(func.__code__)
            if twin is not None:
                # A lambda or closure made anew (a notebook's ``submit(lambda x: ..., x)``):
                # made of the same objects, it pickles to the same bytes.
                watch = _Watch(func)
                if watch.ok and _same_objects(watch.state(), twin.state):
                    return twin.ref
        before = refs.seen()
        data = payload.pickle_by_value(func)      # may raise: the caller reports it
        if refs.seen() != before:
            return None     # it holds Refs or futures: it travels with each call, which so names them
        if data is None:
            if type(func) is types.FunctionType:    # bound methods are made anew at each access
                self._store(key, _Entry(func, _BY_NAME, None), 0)
            return None
        if len(data) > MAX_FUNCTION_BYTES:
            return None
        watch = _Watch(func)
        if not watch.ok:
            return None
        self.pickled += 1
        entry = _Entry(func, (payload.digest_of(data), data), watch)
        self._store(key, entry, len(data))
        if entry.code is not None:
            if len(self._by_code) >= self.max_entries:
                self._by_code.clear()
            self._by_code[entry.code] = entry
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


def _same_method(held, func) -> bool:
    return type(held) is types.MethodType and held.__func__ is func.__func__ and held.__self__ is func.__self__


def _unchanged(entry: _Entry) -> bool:
    assert entry.watch is not None and entry.state is not None    # (only entries with a watch are checked)
    return _same_objects(entry.watch.state(), entry.state)


def _same_objects(now: list, then: list) -> bool:
    return len(now) == len(then) and all(map(operator.is_, now, then))


#: The process's cache.
FUNCTIONS = FunctionCache()
