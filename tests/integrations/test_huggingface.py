"""Hugging Face transformers: Conv1D (GPT-2), tied embeddings, save_pretrained round trips,
shape changes. Tiny models are built from configs; nothing is downloaded."""

from __future__ import annotations

import copy

import pytest
import torch

import nmsparse

transformers = pytest.importorskip("transformers")

VOCAB = 64


def gpt2():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2,
                                     n_head=2, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def bert():
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=32)
    return transformers.BertForMaskedLM(config)


def llama():
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=2, max_position_embeddings=32,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(config)


MODELS = {"gpt2": gpt2, "bert": bert, "llama": llama}


def tokens(seed=0, batch=2, length=16):
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def train(model, opt, steps, seed):
    model.train()
    for step in range(steps):
        torch.manual_seed(seed + step)  # dropout draws the same on both sides of a reload
        x = tokens(seed + step)
        opt.zero_grad()
        model(input_ids=x, labels=x).loss.backward()
        opt.step()


def make(name, seed=0):
    torch.manual_seed(seed)
    model = MODELS[name]()
    return model


def test_gpt2_conv1d_is_sparse_along_its_input_axis():
    model = make("gpt2")
    handle = nmsparse.sparsify(model, "2:4")
    w = handle["transformer.h.0.attn.c_attn.weight"]
    assert w.dense.shape == (32, 96)  # (in, out)
    # every group of 4 consecutive *input* rows of each output column keeps 2
    assert w.mask.reshape(8, 4, 96).sum(1).eq(2).all()
    train(model, torch.optim.SGD(model.parameters(), lr=0.1), 2, seed=1)
    assert nmsparse.check(model, "2:4", exclude="lm_head").ok  # the tied head stays dense
    row = next(r for r in nmsparse.check(model, "2:4").rows if r.name == w.name)
    assert row.groups == 8 * 96 and row.violating_groups == 0
    table = nmsparse.summary(model, tokens())
    c_attn = next(r for r in table.rows if r.name == "transformer.h.0.attn.c_attn")
    assert c_attn.macs_dense == 32 * 32 * 96 and c_attn.macs_sparse == 32 * 32 * 96 // 2
    model.eval()
    x = tokens(5)
    expected = model(x).logits
    nmsparse.finalize(model)
    torch.testing.assert_close(model(x).logits, expected, rtol=0, atol=0)
    assert nmsparse.check(model, "2:4", exclude="lm_head").ok  # the finalized weights


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_tied_lm_head_stays_dense_by_default_and_sparse_when_asked(name):
    model = make(name)
    handle = nmsparse.sparsify(model, "2:4")
    head = [layer for layer in handle.layers if "tied to" in layer.reason]
    assert head and not head[0].sparse
    model = make(name)
    handle = nmsparse.sparsify(model, "2:4", tied="sparse")
    train(model, torch.optim.SGD(model.parameters(), lr=0.5), 3, seed=1)
    model.eval()
    x = tokens(7)
    expected = model(input_ids=x).logits
    nmsparse.finalize(model)
    torch.testing.assert_close(model(input_ids=x).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("method", ["srste", "fixed"])
def test_save_pretrained_round_trip_restores_masks_and_training_continues(name, method,
                                                                          tmp_path):
    model = make(name)
    handle = nmsparse.sparsify(model, "2:4", method, tied="sparse")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, opt, 2, seed=1)
    model.save_pretrained(tmp_path / "run")
    saved_opt = copy.deepcopy(opt.state_dict())  # the live one keeps changing
    saved_handle = handle.state_dict()
    train(model, opt, 2, seed=3)

    reloaded = type(model).from_pretrained(tmp_path / "run")
    masks = nmsparse.saved_masks(tmp_path / "run")
    assert set(masks) == set(handle.weights)
    resumed = nmsparse.sparsify(reloaded, "2:4", method, tied="sparse", masks=masks)
    for weight_name, mask in masks.items():
        assert torch.equal(resumed[weight_name].mask, mask), weight_name
    opt2 = torch.optim.SGD(reloaded.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(saved_opt)
    resumed.load_state_dict(saved_handle)
    train(reloaded, opt2, 2, seed=3)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value, rtol=0, atol=0,
                                   msg=key)


@pytest.mark.parametrize("name", list(MODELS))
def test_finalize_save_pretrained_from_pretrained(name, tmp_path):
    model = make(name)
    nmsparse.sparsify(model, "2:4")
    train(model, torch.optim.SGD(model.parameters(), lr=0.1), 2, seed=1)
    model.eval()
    x = tokens(9)
    expected = model(input_ids=x).logits
    nmsparse.finalize(model)
    model.save_pretrained(tmp_path / "final")
    plain = type(model).from_pretrained(tmp_path / "final").eval()
    assert nmsparse.check(plain, "2:4", exclude=[
        layer for layer in ("lm_head", "cls.predictions.decoder")
        if any(n.startswith(layer) for n, _ in plain.named_modules())]).ok
    torch.testing.assert_close(plain(input_ids=x).logits, expected, rtol=0, atol=0)


def test_resize_token_embeddings_with_the_tied_head_dense_just_works():
    model = make("gpt2")
    nmsparse.sparsify(model, "2:4")  # the tied head stays dense
    model.resize_token_embeddings(VOCAB + 8)
    assert model(tokens()).logits.shape[-1] == VOCAB + 8
    assert nmsparse.check(model, "2:4", exclude="lm_head").ok


def test_a_sparse_weight_that_changes_shape_is_a_clear_error():
    model = make("llama")
    handle = nmsparse.sparsify(model, "2:4")
    head = handle["lm_head.weight"]
    head.dense.data = torch.zeros(VOCAB + 8, 32)  # what an in-place resize would do
    with pytest.raises(ValueError, match="changed shape from \\(64, 32\\) to \\(72, 32\\).*"
                                         "finalize the model"):
        model(tokens())


def test_packed_export_packs_conv1d_along_its_input_axis(tmp_path):
    from nmsparse.export import load_packed, read_packed_header, save_packed

    model = make("gpt2")
    nmsparse.sparsify(model, "2:4")
    nmsparse.finalize(model)
    report = save_packed(model, tmp_path / "gpt2.safetensors", "2:4")
    conv = [layer for layer in report.layers if "c_attn" in layer.name]
    assert conv and all(layer.packed and layer.transposed for layer in conv)
    entry = read_packed_header(tmp_path / "gpt2.safetensors")["packed"][conv[0].name]
    assert entry["transposed"] is True and entry["shape"] == [32, 96]  # stored (in, out)
    state = load_packed(tmp_path / "gpt2.safetensors")
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value), key
    plain = make("gpt2")
    plain.load_state_dict(state)
    assert nmsparse.check(plain, "2:4", exclude="lm_head").ok


def test_swap_linear_layers_swaps_gpt2_conv1d_and_generate_matches():
    """GPT-2's Conv1D layers swap to NMLinear (their (in, out) weight grouped along in and
    packed as the (out, in) transpose): the logits and greedy generation match the dense
    model's, a Conv1D that is not N:M along in stays with the reason, and on the CPU the
    swapped layers prepare for the CPU kernel like any other."""
    from nmsparse.kernels import NMLinear, PreparedNMLinear, cpu, prepare_cpu, swap_linear_layers

    model = make("gpt2").eval()
    nmsparse.sparsify(model, "2:4")
    nmsparse.finalize(model)
    last = model.transformer.h[1].mlp.c_proj
    with torch.no_grad():  # the first group along in of output 0: 4 non-zeros
        last.weight[0:4, 0] = 1.0
    x = tokens()
    with torch.no_grad():
        expected = model(x).logits
        expected_ids = model.generate(x[:, :4], max_new_tokens=6, do_sample=False)
    dense_weight = model.transformer.h[0].attn.c_attn.weight.detach().clone()
    report = swap_linear_layers(model, "2:4")
    assert len(report.swapped) == 7 and "transformer.h.0.attn.c_attn" in report.swapped
    assert "not 2:4" in report.skipped["transformer.h.1.mlp.c_proj"]
    assert "shared" in report.skipped["lm_head"]
    swapped = model.transformer.h[0].attn.c_attn
    assert isinstance(swapped, NMLinear)
    assert (swapped.in_features, swapped.out_features) == (32, 96)
    assert torch.equal(swapped.dense_weight(), dense_weight.t())
    with torch.no_grad():
        assert torch.allclose(model(x).logits, expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(model.generate(x[:, :4], max_new_tokens=6, do_sample=False),
                           expected_ids)
    model = model.to(torch.bfloat16)
    with torch.no_grad():
        before = model(x).logits
    report = prepare_cpu(model)
    if cpu.isa_reason("avx512bf16") is None:  # the layout needs AVX512_BF16 and VBMI
        assert len(report.prepared) == 7, report
        assert isinstance(model.transformer.h[0].attn.c_attn, PreparedNMLinear)
    with torch.no_grad():
        assert torch.allclose(model(x).logits.float(), before.float(), atol=0.1, rtol=0.05)


def test_check_of_a_state_dict_groups_named_conv1d_weights_along_their_input_axis():
    model = make("gpt2")
    nmsparse.sparsify(model, "2:4")
    nmsparse.finalize(model)
    state = {k: v for k, v in model.state_dict().items() if "wte" not in k and "wpe" not in k}
    conv = ["*.c_attn.weight", "*.c_proj.weight", "*.c_fc.weight"]
    # read as (out, in), a correct along-input 2:4 Conv1D weight looks like a violation
    assert not nmsparse.check(state, "2:4", exclude="lm_head").ok
    report = nmsparse.check(state, "2:4", exclude="lm_head", transposed=conv)
    assert report.ok and sum(row.pattern is not None for row in report.rows) == 8
    with pytest.raises(ValueError, match="transposed glob '\\*.nothing' matches no"):
        nmsparse.check(state, "2:4", transposed="*.nothing")
    with pytest.raises(ValueError, match="transposed= applies to state dicts"):
        nmsparse.check(model, "2:4", transposed=conv)


RESIZE_CASES = {"gpt2": {"tied": "sparse"}, "bert": {"tied": "sparse"}, "llama": {}}


@pytest.mark.parametrize("name", list(RESIZE_CASES))
def test_resize_token_embeddings_keeps_a_sparse_head_sparse(name):
    model = make(name)
    handle = nmsparse.sparsify(model, "2:4", "fixed", **RESIZE_CASES[name])
    head_name = next(n for n in handle.masks() if n in ("lm_head.weight",
                                                         "cls.predictions.decoder.weight"))
    old_mask, old_dense = handle[head_name].mask.clone(), handle[head_name].dense.detach().clone()
    nmsparse.resize_token_embeddings(model, VOCAB + 8, mean_resizing=False)
    head = handle[head_name]
    assert head.module is model.get_output_embeddings()
    assert tuple(head.dense.shape) == (VOCAB + 8, 32)
    assert torch.equal(head.mask[:VOCAB], old_mask)  # a fixed mask survives exactly
    assert torch.equal(head.dense.detach()[:VOCAB], old_dense)
    assert nmsparse.check(model, "2:4").ok
    report = next(layer for layer in handle.layers if layer.name == head_name)
    assert report.shape == (VOCAB + 8, 32)
    if RESIZE_CASES[name]:  # tied: the embedding reads the head's sparse weight
        assert model.get_input_embeddings().weight.data_ptr() == head.masked.data_ptr()
    model.eval()
    expected = model(tokens()).logits
    assert expected.shape[-1] == VOCAB + 8
    nmsparse.finalize(model)
    torch.testing.assert_close(model(tokens()).logits, expected, rtol=0, atol=0)


def test_training_continues_after_resizing_a_sparse_head():
    model = make("llama")
    handle = nmsparse.sparsify(model, "2:4", "srste", decay=0.1)
    nmsparse.resize_token_embeddings(model, VOCAB + 8, mean_resizing=False)
    head = handle["lm_head.weight"]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # after the resize: a new Parameter
    before, mask = head.dense.detach().clone(), head.mask.clone()
    x = torch.randint(1, VOCAB + 8, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=x, labels=x).loss.backward()
    grad = head.dense.grad.clone()
    opt.step()
    expected = before - 0.1 * (grad + 0.1 * (~mask) * before)  # the SR-STE step, on the new head
    torch.testing.assert_close(head.dense.detach(), expected)


def test_a_plain_resize_of_a_sparse_head_warns_instead_of_going_dense_silently():
    from nmsparse.engine.swap_guard import SparseModuleReplacedWarning

    model = make("llama")
    nmsparse.sparsify(model, "2:4")
    with pytest.warns(SparseModuleReplacedWarning, match="lm_head.weight was replaced by a "
                                                         "Linear.*nmsparse.resize_token_embed"):
        model.resize_token_embeddings(VOCAB + 8, mean_resizing=False)


def test_wrapping_a_sparse_module_does_not_warn(recwarn):
    model = make("llama")
    nmsparse.sparsify(model, "2:4")
    model.lm_head = torch.nn.Sequential(model.lm_head)  # an adapter wrapping the layer
    assert not [w for w in recwarn if "replaced" in str(w.message)]


def test_resize_refuses_a_pattern_whose_masks_cannot_follow_and_changes_nothing():
    model = make("llama")
    nmsparse.sparsify(model, {"lm_head": "unstructured:0.5", "*": "2:4"})
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="only N:M patterns keep their masks.*finalize"):
        nmsparse.resize_token_embeddings(model, VOCAB + 8)
    assert model.get_output_embeddings().weight.shape[0] == VOCAB
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
