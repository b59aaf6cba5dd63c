"""Tools: streaming-coreset training and prediction."""

from .._config import StreamConfig
from ._events import EventStream, stream_events
from ._predict import load_classifier, predict
from ._stream_train import stream_train

__all__ = ["EventStream", "StreamConfig", "load_classifier", "predict", "stream_events", "stream_train"]
