"""Datasets: the bundled PBMCs as a chunked stream and a seeded synthetic stream generator."""

from ._pbmc import PBMCStream, pbmc_counts, pbmc_stream
from ._synthetic import SyntheticStream, synthetic_stream

__all__ = ["PBMCStream", "SyntheticStream", "pbmc_counts", "pbmc_stream", "synthetic_stream"]
