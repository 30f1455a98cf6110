"""MaskLLM and ProxSparse on a tiny Llama built from its config (no downloads), through the
Python API: ``prune(..., then=...)`` and ``sparsify(model, "2:4", method=..., masks=...)``."""

from __future__ import annotations

import copy

import pytest
import torch

import nmsparse
from nmsparse.methods.maskllm import LOGITS
from nmsparse.oneshot import prune

transformers = pytest.importorskip("transformers")  # in the test extra


def llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config)


def batches(count=3):
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, 96, (2, 16), generator=generator) for _ in range(count)]


def train(model, steps=3):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    losses = []
    for ids in batches(steps):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def finalized_like_plain(model):
    plain = set(llama().state_dict())
    nmsparse.finalize(model)
    assert set(model.state_dict()) == plain
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(batches(1)[0]).logits).all()


def test_sparsegpt_then_maskllm_learns_logits_with_frozen_weights():
    model = llama()
    result = prune(model, "2:4", "sparsegpt", calibration=batches(),
                   then=nmsparse.make_method("maskllm", steps=3, lr=0.01))
    handle = result.handle
    weights = {name: w.dense.detach().clone() for name, w in handle.weights.items()}
    start = {name: w.state[LOGITS].detach().clone() for name, w in handle.weights.items()}
    train(model)
    assert handle.steps == 3
    for name, w in handle.weights.items():
        assert torch.equal(w.dense.detach(), weights[name]), name  # frozen
        assert not torch.equal(w.state[LOGITS].detach(), start[name]), name  # learned
        assert nmsparse.parse_pattern("2:4").violations(w.mask).ok
    finalized_like_plain(model)


def test_sparsify_with_a_sparsegpt_prior_on_the_dense_weights():
    model = llama()
    pruned = copy.deepcopy(model)
    masks = prune(pruned, "2:4", "sparsegpt", calibration=batches(), then=None).masks
    # sparsify keeps the given tensors as its live mask buffers: compare against copies
    given = {name: mask.clone() for name, mask in masks.items()}
    handle = nmsparse.sparsify(model, "2:4", method="maskllm", masks=given,
                               include=list(masks))
    assert set(handle.weights) == set(masks)
    agree = [float((w.mask == masks[name]).float().mean()) for name, w in handle.weights.items()]
    assert min(agree) > 0.75  # the prior's candidates start higher
    train(model, steps=2)
    finalized_like_plain(model)


def test_proxsparse_then_restores_the_weights_it_started_from():
    model = llama()
    handle = nmsparse.sparsify(model, "2:4", method="proxsparse", lambda1=0.05)
    start = {name: w.dense.detach().clone() for name, w in handle.weights.items()}
    train(model)
    masks = {name: w.mask.clone() for name, w in handle.weights.items()}
    nmsparse.finalize(model)
    for name, weight in model.named_parameters():
        if name in start:
            assert torch.equal(weight.detach(), start[name] * masks[name]), name
