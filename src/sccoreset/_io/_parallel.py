"""Run a function over a sequence of items in several threads, yielding the results in item order.

The work of reading a chunk (positioned reads) and transforming it (numba kernels) releases the GIL,
so threads use every core. Items are taken in order, and a worker takes item ``i`` only once it holds
one of ``depth + n_workers`` slots; a slot is given back when the consumer takes result ``i``. So at
most ``depth + n_workers`` results exist at once (being computed or waiting), whatever their order of
completion, and the smallest unfinished item always holds a slot: no deadlock.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar

from ._threads import stopped_at_exit

T = TypeVar("T")
R = TypeVar("R")
S = TypeVar("S")

MAX_WORKERS = 8


def default_workers() -> int:
    """The CPUs this process may run on (its affinity mask, not the machine's count), at most 8.

    Beyond about 8 threads a chunk stream is bound by memory bandwidth and by the GIL-holding part of
    each chunk (h5py reads of indptr and obs names), and every worker holds one chunk of memory.
    """
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        n = os.cpu_count() or 1
    return max(1, min(n, MAX_WORKERS))


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class _Ordered(Generic[R]):
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.results: dict[int, R | _Failure] = {}
        self.next_item = 0
        self.stopped = False


def ordered_map(
    fn: Callable[[T, S], R],
    items: Sequence[T],
    *,
    n_workers: int,
    depth: int = 1,
    state: Callable[[], S] = lambda: None,
    name: str = "sccoreset-worker",
) -> Iterator[R]:
    """``fn(item, worker_state)`` for every item, computed by ``n_workers`` threads, yielded in order.

    ``state()`` makes one object per worker (read buffers, an accumulator) passed to each of its calls.
    An exception of ``fn`` is raised in the consumer when it reaches that item; closing the consumer
    early (or a failure) stops the workers, which finish the item in hand and exit; the generator
    returns only once every worker thread has ended.
    """
    n = len(items)
    shared: _Ordered[R] = _Ordered()
    slots = threading.Semaphore(max(depth, 0) + n_workers)

    def work() -> None:
        local = state()
        while True:
            while not slots.acquire(timeout=0.05):
                if shared.stopped:
                    return
            with shared.cond:
                i = shared.next_item
                if shared.stopped or i >= n:
                    slots.release()
                    return
                shared.next_item += 1
            try:
                result: R | _Failure = fn(items[i], local)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer at item i
                result = _Failure(e)
            with shared.cond:
                shared.results[i] = result
                shared.cond.notify_all()
                if isinstance(result, _Failure):
                    return

    threads = [threading.Thread(target=work, name=f"{name}-{k}", daemon=True) for k in range(max(1, n_workers))]

    def stop() -> None:
        with shared.cond:
            shared.stopped = True

    for t in threads:
        t.start()
    try:
        with stopped_at_exit(stop, threads):
            for i in range(n):
                with shared.cond:
                    while i not in shared.results:
                        shared.cond.wait()
                    result = shared.results.pop(i)
                slots.release()
                if isinstance(result, _Failure):
                    raise result.exc
                yield result
                del result
    finally:
        with shared.cond:
            shared.stopped = True
            shared.results.clear()
        for t in threads:
            t.join()
