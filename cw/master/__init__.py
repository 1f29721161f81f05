"""The master: a pure dispatcher (every routing decision) inside a thin
asyncio shell (sockets).  It never unpickles a payload, and never imports
cw.wire.payload (so cloudpickle is never loaded).  ``python -m cw.master``."""
