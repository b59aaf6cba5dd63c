"""Keep the number of files open at once bounded, whatever the number of files in the stream.

Each open source holds two descriptors (h5py's and the positioned reads'). Shuffled orders touch every file
early and finish each late, and a coreset's kept cells can come from thousands of files: without a bound a
stream of CELLxGENE size runs out of descriptors (1,024 is a common limit on clusters, 256 on macOS).
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator, Sequence

from ._source import Source


def open_file_budget() -> int:
    """Files to keep open at once: an eighth of the descriptor limit, between 4 and 256."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):  # pragma: no cover - not on POSIX
        return 64
    if soft == resource.RLIM_INFINITY:
        return 256
    return max(4, min(256, soft // 8))


class OpenFiles:
    """Closes the least recently used files beyond ``budget`` that no reader is reading.

    Readers call :meth:`begin` with the files of a chunk before reading it and :meth:`end` once its rows are in
    memory; a file is closed only between those calls of every reader (it reopens when read again).
    """

    def __init__(self, sources: Sequence[Source], budget: int | None = None) -> None:
        self.sources = sources
        self.budget = open_file_budget() if budget is None else int(budget)
        self._lock = threading.Lock()
        self._reading: Counter[int] = Counter()
        self._recent: OrderedDict[int, None] = OrderedDict()

    def begin(self, files: Iterable[int]) -> None:
        with self._lock:
            for f in files:
                self._reading[f] += 1
                self._recent[f] = None
                self._recent.move_to_end(f)

    def end(self, files: Iterable[int]) -> None:
        """The reader is done with ``files`` (it may call this per file, as soon as a file's rows are read)."""
        with self._lock:
            for f in files:
                self._reading[f] -= 1
            excess = len(self._recent) - self.budget
            if excess <= 0:  # the common case: under the budget, nothing to close
                return
            for f in list(self._recent):
                if excess <= 0:
                    break
                if self._reading[f] <= 0:
                    self.sources[f].close()
                    del self._recent[f]
                    excess -= 1

    def close(self, f: int) -> None:
        """Close ``f`` for good: its last rows were read (it would still reopen if read again)."""
        with self._lock:
            self._recent.pop(f, None)
        self.sources[f].close()


def each_bounded(sources: Sequence[Source], budget: int | None = None) -> Iterator[Source]:
    """Yield ``sources`` in turn for a pass over whole files (label scans), keeping few of them open.

    Files that were closed before the pass and that it opened are closed again beyond ``budget`` (oldest
    first), so at most ``budget`` of them stay open whatever the number of files. The last ``budget`` stay
    open for the reading that follows.
    """
    budget = open_file_budget() if budget is None else int(budget)
    opened: list[Source] = []
    for src in sources:
        was_open = src.is_open
        yield src
        if not was_open and src.is_open:
            opened.append(src)
            if len(opened) > budget:
                opened.pop(0).close()
