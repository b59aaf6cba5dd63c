"""Reading threads stop before the interpreter exits.

The readers' threads are daemons, so that a consumer that is never closed cannot keep the process alive.
But at exit Python freezes daemon threads wherever they are, h5py's lock included, and a chunk generator
that is finalized after that (one kept alive by a traceback, e.g. after an uncaught error inside
``for chunk in iter_chunks(...)``) then waits forever to close its files. An exit hook stops and joins
every live reader first.
"""

from __future__ import annotations

import atexit
import itertools
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

JOIN_TIMEOUT = 30.0  # seconds per thread at exit: a thread that hangs in I/O does not hang the exit

_live: dict[int, tuple[Callable[[], None], Sequence[threading.Thread]]] = {}
_lock = threading.Lock()
_keys = itertools.count()


@contextmanager
def stopped_at_exit(stop: Callable[[], None], threads: Sequence[threading.Thread]) -> Iterator[None]:
    """While the block runs, an exit of the interpreter calls ``stop()`` and joins ``threads`` first."""
    key = next(_keys)
    with _lock:
        _live[key] = (stop, threads)
    try:
        yield
    finally:
        with _lock:
            _live.pop(key, None)


def stop_all() -> None:
    """Stop and join every registered reader (the exit hook)."""
    with _lock:
        live = list(_live.values())
    for stop, _ in live:
        stop()
    for _, threads in live:
        for t in threads:
            if t is not threading.current_thread():
                t.join(timeout=JOIN_TIMEOUT)


atexit.register(stop_all)
