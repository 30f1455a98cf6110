"""PEFT LoRA on sparse models, with the real peft: training keeps the base N:M,
``nmsparse.merge_lora`` merges keeping N:M and says what the pattern dropped, and PEFT's own
merges are never silent (re-masked with a warning, at unload or at finalize). Tiny models are
built from configs; nothing is downloaded."""

from __future__ import annotations

import pytest
import torch

import nmsparse
from nmsparse.lora import LoraMergeWarning

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

VOCAB = 64
LORA_OUT = "*lora_*"  # the adapters themselves are dense layers: check the base


def llama():
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=2, max_position_embeddings=16,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(config), ["q_proj", "v_proj", "up_proj"]


def gpt2():  # Conv1D: (in, out) weights, LoRA with fan_in_fan_out
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=1,
                                     n_head=2, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config), ["c_attn", "c_fc"]


MODELS = {"llama": llama, "gpt2": gpt2}
IDS = torch.randint(1, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))


def lora_model(name: str, method: str = "srste", finalized: bool = False):
    """A sparse tiny model with a LoRA trained 4 steps (fused AdamW, as HF Trainer's default)."""
    torch.manual_seed(0)
    model, targets = MODELS[name]()
    handle = nmsparse.sparsify(model, "2:4", method)
    if finalized:
        nmsparse.finalize(model)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                             fan_in_fan_out=name == "gpt2")
    wrapped = peft.get_peft_model(model, config)
    opt = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=5e-2,
                            fused=True)
    for _ in range(4):
        opt.zero_grad()
        wrapped(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
    wrapped.eval()
    return wrapped, handle


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def lora_deltas(wrapped) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{base weight name: (its dense weight, the adapter's delta)}`` before merging."""
    out = {}
    for name, module in wrapped.base_model.model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            base = module.get_base_layer()
            with torch.no_grad():
                out[name + ".weight"] = (base._parameters["weight"].detach().clone(),
                                         module.get_delta_weight("default"))
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_training_a_lora_keeps_the_base_sparse(name):
    torch.manual_seed(0)
    model, _ = MODELS[name]()
    handle = nmsparse.sparsify(model, "2:4")
    before = {w.name: (w.dense.detach().clone(), w.mask.clone()) for w in handle}
    wrapped, handle = lora_model(name)
    for w in handle:
        dense, mask = before[w.name]
        assert torch.equal(w.dense.detach(), dense) and torch.equal(w.mask, mask), w.name
    assert nmsparse.check(wrapped, "2:4", exclude=[LORA_OUT, "*lm_head"]).ok
    assert any(p.requires_grad and p.abs().sum() > 0 for n, p in wrapped.named_parameters()
               if "lora_B" in n)  # the adapters trained


@pytest.mark.parametrize("method", ["fixed", "srste"])
@pytest.mark.parametrize("name", list(MODELS))
def test_merge_lora_keeps_n_m_and_reports_what_it_dropped(name, method):
    wrapped, handle = lora_model(name, method)
    deltas = lora_deltas(wrapped)
    with_lora = logits(wrapped)
    result = nmsparse.merge_lora(wrapped)
    model = result.model
    assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in model.modules())
    assert nmsparse.check(model, "2:4", exclude="lm_head").ok
    assert {row.name for row in result.layers} == set(deltas)
    for row in result.layers:
        w = handle[row.name]
        dense, delta = deltas[row.name]
        merged = dense + delta
        if method == "fixed":  # the mask stays, the delta is masked to it
            merged = merged * w.mask
        else:  # the mask follows |W + delta|, the SR-STE rule
            assert torch.equal(w.mask, w.pattern.mask(merged.abs()))
        torch.testing.assert_close(w.dense.detach(), merged, rtol=0, atol=1e-6)
        torch.testing.assert_close(w.module.weight.detach(), merged * w.mask, rtol=0,
                                   atol=1e-6)
        intended = dense * before_mask(row, deltas, w) + delta
        dropped = (intended - merged * w.mask).norm() / delta.norm()
        assert row.dropped == pytest.approx(float(dropped), rel=1e-4)
        assert 0.2 < row.dropped < 0.95  # a dense delta loses a share under 2:4
    assert "dropped" in str(result)
    # the merged sparse model computes what it computed; finalize changes nothing
    merged_logits = logits(model)
    assert not torch.allclose(merged_logits, with_lora)  # the pattern dropped part of it
    nmsparse.finalize(model)
    torch.testing.assert_close(logits(model), merged_logits, rtol=0, atol=0)


def before_mask(row, deltas, w):
    """The mask before merging: the N:M mask of the dense weight (magnitude methods) or, for
    a fixed mask, the current one (the merge kept it)."""
    dense = deltas[row.name][0]
    return w.pattern.mask(dense.abs()) if not isinstance(w.method, nmsparse.Fixed) else w.mask


@pytest.mark.parametrize("safe_merge", [False, True])
@pytest.mark.parametrize("name", list(MODELS))
def test_peft_merge_and_unload_is_re_masked_with_a_warning(name, safe_merge):
    reference = nmsparse.merge_lora(lora_model(name)[0]).model
    wrapped, handle = lora_model(name)
    with pytest.warns(LoraMergeWarning, match=r"re-masked to 2:4, dropping \d+\.\d% .*merge_lora"):
        model = wrapped.merge_and_unload(safe_merge=safe_merge)
    assert nmsparse.check(model, "2:4", exclude="lm_head").ok
    # the same result as merge_lora: the delta is in, masked by the SR-STE rule
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=1e-6, msg=key)
    expected = logits(model)
    nmsparse.finalize(model)  # nothing is dropped later
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=0)


@pytest.mark.parametrize("safe_merge", [False, True])
def test_a_peft_merge_without_unload_shows_in_check_and_survives_finalize(safe_merge):
    reference = nmsparse.merge_lora(lora_model("llama")[0]).model
    wrapped, _ = lora_model("llama")
    wrapped.merge_adapter(safe_merge=safe_merge)
    if not safe_merge:  # the merge wrote into the forward weights: check sees them
        report = nmsparse.check(wrapped, "2:4", exclude=[LORA_OUT, "*lm_head"])
        assert not report.ok and any("q_proj" in row.name for row in report.violations)
    with pytest.warns(LoraMergeWarning, match="dropping"):
        nmsparse.finalize(wrapped)
    model = wrapped.base_model.model
    got = model.state_dict()
    nmsparse.finalize(reference)  # merge_lora, then finalize: the same weights
    for key, value in reference.state_dict().items():
        for target in ("q_proj", "v_proj", "up_proj"):
            key = key.replace(f".{target}.", f".{target}.base_layer.")
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6, msg=key)


def test_merge_lora_on_a_finalized_model_takes_the_pattern():
    wrapped, _ = lora_model("llama", finalized=True)
    with pytest.raises(ValueError, match=r"pattern= .*merge_lora\(model, '2:4'\)"):
        nmsparse.merge_lora(wrapped)
    deltas = lora_deltas(wrapped)
    result = nmsparse.merge_lora(wrapped, "2:4")
    model = result.model
    assert nmsparse.check(model, "2:4", exclude="lm_head").ok
    for row in result.layers:
        dense, delta = deltas[row.name]
        keep = dense != 0  # a finalized 2:4 weight: its non-zeros are the kept entries
        assert str(row.pattern) == "2:4"
        weight = model.get_submodule(row.name[:-len(".weight")]).weight
        torch.testing.assert_close(weight.detach(), dense + delta * keep, rtol=0, atol=1e-6)
        assert row.dropped == pytest.approx(float((delta * ~keep).norm() / delta.norm()),
                                            rel=1e-4)


def test_peft_merge_on_a_finalized_model_goes_dense_and_check_says_so():
    wrapped, _ = lora_model("llama", finalized=True)
    model = wrapped.merge_and_unload()
    assert not nmsparse.check(model, "2:4", exclude="lm_head").ok


def test_merge_lora_refuses_adapters_peft_already_merged():
    wrapped, _ = lora_model("llama")
    with pytest.warns(LoraMergeWarning):
        wrapped.merge_adapter()
        with pytest.raises(ValueError, match="unmerge_adapter"):
            nmsparse.merge_lora(wrapped)
        wrapped.unmerge_adapter()
        nmsparse.finalize(wrapped)


def test_trainer_with_default_arguments_trains_a_lora_then_merge_lora(tmp_path):
    torch.manual_seed(0)
    model, targets = llama()
    handle = nmsparse.sparsify(model, "2:4")
    masks = {w.name: w.mask.clone() for w in handle}
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=targets))
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3,
                                          per_device_train_batch_size=4, use_cpu=True,
                                          report_to=[], save_strategy="no",
                                          disable_tqdm=True, learning_rate=1e-2)
    transformers.Trainer(model=wrapped, args=args,
                         train_dataset=[{"input_ids": r, "labels": r} for r in IDS]).train()
    assert all(torch.equal(w.mask, masks[w.name]) for w in handle)  # the base is untouched
    result = nmsparse.merge_lora(wrapped)
    assert len(result.layers) == 3 and all(row.delta_norm > 0 for row in result.layers)
    assert nmsparse.check(result.model, "2:4", exclude="lm_head").ok
