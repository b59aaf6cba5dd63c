"""refit_heads: a second pass over the files that retrains the heads alone, on the frozen trunk."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sccoreset as scc
from sccoreset._errors import InputError

FAST = dict(chunk_size=300, buffer_size=60, epochs_per_step=2, final_epochs=1, progress=False, n_top_genes=100)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def test_refit_changes_the_heads_alone_and_reads_every_cell(small_stream):
    keys = ["cell_type", "lineage"]
    with scc.tl.stream_events(small_stream.files, keys, refit_heads=2, eval_data=small_stream.holdout, **FAST) as ev:
        events = []
        for event in ev:
            events.append(event)
            if event["step"] == "final":
                after_stream = snapshot(event["model"])
        model = events[-1]["model"]
        coreset = ev.coreset()
    refits = [e for e in events if e["step"] == "refit"]
    assert [e["refit_pass"] for e in refits] == [0, 1]
    assert all(e["n_chunk"] == 4 * 300 for e in refits)  # every cell of the files, once a pass
    head = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][-1]
    now = snapshot(model)  # the coreset holds the model on the CPU
    for name, value in after_stream.items():
        if name.startswith(head + "."):
            assert not torch.equal(value, now[name]), name
        else:
            torch.testing.assert_close(value, now[name], rtol=0, atol=0)
    final = coreset.uns["sccoreset"]["history"]["final"]
    assert len(final["refit_losses"]) == 2 and np.isfinite(final["refit_losses"]).all()
    # the history's final figures are those of the model handed back: after the refit
    assert final["macro_f1"] == refits[-1]["macro_f1"]
    assert final["tasks"]["lineage"]["macro_f1"] == refits[-1]["task_metrics"][1]["macro_f1"]


def test_without_refit_the_history_keeps_the_consolidation_figures(small_stream):
    coreset = scc.tl.stream_train(small_stream.files, "cell_type", eval_data=small_stream.holdout, **FAST)
    final = coreset.uns["sccoreset"]["history"]["final"]
    assert "refit_losses" not in final and "macro_f1" in final


def test_refit_needs_the_model_output_to_be_its_last_linear_layer(small_stream):
    n_classes = 12
    model = torch.nn.Sequential(torch.nn.Linear(100, 16), torch.nn.ReLU(), torch.nn.Linear(16, n_classes),
                                torch.nn.Tanh())  # fmt: skip
    with pytest.raises(InputError, match=r"refit_heads: the model.s output is not its last torch\.nn\.Linear"):
        scc.tl.stream_train(small_stream.files, "cell_type", model=model, refit_heads=1, **FAST)


def test_refit_heads_is_checked():
    with pytest.raises(InputError, match="refit_heads must be"):
        scc.tl.StreamConfig(refit_heads=-1)


@pytest.mark.parametrize(
    ("options", "message"),
    [({"refit_heads": 1}, r"refit_heads runs in one process; under torch\.distributed"),
     ({"rule": "herding"}, r"rule='herding' .* does not run under torch\.distributed")],
)  # fmt: skip
def test_one_process_options_are_refused_under_torch_distributed_before_any_work(
    small_stream, monkeypatch, options, message
):
    import sccoreset.tl._session as session

    monkeypatch.setattr(session, "rank_world", lambda: (0, 2))
    monkeypatch.setattr(session, "fit_sources", lambda *a, **k: pytest.fail("the gene-space pass ran"))
    with pytest.raises(InputError, match=message):
        scc.tl.stream_train(small_stream.files, "cell_type", **{**FAST, **options})
