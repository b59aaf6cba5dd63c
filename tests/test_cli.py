from __future__ import annotations

import argparse
import contextlib
import io
import os
import subprocess
import sys

import anndata as ad
import numpy as np
import pytest

import sccoreset as scc
from sccoreset._cli import build_parser, config_options, flag, main, process_group
from sccoreset._config import StreamConfig, choices, option_fields

FAST = [
    "--chunk-size", "200", "--buffer-size", "40", "--epochs-per-step", "1", "--final-epochs", "1",
    "--n-top-genes", "80", "--hidden", "32", "--no-progress", "--device", "cpu",
]  # fmt: skip


@pytest.fixture(scope="module")
def stream(tmp_path_factory) -> scc.datasets.SyntheticStream:
    d = tmp_path_factory.mktemp("cli_stream")
    return scc.datasets.synthetic_stream(
        d, n_files=3, cells_per_file=200, n_genes=300, holdout_per_type=10, random_state=1
    )


def train_args(stream, out, *extra: str) -> list[str]:
    return ["train", *map(str, stream.files), "--label-key", stream.label_key, "--out", str(out), *FAST, *extra]


@pytest.fixture(scope="module")
def trained(stream, tmp_path_factory):
    """One CLI run with eval data, given classes and --rule top: its coreset path and printed summary."""
    out = tmp_path_factory.mktemp("cli_out") / "coreset.h5ad"
    argv = train_args(stream, out, "--rule", "top", "--eval-data", str(stream.holdout), "--classes", *stream.types)
    with contextlib.redirect_stdout(io.StringIO()) as summary:
        assert main(argv) == 0
    return out, summary.getvalue()


def train_subparser() -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def parse_train(*args: str) -> dict:
    return config_options(build_parser().parse_args(["train", "a.h5ad", "--label-key", "y", "--out", "o.h5ad", *args]))


def test_every_option_has_a_flag():
    actions = {s: a for a in train_subparser()._actions for s in a.option_strings}
    hints = __import__("typing").get_type_hints(StreamConfig)
    for f in option_fields():
        if not f.metadata.get("cli", True):  # a callable (loss=) has no command-line form
            assert flag(f.name) not in actions
            continue
        action = actions[flag(f.name)]
        assert action.dest == f.name
        assert action.default is argparse.SUPPRESS
        assert f.metadata["doc"].replace("``", "")[:30] in action.help
        if hints[f.name] is bool:
            assert "--no-" + f.name.replace("_", "-") in action.option_strings
        if action.choices is not None:
            assert tuple(action.choices) == choices(hints[f.name])


def test_flags_reach_options():
    got = parse_train(
        "--hidden", "64", "32", "--max-chunk-fraction", "none", "--random-state", "7", "--no-balance-loss",
        "--rule", "top", "--block-size", "None", "--score-decay", "0.5", "--resume", "--checkpoint-dir", "ck",
        "--lr", "0.01", "--order", "block_shuffle", "--budget-key", "cell_line,drug", "--regularizer", "ewc", "--weight-key", "none",
    )  # fmt: skip
    assert got == {
        "hidden": (64, 32), "max_chunk_fraction": None, "random_state": 7, "balance_loss": False, "rule": "top",
        "block_size": None, "score_decay": 0.5, "resume": True, "checkpoint_dir": "ck", "lr": 0.01,
        "order": "block_shuffle", "budget_key": ("cell_line", "drug"), "regularizer": "ewc", "weight_key": None,
    }  # fmt: skip
    cfg = StreamConfig.from_options(**got)
    assert cfg.hidden == (64, 32) and cfg.max_chunk_fraction is None and not cfg.balance_loss


def test_options_not_given_are_not_passed():
    assert parse_train() == {}


def test_help(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "predict" in out
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for f in option_fields():
        assert (flag(f.name) in out) == f.metadata.get("cli", True)
    for own in ("--label-key", "--out", "--overwrite", "--gene-space", "--eval-data", "--classes", "--quiet"):
        assert own in out
    assert main(["predict", "--help"]) == 0
    assert "--majority-voting" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rule", "nope"], "invalid choice: 'nope'"),
        (["--lr", "abc"], "invalid float value: 'abc'"),
        (["--max-chunk-fraction", "lots"], "invalid float or none value"),
        (["--buffer-size", "500"], "buffer_size (500) must be smaller than chunk_size (200)"),
        (["--max-chunk-fraction", "1.5"], "max_chunk_fraction must be in (0.0, 1.0]"),
        (["--resume"], "resume=True needs checkpoint_dir"),
    ],
)
def test_bad_value_exits_2(stream, tmp_path, capsys, args, message):
    out = tmp_path / "c.h5ad"
    assert main(train_args(stream, out, *args)) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert not out.exists()


def test_bad_files_exit_2(stream, tmp_path, capsys):
    out = tmp_path / "c.h5ad"
    assert main(train_args(stream, out, "--gene-space", str(stream.holdout))) == 2
    assert "no gene space" in capsys.readouterr().err
    argv = train_args(stream, out)
    argv[1] = str(tmp_path / "missing.h5ad")
    assert main(argv) == 2
    assert "file not found" in capsys.readouterr().err
    assert main(train_args(stream, tmp_path / "no" / "c.h5ad")) == 2
    assert "does not exist" in capsys.readouterr().err


def test_failed_training_leaves_no_file(stream, tmp_path, capsys):
    out = tmp_path / "c.h5ad"
    argv = train_args(stream, out)
    argv[argv.index("--label-key") + 1] = "no_such_column"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "no_such_column" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_crash_while_writing_leaves_no_file(stream, tmp_path, monkeypatch):
    def broken_write(self, filename, **kw):
        with open(filename, "wb") as fh:
            fh.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(ad.AnnData, "write_h5ad", broken_write)
    out = tmp_path / "c.h5ad"
    with pytest.raises(OSError, match="disk full"):
        main(train_args(stream, out))
    assert list(tmp_path.iterdir()) == []


def test_train(trained):
    out, summary = trained
    assert "streamed 600 cells in 3 steps" in summary
    assert "coreset: 40 cells" in summary and "final macro-F1" in summary and "wall time" in summary
    coreset = ad.read_h5ad(out)
    params = coreset.uns["sccoreset"]["params"]
    assert params["rule"] == "top" and params["hidden"] == "[32]" and params["chunk_size"] == 200
    assert params["distill"] == StreamConfig().distill  # not given: the default applies
    assert coreset.n_obs == 40
    assert not [p for p in out.parent.iterdir() if ".partial" in p.name]  # no temporary file left


def test_overwrite_and_gene_space(trained, stream, capsys):
    out, _ = trained
    before = ad.read_h5ad(out)
    again = out.parent / "again.h5ad"
    again.write_bytes(b"old")
    argv2 = train_args(stream, again, "--gene-space", str(out), "--random-state", "3", "--quiet")
    assert main(argv2) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert again.read_bytes() == b"old"
    assert main([*argv2, "--overwrite"]) == 0
    assert capsys.readouterr().out == ""  # --quiet: no summary
    after = ad.read_h5ad(again)
    np.testing.assert_array_equal(after.var_names, before.var_names)  # the gene space was reused
    assert after.uns["sccoreset"]["params"]["random_state"] == 3


def test_predict(trained, stream, tmp_path, capsys):
    coreset, _ = trained
    out = tmp_path / "annotated.h5ad"
    args = ["predict", str(stream.holdout), "--coreset", str(coreset), "--out", str(out), "--device", "cpu"]
    assert main([*args, "--key-added", "pred", "--over-clustering", stream.label_key, "--majority-voting"]) == 0
    assert "predicted 120 cells" in capsys.readouterr().out
    annotated = ad.read_h5ad(out)
    for col in ("pred_prediction", "pred_confidence", "pred_majority_voting"):
        assert col in annotated.obs
    assert "pred_probabilities" in annotated.obsm
    assert main([*args, "--overwrite", "--majority-voting"]) == 2  # without --over-clustering
    assert "needs over_clustering" in capsys.readouterr().err


def test_process_group_single_process():
    import torch.distributed as dist

    options = {"device": None}
    with process_group(options, env={"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}) as (rank, world):
        assert (rank, world) == (0, 1)
        assert not dist.is_initialized()
    assert options == {"device": None}
    with process_group(options, env={}) as (rank, world):
        assert (rank, world) == (0, 1)


def test_subprocess(stream, tmp_path):
    out = tmp_path / "c.h5ad"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    r = subprocess.run(
        [sys.executable, "-m", "sccoreset", *train_args(stream, out)], capture_output=True, text=True, env=env
    )
    assert r.returncode == 0, r.stderr
    assert "coreset: 40 cells" in r.stdout
    assert "step 2" in r.stderr  # the step log, at INFO
    assert ad.read_h5ad(out).n_obs == 40
    r = subprocess.run(
        [sys.executable, "-m", "sccoreset", *train_args(stream, out)], capture_output=True, text=True, env=env
    )
    assert r.returncode == 2 and "exists" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_torchrun_two_processes(stream, tmp_path):
    """Two CPU ranks under torchrun (gloo): both train, rank 0 alone writes --out."""
    out = tmp_path / "c.h5ad"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    r = subprocess.run([*cmd, "-m", "sccoreset", *train_args(stream, out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "on 2 processes" in r.stdout and r.stdout.count("wrote") == 1
    assert ad.read_h5ad(out).n_obs == 40
    assert [p.name for p in tmp_path.iterdir()] == ["c.h5ad"]


def test_key_lists_are_comma_separated_and_leave_the_files_alone():
    ns = build_parser().parse_args(
        ["train", "--label-key", "cell_line,drug", "--budget-key", "drug", "a.h5ad", "b.h5ad", "--out", "o.h5ad"]
    )
    assert ns.label_key == ["cell_line", "drug"]
    assert [str(f) for f in ns.files] == ["a.h5ad", "b.h5ad"]
    assert config_options(ns)["budget_key"] == ("drug",)
