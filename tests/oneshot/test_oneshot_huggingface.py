"""nmsparse.prune on Hugging Face causal LMs built from tiny configs (no downloads)."""

from __future__ import annotations

import importlib

import pytest
import torch

import nmsparse
from nmsparse.oneshot import prune
from nmsparse.patterns import parse_pattern

transformers = pytest.importorskip("transformers")  # in the test extra


def _llama():
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config)


def _gpt2():
    config = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4,
                                     n_positions=32, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def _batches(count=3):
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, 96, (2, 16), generator=generator) for _ in range(count)]


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("spec", ["2:4", "unstructured:0.5"])
def test_llama_linear_layers_are_pruned_and_held_by_sparsify(method, spec):
    torch.manual_seed(0)
    model = _llama()
    hooks = _hooks(model)
    result = prune(model, spec, method, calibration=_batches())
    assert _hooks(model) == hooks
    pattern = parse_pattern(spec)
    assert result.mode == ("no calibration" if method == "magnitude" else "sequential blocks")
    assert len(result.handle.weights) == 2 * 7 + 1  # q k v o gate up down, and the head
    for w in result.handle.weights.values():
        assert pattern.violations(w.mask).ok
    with torch.no_grad():
        logits = model(_batches(1)[0]).logits
    assert torch.isfinite(logits).all()
    nmsparse.finalize(model)


def test_llama_sparsegpt_is_closer_to_dense_than_magnitude():
    probe = _batches(1)[0]
    errors = {}
    for method in ("magnitude", "sparsegpt"):
        torch.manual_seed(0)
        model = _llama()
        with torch.no_grad():
            dense = model(probe).logits
        prune(model, "2:4", method, calibration=_batches(6))
        with torch.no_grad():
            errors[method] = float((model(probe).logits - dense).pow(2).mean())
    assert errors["sparsegpt"] < errors["magnitude"]


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_gpt2_conv1d_is_pruned_along_its_input_dimension_and_held(method):
    torch.manual_seed(0)
    model = _gpt2()
    result = prune(model, "2:4", method, calibration=_batches())
    assert _hooks(model) == 0
    conv1d = [layer for layer in result.layers if layer.kind == "Conv1D"]
    assert len(conv1d) == 8 and all(layer.pruned for layer in conv1d)
    head = next(layer for layer in result.layers if layer.name == "lm_head.weight")
    assert not head.pruned and "tied to transformer.wte.weight" in head.reason
    pattern = parse_pattern("2:4")
    for layer in conv1d:
        module = model.get_submodule(layer.name.rsplit(".", 1)[0])
        weight = module._parameters["weight"]  # the dense Parameter, stored (in, out)
        mask = result.masks[layer.name]
        assert torch.equal(result.handle[layer.name].mask, mask)  # held by sparsify
        assert mask.shape == weight.shape
        assert pattern.violations(weight.detach().t()).ok  # groups along the input dim
        assert pattern.violations(mask.t()).ok
        assert torch.all(weight[~mask] == 0)
    with torch.no_grad():
        assert torch.isfinite(model(_batches(1)[0]).logits).all()


def test_gpt2_calibration_as_keyword_batches():
    torch.manual_seed(0)
    model = _gpt2()
    batches = [{"input_ids": x, "attention_mask": torch.ones_like(x)} for x in _batches()]
    result = prune(model, "4:8", "sparsegpt", calibration=batches)
    assert result.mode == "sequential blocks" and result.calibration_rows == 3 * 2 * 16
    assert model.config.use_cache  # restored after calibration


def test_llama_layers_reading_one_input_share_one_sparsegpt_factor(monkeypatch):
    # q/k/v read the same hidden states, gate/up too: 4 factors of H^-1 per block, not 7, and
    # the pruned weights are bit for bit those of one factor per layer.
    prune_module = importlib.import_module("nmsparse.oneshot.prune")
    sparsegpt_module = importlib.import_module("nmsparse.oneshot.sparsegpt")

    def pruned(share):
        torch.manual_seed(0)
        model = _llama()
        if not share:
            monkeypatch.setattr(prune_module, "_share_statistics", lambda statistics: None)
        factor = sparsegpt_module.inverse_hessian_factor
        widths = []

        def counted(hessian, damp, **options):
            widths.append(hessian.shape[0])
            return factor(hessian, damp, **options)

        monkeypatch.setattr(sparsegpt_module, "inverse_hessian_factor", counted)
        prune(model, "2:4", "sparsegpt", calibration=_batches(), then=None)
        monkeypatch.undo()
        return {n: p.detach().clone() for n, p in model.named_parameters()}, widths

    shared, shared_widths = pruned(share=True)
    alone, alone_widths = pruned(share=False)
    assert shared_widths == [32, 32, 32, 64] * 2 + [32]  # qkv, o, gate/up, down; the head
    assert alone_widths == ([32] * 6 + [64]) * 2 + [32]
    assert shared.keys() == alone.keys()
    for name, value in shared.items():
        assert torch.equal(value.view(torch.int32), alone[name].view(torch.int32)), name
