"""Reweighted dynamic regularization: the exact SGD step, the groups, the re-estimation
schedule, the two phases, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import nmsparse
from nmsparse.app.train.config import TrainConfig
from nmsparse.app.train.trainer import phases_of
from nmsparse.methods import Fixed, Reweighted, make_method


def one_layer(method, pattern="2:4", seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(8, 4, bias=False)
    handle = nmsparse.sparsify(layer, pattern, method)
    return layer, handle["weight"]


def sgd_step(layer, x, lr):
    dense_weight = nmsparse.handles_of(layer)[0]["weight"].dense
    opt = torch.optim.SGD(layer.parameters(), lr=lr)
    opt.zero_grad()
    layer(x).square().sum().backward()
    grad = dense_weight.grad.clone()  # before the penalty (hooks run inside step())
    dense = dense_weight.detach().clone()
    opt.step()
    return dense, grad


def expected_penalty(dense, mask, groups, lam, eps):
    """2 lam P_g W by loops over the groups."""
    out = torch.zeros_like(dense)
    rows, columns = dense.shape
    if groups == "element":
        for r in range(rows):
            for c in range(columns):
                out[r, c] = 2 * lam * dense[r, c] / (dense[r, c] ** 2 + eps)
    elif groups == "channel":
        for r in range(rows):
            out[r] = 2 * lam * dense[r] / (dense[r].square().sum() + eps)
    else:  # N:M groups of 4 along the input; only the pruned entries are penalised
        for r in range(rows):
            for start in range(0, columns, 4):
                pruned = ~mask[r, start:start + 4]
                values = dense[r, start:start + 4] * pruned
                out[r, start:start + 4] = 2 * lam * values / (values.square().sum() + eps)
    return out


@pytest.mark.parametrize("groups", ["element", "channel", "nm"])
def test_one_sgd_step_is_exact(groups):
    lam, eps, lr = 0.01, 0.05, 0.1
    layer, w = one_layer(Reweighted(penalty=lam, eps=eps, groups=groups))
    mask = w.mask.clone()
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    dense, grad = sgd_step(layer, x, lr)
    penalty = expected_penalty(dense, mask, groups, lam, eps)
    torch.testing.assert_close(w.dense.detach(), dense - lr * (grad + penalty),
                               rtol=1e-6, atol=1e-7)
    assert penalty.abs().sum() > 0


def test_block_groups_match_channel_groups_when_the_block_is_the_row():
    a, wa = one_layer(Reweighted(penalty=0.01, groups="block:8"))
    b, wb = one_layer(Reweighted(penalty=0.01, groups="channel"))
    x = torch.randn(3, 8)
    sgd_step(a, x, 0.1)
    sgd_step(b, x, 0.1)
    torch.testing.assert_close(wa.dense, wb.dense, rtol=0, atol=0)


def test_coefficients_are_held_between_re_estimations():
    layer, w = one_layer(Reweighted(penalty=0.01, update_every=3))
    x = torch.randn(3, 8)
    seen = []
    for _ in range(4):
        sgd_step(layer, x, 0.1)
        seen.append(list(w.state["coefficients"]))
    assert seen[0] == seen[1] == seen[2] != seen[3]  # steps 0 and 3 re-estimate
    first = (1 / (w.dense.detach() ** 2 + 1e-3)).flatten().tolist()
    assert seen[3] != first  # estimated before step 3's update, not after


def test_phases_regularize_then_retrain_with_fixed_masks():
    method = Reweighted()
    assert method.phases() == ("sparse", "retrain")
    assert method.phase_method("retrain") == Fixed()
    config = TrainConfig(method="reweighted", method_options={"groups": "nm"})
    phases = phases_of(config)
    assert [p.name for p in phases] == ["reweighted", "retrain"]
    assert isinstance(phases[1].method, Fixed) and phases[0].method.groups == "nm"


@pytest.mark.parametrize("options, match", [
    ({"penalty": -1.0}, "penalty"), ({"eps": 0.0}, "eps"), ({"update_every": 0}, "update_every"),
    ({"groups": "rows"}, "accepted"), ({"groups": "block:1"}, "accepted"),
])
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        make_method("reweighted", **options)


def test_nm_groups_need_an_nm_pattern():
    layer, _ = one_layer(Reweighted(groups="nm"), pattern="unstructured:0.5")
    with pytest.raises(ValueError, match="needs an N:M pattern"):
        sgd_step(layer, torch.randn(2, 8), 0.1)


def test_cli_runs_both_phases(tmp_path):
    from nmsparse.app.cli.main import main

    out = tmp_path / "run"
    assert main(["train", "--data", "digits", "--model", "mlp", "--model-option",
                 "hidden=[16]", "--method", "reweighted", "--method-option", "penalty=0.001",
                 "--method-option", "groups=nm", "--epochs", "1", "--batch-size", "64",
                 "--limit-train-batches", "3", "--limit-test-batches", "1", "--no-plots",
                 "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in records if r["kind"] == "epoch"] == ["reweighted", "retrain"]
