"""Run a generator in a background thread, ``depth`` items ahead of the consumer."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

from ._threads import stopped_at_exit

T = TypeVar("T")

_DONE = object()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def prefetch(make: Callable[[], Iterator[T]], depth: int = 1) -> Iterator[T]:
    """Yield the items of ``make()``, produced in a background thread up to ``depth`` items ahead.

    ``depth=0`` runs everything in the calling thread. Exceptions of the producer are re-raised in
    the consumer at the point where the failing item would have been yielded. Closing the consumer
    early stops the producer.
    """
    if depth <= 0:
        yield from make()
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        gen = make()
        try:
            for item in gen:
                if not put(item):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put(_Failure(e))
            return
        finally:
            gen.close()  # runs the producer's own clean-up (nested prefetches) in this thread
        put(_DONE)

    thread = threading.Thread(target=work, name="sccoreset-prefetch", daemon=True)
    thread.start()
    try:
        with stopped_at_exit(stop.set, [thread]):
            while True:
                item = q.get()
                if item is _DONE:
                    return
                if isinstance(item, _Failure):
                    raise item.exc
                yield item
    finally:
        stop.set()
        thread.join()
