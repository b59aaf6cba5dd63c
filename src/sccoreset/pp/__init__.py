"""Preprocessing: metadata scan, streaming gene statistics, the gene space and chunked reading."""

from ._chunks import Chunk
from ._fit import fit_gene_space
from ._gene_space import GeneSpace
from ._iter_chunks import iter_chunks
from ._scan import StreamInfo, scan
from ._split import stratified_split
from ._transform import transform
from ._weights import balanced_weights

__all__ = [
    "Chunk",
    "GeneSpace",
    "StreamInfo",
    "balanced_weights",
    "fit_gene_space",
    "iter_chunks",
    "scan",
    "stratified_split",
    "transform",
]
