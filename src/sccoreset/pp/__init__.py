"""Preprocessing: metadata scan, streaming gene statistics, the gene space and chunked reading."""

from ._chunks import Chunk
from ._fit import fit_gene_space
from ._gene_space import GeneSpace
from ._iter_chunks import iter_chunks
from ._scan import StreamInfo, scan
from ._transform import transform

__all__ = ["Chunk", "GeneSpace", "StreamInfo", "fit_gene_space", "iter_chunks", "scan", "transform"]
