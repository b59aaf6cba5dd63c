"""The typed configuration (StreamConfig) and the behaviour users rely on through it."""

from __future__ import annotations

import dataclasses
import inspect

import anndata as ad
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sccoreset as scc
from sccoreset import InputError
from sccoreset._config import StreamConfig, option_fields
from sccoreset._engine._selection import select

TINY = dict(
    chunk_size=300, buffer_size=60, epochs_per_step=1, final_epochs=0, hidden=(16,), n_top_genes=50, progress=False
)


def _train(stream, **kw):
    return scc.tl.stream_train(stream.files, stream.label_key, **{**TINY, **kw})


# -- one set of defaults, every option documented ---------------------------------------------------------------


def test_defaults_are_those_of_stream_train():
    sig = inspect.signature(scc.tl.stream_train).parameters
    cfg = StreamConfig()
    for f in option_fields():
        assert f.name in sig, f.name
        assert sig[f.name].kind is inspect.Parameter.KEYWORD_ONLY
        assert sig[f.name].default == getattr(cfg, f.name), f.name
    assert scc.tl.StreamConfig is StreamConfig


def test_every_option_is_documented():
    doc = scc.tl.stream_train.__doc__
    assert "{options}" not in doc
    for f in option_fields():
        assert f.metadata.get("doc", "").strip(), f"{f.name} has no documentation"
        assert f"\n    {f.name}\n" in doc, f"{f.name} is not in stream_train's docstring"
        assert f.metadata["doc"] in doc


def test_from_options_replaces_and_revalidates():
    cfg = StreamConfig(chunk_size=500, buffer_size=100)
    new = StreamConfig.from_options(cfg, buffer_size=50)
    assert (new.chunk_size, new.buffer_size) == (500, 50)
    assert cfg.buffer_size == 100  # frozen: the original is unchanged
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.buffer_size = 10  # type: ignore[misc]
    with pytest.raises(InputError, match=r"buffer_size \(500\) must be smaller than chunk_size \(500\)"):
        StreamConfig.from_options(cfg, buffer_size=500)
    with pytest.raises(InputError, match="drop_hard must be in"):
        StreamConfig.from_options(cfg, drop_hard=2.0)
    assert StreamConfig.from_options(None, buffer_size=7).buffer_size == 7
    with pytest.raises(InputError, match="config must be a StreamConfig, got dict"):
        StreamConfig.from_options({"buffer_size": 7}, buffer_size=7)


def test_config_plus_options_in_stream_train(small_stream):
    cfg = StreamConfig(**TINY)
    coreset = scc.tl.stream_train(small_stream.files, small_stream.label_key, config=cfg, buffer_size=40)
    params = coreset.uns["sccoreset"]["params"]
    assert params["buffer_size"] == 40
    assert params["chunk_size"] == 300
    assert coreset.n_obs == 40


# -- resume with a numpy Generator as random_state ------------------------------------------------------------------


def test_resume_with_a_generator_seed(tmp_path, small_stream):
    ckpt = tmp_path / "ckpt"
    first = _train(small_stream, checkpoint_dir=ckpt, random_state=np.random.default_rng(5))
    again = _train(small_stream, checkpoint_dir=ckpt, resume=True, random_state=np.random.default_rng(5))
    assert again.obs_names.tolist() == first.obs_names.tolist()
    with pytest.raises(InputError, match=r"different parameters: random_state \(checkpoint 'Generator\("):
        _train(small_stream, checkpoint_dir=ckpt, resume=True, random_state=np.random.default_rng(6))


# -- the coreset's obs, uns and the checkpoint format ------------------------------------------------------------------


def test_a_user_column_named_pos_survives(tmp_path, small_stream, rng):
    files, truth = [], {}
    for i, path in enumerate(small_stream.files[:2]):
        a = ad.read_h5ad(path)
        a.obs["_pos"] = rng.integers(1000, 10**6, a.n_obs)
        dest = tmp_path / f"pos{i}.h5ad"
        a.write_h5ad(dest)
        files.append(dest)
        truth[str(dest)] = a.obs["_pos"].to_numpy()
    coreset = scc.tl.stream_train(files, small_stream.label_key, **TINY)
    assert "_pos" in coreset.obs
    expected = [
        truth[str(f)][r] for f, r in zip(coreset.obs["sccoreset_file"], coreset.obs["sccoreset_row"], strict=True)
    ]
    np.testing.assert_array_equal(coreset.obs["_pos"].to_numpy(), expected)


def test_key_added_names_the_record_and_the_columns(small_stream):
    coreset = _train(small_stream, key_added="run1")
    assert "run1" in coreset.uns
    assert "sccoreset" not in coreset.uns
    assert coreset.uns["run1"]["params"]["key_added"] == "run1"
    for col in ("file", "row", "chunk", "step_added", "aum", "confidence", "variability", "forgetting", "loss"):
        assert f"run1_{col}" in coreset.obs, col
    assert not any(c.startswith("sccoreset_") for c in coreset.obs)


def test_checkpoint_loads_with_weights_only(tmp_path, small_stream):
    from sccoreset.tl._checkpoint import CHECKPOINT_NAME, SCHEMA_VERSION

    _train(small_stream, checkpoint_dir=tmp_path / "ckpt")
    raw = torch.load(tmp_path / "ckpt" / CHECKPOINT_NAME, weights_only=True)
    assert raw["schema_version"] == SCHEMA_VERSION
    assert {"params", "files", "classes", "gene_space", "plan", "model", "engine", "events"} <= set(raw)
    assert isinstance(raw["model"], dict)
    assert all(isinstance(v, torch.Tensor) for v in raw["model"].values())


# -- ties in selection are not broken by position ---------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    group=st.integers(2, 40),
    keep_fraction=st.floats(0.05, 0.95),
    score=st.floats(-5, 5),
    rule=st.sampled_from(["top", "coverage"]),
)
def test_equal_scores_do_not_favour_the_start_of_the_array(group, keep_fraction, score, rule):
    """The buffer comes first in the merged array: with all scores equal, it must not be kept by position."""
    n = 2 * group
    m = max(1, min(n - 1, round(keep_fraction * n)))
    labels = np.zeros(n, dtype=np.int64)
    scores = np.full(n, score)
    first = total = 0
    for seed in range(200):
        keep = select(labels, scores, m, n_classes=1, rule=rule, rng=np.random.default_rng(seed))
        assert keep.size == m
        first += int((keep < group).sum())
        total += keep.size
    assert 0.35 <= first / total <= 0.65
