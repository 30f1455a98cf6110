"""One selection for every verb (:func:`nmsparse.engine.selection.select`): the same glob mistake
is the same one-line error in each, and ``prune`` makes sparse exactly what it selected."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nmsparse
from nmsparse.engine.selection import select
from nmsparse.export import save_packed
from nmsparse.kernels import plan, swap_linear_layers


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))


def _finalized() -> nn.Sequential:
    model = _model()
    nmsparse.sparsify(model, "2:4", "fixed")
    return nmsparse.finalize(model)


VERBS = {
    "sparsify": lambda model, **globs: nmsparse.sparsify(model, "2:4", **globs),
    "prune": lambda model, **globs: nmsparse.prune(model, "2:4", "magnitude", **globs),
    "check": lambda model, **globs: nmsparse.check(model, "2:4", **globs),
    "save_packed": lambda model, tmp_path, **globs: save_packed(
        model, tmp_path / "model.nmp", "2:4", **globs),
    "swap_linear_layers": lambda model, **globs: swap_linear_layers(model, "2:4", **globs),
    "accelerate plan": lambda model, **globs: plan(model, **globs),
}


def _call(verb: str, model: nn.Module, tmp_path, **globs):
    if verb == "save_packed":
        return VERBS[verb](model, tmp_path, **globs)
    return VERBS[verb](model, **globs)


@pytest.mark.parametrize("verb", list(VERBS))
@pytest.mark.parametrize("which", ["include", "exclude"])
def test_a_glob_matching_nothing_is_the_same_error_in_every_verb(verb, which, tmp_path):
    model = _finalized() if verb in ("swap_linear_layers", "accelerate plan") else _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = (f"{which} glob 'typo' matches no eligible layer; eligible layers: 0, 2")
    with pytest.raises(ValueError) as raised:
        _call(verb, model, tmp_path, **{which: ["typo"]})
    assert str(raised.value) == expected  # one line, the same words everywhere
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing changed


def test_prune_makes_sparse_exactly_what_it_selected():
    model = _model()
    result = nmsparse.prune(model, "2:4", "magnitude", exclude="2")
    assert [layer.pruned for layer in result.layers] == [True, False]
    assert list(result.handle.weights) == ["0.weight"]
    assert result.layers[1].reason == "excluded by '2'"  # the words sparsify uses


def test_select_reports_every_rule():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(6, 4), nn.Linear(8, 8))
    model[2].weight = model[0].weight  # tied
    rows = {c.name: c for c in select(model, "2:4", exclude="1")}
    assert rows["1.weight"].reason == "excluded by '1'" and not rows["1.weight"].requested
    assert rows["0.weight"].pattern is None and rows["0.weight"].reason.startswith("tied to 2")
    shared = {c.name: c for c in select(model, "2:4", tied="sparse")}
    assert str(shared["0.weight"].pattern) == "2:4"
    assert shared["2.weight"].reason == "tied to 0.weight: reads its sparse weight"
    assert "not divisible by M=4" in shared["1.weight"].reason
