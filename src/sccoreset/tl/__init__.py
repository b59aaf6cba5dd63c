"""Tools: streaming-coreset training and prediction."""

from .._config import StreamConfig
from ._predict import load_classifier, predict
from ._stream_train import stream_train

__all__ = ["StreamConfig", "load_classifier", "predict", "stream_train"]
