"""The loop's look-ahead (next chunk fetched while the GPU trains), run here on the CPU through the eager graphed trainer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sccoreset._config import StreamConfig
from sccoreset._engine._loop import ChunkData, StreamLoop
from sccoreset._engine._model import build_model, mlp_spec

N_GENES, N_CLASSES = 30, 4


def _chunks(n: int, k: int = 90) -> list[ChunkData]:
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 2, (N_CLASSES, N_GENES)).astype(np.float32)
    out = []
    for i in range(n):
        y = rng.integers(0, N_CLASSES, k)
        X = (centers[y] + rng.normal(0, 1, (k, N_GENES))).astype(np.float32)
        out.append(ChunkData(i, X, y.astype(np.int64), {"file": np.full(k, i), "row": np.arange(k)}))
    return out


def _loop(look_ahead: bool) -> StreamLoop:
    torch.manual_seed(0)
    cfg = StreamConfig(buffer_size=40, chunk_size=90, epochs_per_step=2, batch_size=32, hidden=(16,))
    loop = StreamLoop(build_model(mlp_spec(N_GENES, N_CLASSES, cfg.hidden)), cfg, n_classes=N_CLASSES,
                      rng=np.random.default_rng(0))  # fmt: skip
    loop.use_graphs = True  # the graphed trainer, run eagerly on the CPU (what the GPU captures)
    loop.look_ahead = look_ahead
    return loop


def test_look_ahead_trains_every_chunk_once_in_order(monkeypatch):
    fetched, ahead_calls = [], []
    original = StreamLoop._fetch_ahead
    monkeypatch.setattr(StreamLoop, "_fetch_ahead", lambda self, it: (ahead_calls.append(1), original(self, it)))

    def stream():
        for c in _chunks(5):
            fetched.append(c.index)
            yield c

    ahead = _loop(True)
    events = list(ahead.steps(stream()))
    assert [e["chunk"] for e in events] == list(range(5)) and fetched == list(range(5))
    assert len(ahead_calls) == 5  # each step fetched the next chunk while training (the last found none)
    plain = _loop(False)
    ref = list(plain.steps(iter(_chunks(5))))
    for a, b in zip(events, ref, strict=True):
        np.testing.assert_array_equal(a["epoch_losses"], b["epoch_losses"])
    np.testing.assert_array_equal(ahead.buffer.provenance["row"], plain.buffer.provenance["row"])
    for p, q in zip(ahead.model.parameters(), plain.model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_a_chunk_that_fails_while_the_step_before_trains_raises_after_that_step():
    """The step that was training when reading the next chunk failed still yields its event (and checkpoint)."""

    def stream():
        chunks = _chunks(3)
        yield chunks[0]
        yield chunks[1]
        raise OSError("disk gone")

    loop = _loop(True)
    events = loop.steps(stream())
    seen = [next(events)["chunk"], next(events)["chunk"]]  # chunk 2 failed while chunk 1 trained
    assert seen == [0, 1] and loop.step == 2
    with pytest.raises(OSError, match="disk gone"):
        next(events)
