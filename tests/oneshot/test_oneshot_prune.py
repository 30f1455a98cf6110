"""nmsparse.prune on whole models: Wanda's mask, patterns, hooks, memory, errors."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

import nmsparse
from nmsparse.app.models.gpt import GPT, Block
from nmsparse.oneshot import PRUNERS, prune
from nmsparse.patterns import parse_pattern

PATTERNS = ["2:4", "4:8", "1:4", "unstructured:0.5"]
METHODS = PRUNERS.names()  # every registered pruner gets the contract tests


def _gpt(n_layer=2, d_model=32, seed=0):
    torch.manual_seed(seed)
    return GPT(vocab_size=64, max_seq_len=16, n_layer=n_layer, n_head=2, d_model=d_model)


def _batches(count=3, batch=2, length=16, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (batch, length), generator=generator) for _ in range(count)]


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _wanda_loop_reference(weight, inputs, n, m):
    """Score |W_ij| * ||X_j||, per row and per group of m columns, by plain loops."""
    rows, columns = weight.shape
    norms = [sum(float(inputs[t, j]) ** 2 for t in range(inputs.shape[0])) ** 0.5
             for j in range(columns)]
    mask = torch.zeros(rows, columns, dtype=torch.bool)
    for i in range(rows):
        for start in range(0, columns, m):
            scores = [(abs(float(weight[i, j])) * norms[j], j) for j in range(start, start + m)]
            for _, j in sorted(scores, key=lambda s: (-s[0], s[1]))[:n]:
                mask[i, j] = True
    return mask


def _wanda_unstructured_reference(weight, inputs, keep):
    rows, columns = weight.shape
    norms = inputs.pow(2).sum(0).sqrt()
    mask = torch.zeros(rows, columns, dtype=torch.bool)
    for i in range(rows):
        scores = [(abs(float(weight[i, j])) * float(norms[j]), j) for j in range(columns)]
        for _, j in sorted(scores, key=lambda s: (-s[0], s[1]))[:int(keep * columns)]:
            mask[i, j] = True
    return mask


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8)])
def test_wanda_mask_equals_the_loop_reference(n, m):
    layer = nn.Linear(16, 6)
    calibration = [torch.randn(5, 16) * torch.linspace(0.1, 3, 16) for _ in range(3)]
    expected = _wanda_loop_reference(layer.weight.detach().clone(), torch.cat(calibration),
                                     n, m)
    result = prune(layer, f"{n}:{m}", "wanda", calibration=calibration)
    assert torch.equal(result.masks["weight"], expected)
    assert result.mode == "whole model"  # no blocks in a lone Linear


def test_wanda_unstructured_compares_within_each_row():
    layer = nn.Linear(10, 4)
    calibration = [torch.randn(7, 10) * torch.linspace(0.1, 3, 10)]
    expected = _wanda_unstructured_reference(layer.weight.detach().clone(), calibration[0], 0.5)
    result = prune(layer, "unstructured:0.5", "wanda", calibration=calibration)
    assert torch.equal(result.masks["weight"], expected)
    assert result.masks["weight"].sum(1).tolist() == [5, 5, 5, 5]


def test_sparsegpt_on_a_single_linear_matches_its_least_squares_solution():
    # A lone Linear pruned through prune(): the kept weights are what the sweep gives on
    # the calibration Hessian, and the output error is below masking alone.
    layer = nn.Linear(8, 3, bias=False)
    inputs = torch.randn(40, 8)
    reference = layer(inputs).detach()
    dense = layer.weight.detach().clone()
    result = prune(layer, "2:4", "sparsegpt", calibration=[inputs], damp=0.0, then=None)
    mask = result.masks["weight"]
    masked_error = (inputs @ (dense * mask).t() - reference).pow(2).sum()
    pruned_error = (layer(inputs) - reference).pow(2).sum()
    assert pruned_error < masked_error
    assert torch.all(layer.weight[~mask] == 0)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("spec", PATTERNS)
def test_pruned_gpt_follows_the_pattern_and_holds_fixed_masks(method, spec):
    model = _gpt()
    result = prune(model, spec, method, calibration=_batches())
    pattern = parse_pattern(spec)
    assert result.handle is not None and result.handle.method.name == "fixed"
    sparse = {layer.name for layer in result.layers if layer.pruned}
    assert sparse == {name for name, _ in model.named_parameters()
                      if name.endswith("weight") and ("blocks" in name or "lm_head" in name)
                      and "ln" not in name}
    for name, w in result.handle.weights.items():
        assert pattern.violations(w.mask).ok, name
        assert torch.equal(w.mask, result.masks[name])
        assert torch.all(w.dense[~w.mask] == 0)
    with torch.no_grad():
        before = model(_batches(1)[0])
    nmsparse.finalize(model)
    with torch.no_grad():
        assert torch.allclose(model(_batches(1)[0]), before, atol=1e-6)
    for name, param in model.named_parameters():
        if name in sparse:
            assert pattern.violations(param).ok


def test_then_srste_continues_with_sr_ste_from_the_one_shot_mask():
    model = _gpt()
    result = prune(model, "2:4", "wanda", calibration=_batches(), then="srste")
    assert result.handle.method.name == "srste"
    for name, w in result.handle.weights.items():
        assert torch.equal(w.mask, result.masks[name])


def test_calibrated_pruning_is_closer_to_the_dense_model_than_magnitude():
    dense = _gpt(n_layer=2, d_model=64, seed=3)
    batches = _batches(count=8, batch=4)
    probe = _batches(count=1, batch=8, seed=9)[0]
    with torch.no_grad():
        reference = dense(probe)
    errors = {}
    for method in METHODS:
        model = _gpt(n_layer=2, d_model=64, seed=3)
        prune(model, "2:4", method, calibration=batches)
        with torch.no_grad():
            errors[method] = float((model(probe) - reference).pow(2).mean())
    assert errors["sparsegpt"] < errors["magnitude"]
    assert errors["wanda"] < errors["magnitude"] * 1.05


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_calibration_hooks_are_removed(method):
    model = _gpt()
    assert _hook_count(model) == 0
    prune(model, "2:4", method, calibration=_batches(), then=None)
    assert _hook_count(model) == 0


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_hooks_are_removed_and_nothing_changes_when_calibration_fails(method):
    model = _gpt()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = _batches(2) + [torch.randint(0, 64, (2, 40))]  # longer than max_seq_len
    with pytest.raises(ValueError, match="exceeds"):
        prune(model, "2:4", method, calibration=bad)
    assert _hook_count(model) == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training  # the mode is restored


def _live_hidden_states(d_model):
    return sum(1 for obj in gc.get_objects()
               if type(obj) is torch.Tensor and obj.dim() == 3 and obj.shape[-1] == d_model
               and obj.shape[:2] == (2, 16))


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_memory_does_not_grow_with_the_number_of_blocks(method):
    peaks, live = {}, {}
    for n_layer in (2, 6):
        model = _gpt(n_layer=n_layer, d_model=24)
        counts: dict[int, list[int]] = {}

        def count(module, args, counts=counts):
            # an independent count: hidden-state-shaped tensors alive in a block's first calls
            # (the chain check, then the runner's passes over the cached inputs)
            seen = counts.setdefault(id(module), [])
            if len(seen) < 3:
                seen.append(_live_hidden_states(24))

        hooks = [block.register_forward_pre_hook(count)
                 for block in model.modules() if isinstance(block, Block)]
        result = prune(model, "2:4", method, calibration=_batches(count=4), then=None,
                       exclude="lm_head")
        for hook in hooks:
            hook.remove()
        assert result.mode == "sequential blocks"
        peaks[n_layer] = result.peak_cached_bytes
        live[n_layer] = max(max(seen) for seen in counts.values())
    assert peaks[2] == peaks[6] == (4 + 1) * 2 * 16 * 24 * 4  # 4 cached batches + 1 output
    assert live[2] == live[6]


def test_magnitude_needs_no_calibration_and_prunes_convolutions():
    model = nn.Sequential(nn.Conv2d(8, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 8))
    result = prune(model, "2:4", "magnitude")
    assert [layer.pruned for layer in result.layers] == [True, True]
    assert nmsparse.check(model, "2:4").ok


def test_calibrated_methods_leave_convolutions_dense_with_a_reason():
    model = nn.Sequential(nn.Conv2d(8, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 8))
    result = prune(model, "2:4", "wanda", calibration=[torch.randn(2, 8, 8, 8)])
    conv, linear = result.layers
    assert not conv.pruned and "magnitude" in conv.reason
    assert linear.pruned


def test_calibration_batches_may_be_pairs_or_mappings():
    model = _gpt()
    pairs = [(x, x) for x in _batches()]
    first = prune(model, "2:4", "wanda", calibration=pairs, then=None).masks
    model = _gpt()
    second = prune(model, "2:4", "wanda", calibration=[{"idx": x} for x in _batches()],
                   then=None).masks
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"pruner": "obs"}, "unknown one-shot pruning method 'obs'"),
    ({"pruner": "wanda"}, "needs calibration data"),
    ({"pruner": "sparsegpt", "calibration": []}, "was empty"),
    ({"pruner": "sparsegpt", "calibration": [1, 2]}, "calibration batch must be"),
    ({"pruner": "sparsegpt", "calibration": [torch.zeros(1, 4, dtype=torch.long)],
      "blocksize": 0}, "blocksize"),
    ({"pruner": "magnitude", "blocksize": 8},
     r"'magnitude' takes no blocksize \(it takes no options\)"),
    ({"pruner": "magnitude", "pattern": "3:2"}, "invalid N:M"),
    ({"pruner": "magnitude", "then": "ste", "decay": 1e-3}, "takes no decay"),
    ({"pruner": "magnitude", "method": "wanda"}, "pruner= only"),
    ({"pruner": "magnitude", "exclude": ["typo"]}, "exclude glob 'typo' matches no"),
])
def test_bad_input_is_a_one_line_error_and_changes_nothing(kwargs, message):
    model = _gpt()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        prune(model, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert _hook_count(model) == 0


def test_an_already_sparse_model_is_refused():
    model = _gpt()
    nmsparse.sparsify(model, "2:4", method="fixed")
    with pytest.raises(ValueError, match="already sparse"):
        prune(model, "2:4", "magnitude")


def test_include_and_exclude_select_layers():
    model = _gpt()
    result = prune(model, "2:4", "magnitude", exclude="lm_head")
    assert not next(x for x in result.layers if x.name == "lm_head.weight").pruned
    assert "lm_head.weight" not in result.handle.weights


class _WithUnusedLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(8, 8)
        self.unused = nn.Linear(8, 8)

    def forward(self, x):
        return self.used(x)


def test_a_layer_no_calibration_input_reaches_is_named():
    model = _WithUnusedLayer()
    before = model.unused.weight.detach().clone()
    with pytest.raises(ValueError, match="unused.weight: no calibration input"):
        prune(model, "2:4", "wanda", calibration=[torch.randn(4, 8)])
    assert torch.equal(model.unused.weight, before) and _hook_count(model) == 0
    result = prune(model, "2:4", "wanda", calibration=[torch.randn(4, 8)], exclude="unused")
    assert [layer.pruned for layer in result.layers] == [True, False]


def test_pruner_and_then_name_the_two_methods_and_take_instances():
    from nmsparse.oneshot import SparseGPT

    batches = [torch.zeros(1, 4, dtype=torch.long)]
    by_name = prune(_gpt(), "2:4", pruner="sparsegpt", calibration=batches, then="srste",
                    damp=0.05)
    by_instance = prune(_gpt(), "2:4", pruner=SparseGPT(damp=0.05), calibration=batches,
                        then=nmsparse.SRSTE())
    assert by_name.pruner == by_instance.pruner == "sparsegpt"
    assert all(torch.equal(by_name.masks[k], by_instance.masks[k]) for k in by_name.masks)
    assert by_instance.handle.method == nmsparse.SRSTE()


def test_the_old_method_keyword_still_names_the_pruner_with_a_warning():
    with pytest.warns(DeprecationWarning, match="pruner="):
        old = prune(_gpt(), "2:4", method="magnitude")
    assert old.pruner == "magnitude"
    with pytest.warns(DeprecationWarning, match="PruneResult.pruner"):
        assert old.method == "magnitude"
