"""Train neural networks on single-cell streams larger than memory and keep a representative coreset."""

from importlib.metadata import PackageNotFoundError, version

from . import datasets, pl, pp, stream, tl
from ._errors import InputError
from ._io._checks import NotRawCountsWarning
from ._io._labels import MissingLabelsWarning

try:
    __version__ = version("sccoreset")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = ["InputError", "MissingLabelsWarning", "NotRawCountsWarning", "datasets", "pl", "pp", "stream", "tl"]
