"""Checkpoint and resume: a run killed with SIGKILL and resumed equals an uninterrupted run, cell by cell."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import sccoreset as scc
from sccoreset import InputError
from sccoreset.tl._checkpoint import CHECKPOINT_NAME, read_checkpoint

KW = dict(
    chunk_size=200, buffer_size=50, epochs_per_step=2, hidden=(32,), final_epochs=2, n_top_genes=80, random_state=5
)


def _run_killed(tmp_path, files, holdout, kill_at_call):
    """Run stream_train in a subprocess that SIGKILLs itself in its `kill_at_call`-th training call."""
    script = tmp_path / "killed.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, signal, json
            import sccoreset as scc
            import sccoreset._engine._loop as loop
            real = loop.train_epochs
            calls = [0]
            def dying(*a, **k):
                calls[0] += 1
                if calls[0] == {kill_at_call}:
                    os.kill(os.getpid(), signal.SIGKILL)
                return real(*a, **k)
            loop.train_epochs = dying
            scc.tl.stream_train({json.dumps([str(f) for f in files])}, "cell_type", eval_data={str(holdout)!r},
                                checkpoint_dir={str(tmp_path / "ckpt")!r}, progress=False, **{KW!r})
            """
        )
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def _assert_same(a, b):
    assert list(a.obs_names) == list(b.obs_names)
    np.testing.assert_array_equal(a.X, b.X)
    np.testing.assert_array_equal(a.layers["counts"].toarray(), b.layers["counts"].toarray())
    for col in a.obs.columns:
        np.testing.assert_array_equal(a.obs[col].to_numpy(), b.obs[col].to_numpy())
    ha, hb = a.uns["sccoreset"]["history"], b.uns["sccoreset"]["history"]
    for key in (
        "train_loss",
        "epoch_losses",
        "macro_f1",
        "accuracy",
        "f1",
        "buffer_class_counts",
        "buffer_chunk_counts",
    ):
        np.testing.assert_array_equal(ha[key], hb[key])
    assert ha["final"]["macro_f1"] == hb["final"]["macro_f1"]
    wa, wb = a.uns["sccoreset"]["model"]["weights"], b.uns["sccoreset"]["model"]["weights"]
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k])


@pytest.mark.parametrize("kill_at_call", [3, 7])  # during step 2; during the final consolidation (6 steps)
def test_sigkill_and_resume_gives_the_uninterrupted_coreset(tmp_path, small_stream, kill_at_call):
    files, holdout = small_stream.files, small_stream.holdout
    _run_killed(tmp_path, files, holdout, kill_at_call)
    saved = read_checkpoint(tmp_path / "ckpt")
    assert saved is not None and saved["engine"]["step"] == kill_at_call - 1
    assert not [p for p in (tmp_path / "ckpt").iterdir() if p.name != CHECKPOINT_NAME]  # no stray temp file
    resumed = scc.tl.stream_train(
        files, "cell_type", eval_data=holdout, checkpoint_dir=tmp_path / "ckpt", resume=True, progress=False, **KW
    )
    straight = scc.tl.stream_train(files, "cell_type", eval_data=holdout, progress=False, **KW)
    _assert_same(resumed, straight)
    import anndata as ad

    p1 = scc.tl.predict(ad.read_h5ad(holdout), resumed, copy=True).obs["sccoreset_confidence"]
    p2 = scc.tl.predict(ad.read_h5ad(holdout), straight, copy=True).obs["sccoreset_confidence"]
    np.testing.assert_array_equal(p1.to_numpy(), p2.to_numpy())


def test_resume_refuses_other_parameters_or_files(tmp_path, small_stream):
    files = small_stream.files
    ckpt = tmp_path / "ckpt"
    scc.tl.stream_train(files, "cell_type", checkpoint_dir=ckpt, checkpoint_every=2, progress=False, **KW)
    assert read_checkpoint(ckpt)["engine"]["step"] == 6  # the last step is always written
    with pytest.raises(InputError, match=r"different parameters: buffer_size \(checkpoint 50, now 40\)"):
        scc.tl.stream_train(
            files, "cell_type", checkpoint_dir=ckpt, resume=True, progress=False, **{**KW, "buffer_size": 40}
        )
    with pytest.raises(InputError, match="made on other files"):
        scc.tl.stream_train(files[:3], "cell_type", checkpoint_dir=ckpt, resume=True, progress=False, **KW)
    with pytest.raises(InputError, match="resume=True needs checkpoint_dir"):
        scc.tl.stream_train(files, "cell_type", resume=True, progress=False, **KW)
    # progress and prefetch may change; a finished checkpoint resumes straight to the same coreset
    again = scc.tl.stream_train(files, "cell_type", checkpoint_dir=ckpt, resume=True, progress=False, prefetch=0, **KW)
    straight = scc.tl.stream_train(files, "cell_type", progress=False, **KW)
    assert list(again.obs_names) == list(straight.obs_names)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, small_stream):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / CHECKPOINT_NAME).write_bytes(b"garbage")
    with pytest.raises(InputError, match="not a readable sccoreset checkpoint"):
        scc.tl.stream_train(small_stream.files, "cell_type", checkpoint_dir=ckpt, resume=True, progress=False, **KW)
