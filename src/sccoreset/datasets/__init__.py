"""Datasets: the bundled PBMCs as a chunked stream and seeded synthetic stream generators (cell types, Tahoe-like)."""

from ._pbmc import PBMCStream, pbmc_counts, pbmc_stream
from ._synthetic import SyntheticStream, synthetic_stream
from ._tahoe import tahoe_stream

__all__ = ["PBMCStream", "SyntheticStream", "pbmc_counts", "pbmc_stream", "synthetic_stream", "tahoe_stream"]
