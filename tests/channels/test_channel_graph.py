"""The channel dependency graph: which slices are coupled, what is pinned, and that
permuting every free group keeps the function (the graph is complete)."""

from __future__ import annotations

import pytest
import torch
from channel_models import Concat, Depthwise, Residual, randomise_norms

from nmsparse.app.models import create_model
from nmsparse.channels import ChannelGroup, Slice, TraceError, channel_graph, permute_group
from nmsparse.channels.groups import check_groups


def group_with(groups, tensor, role, dim=None):
    found = [g for g in groups for s in g.members
             if s.tensor == tensor and s.role == role and (dim is None or s.dim == dim)]
    assert found, f"no group has {tensor} as {role}"
    return found[0]


def scramble_all(model, groups, seed=0):
    generator = torch.Generator().manual_seed(seed)
    moved = 0
    for group in groups:
        if group.free and group.size > 1:
            permute_group(model, group, torch.randperm(group.size, generator=generator))
            moved += 1
    return moved


def assert_same_function(model, example, groups):
    model.eval()
    randomise_norms(model)
    call = (lambda: model(**example)) if isinstance(example, dict) else (lambda: model(example))
    with torch.no_grad():
        before = call()
        moved = scramble_all(model, groups)
        after = call()
    before = before if isinstance(before, torch.Tensor) else before[0]
    after = after if isinstance(after, torch.Tensor) else after[0]
    assert moved > 0
    # the same sums in another order: equal up to float32 rounding
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5 * before.abs().max().item())


def test_residual_adds_tie_all_writers_of_the_stream():
    model = Residual()
    groups = channel_graph(model, torch.randn(2, 3, 6, 6))
    stream = group_with(groups, "stem.weight", "producer")
    assert {s.tensor for s in stream.producers} == {"stem.weight", "stem.bias", "a.weight",
                                                     "a.bias", "b.bias", "b.weight"}
    assert {s.tensor for s in stream.consumers} == {"a.weight", "b.weight", "fc.weight"}
    assert {s.tensor for s in stream.role("follower")} == {
        "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"}
    assert stream.free and stream.size == 8
    assert not group_with(groups, "fc.weight", "producer").free  # the output
    assert not group_with(groups, "stem.weight", "consumer").free  # the input
    check_groups(model, groups)
    assert_same_function(model, torch.randn(2, 3, 6, 6), groups)


def test_concatenation_gives_each_part_its_offset():
    model = Concat()
    groups = channel_graph(model, torch.randn(2, 3, 5, 5))
    left = group_with(groups, "left.weight", "producer")
    right = group_with(groups, "right.weight", "producer")
    assert left is not right and (left.size, right.size) == (4, 8)
    assert Slice("mix.weight", 1, 0, 4, "consumer") in left.members
    assert Slice("mix.weight", 1, 4, 8, "consumer") in right.members
    assert Slice("bn.running_var", 0, 4, 8, "follower") in right.members
    assert_same_function(model, torch.randn(2, 3, 5, 5), groups)


def test_depthwise_conv_ties_its_input_to_its_output():
    model = Depthwise()
    groups = channel_graph(model, torch.randn(1, 3, 6, 6))
    group = group_with(groups, "expand.weight", "producer")
    assert Slice("depthwise.weight", 0, 0, 8, "follower") in group.members
    assert Slice("project.weight", 1, 0, 8, "consumer") in group.members
    assert group.free
    assert_same_function(model, torch.randn(1, 3, 6, 6), groups)


def test_grouped_conv_pins_its_channels():
    groups = channel_graph(Depthwise(groups=2), torch.randn(1, 3, 6, 6))
    group = group_with(groups, "expand.weight", "producer")
    assert not group.free and "grouped conv" in group.pinned[0]


def test_layernorm_and_attention_in_vit():
    model = create_model("vit_tiny", input_shape=(1, 16, 16), num_classes=3, depth=2)
    groups = channel_graph(model, torch.randn(2, 1, 16, 16))
    stream = group_with(groups, "patch_embed.weight", "producer")
    followers = {s.tensor for s in stream.role("follower")}
    assert {"blocks.0.norm1.weight", "norm.bias", "cls_token", "pos_embed"} <= followers
    assert "blocks.1.attn.in_proj_weight" in {s.tensor for s in stream.consumers}
    assert "blocks.0.attn.out_proj.weight" in {s.tensor for s in stream.producers}
    assert stream.free
    assert_same_function(model, torch.randn(2, 1, 16, 16), groups)


def test_gpt_attention_heads_are_pinned_and_the_rest_is_free():
    model = create_model("gpt_tiny", input_shape=(8,), num_classes=32, task="language_model",
                         n_layer=1, d_model=32, n_head=2)
    tokens = torch.randint(0, 32, (2, 8))
    groups = channel_graph(model, tokens)
    qkv = group_with(groups, "blocks.0.attn.qkv.weight", "producer")
    assert not qkv.free and "split" in qkv.pinned[0]
    heads = group_with(groups, "blocks.0.attn.proj.weight", "consumer")
    assert not heads.free
    assert group_with(groups, "blocks.0.mlp.fc.weight", "producer").free
    stream = group_with(groups, "tok_emb.weight", "producer", dim=1)
    assert stream.free and "lm_head.weight" in {s.tensor for s in stream.consumers}
    assert_same_function(model, tokens, groups)


def test_mlp_chain():
    model = create_model("mlp", input_shape=(1, 4, 4), num_classes=3, hidden=(8, 8))
    groups = channel_graph(model, torch.randn(2, 1, 4, 4))
    assert [g.size for g in groups if g.free] == [8, 8]
    assert_same_function(model, torch.randn(2, 1, 4, 4), groups)


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_hugging_face_architectures(arch):
    transformers = pytest.importorskip("transformers")
    small = dict(vocab_size=64, num_hidden_layers=1, num_attention_heads=2,
                 max_position_embeddings=16)
    if arch == "bert":
        model = transformers.BertModel(transformers.BertConfig(
            hidden_size=16, intermediate_size=32, **small))
    elif arch == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=16,
            bos_token_id=0, eos_token_id=0))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=16, intermediate_size=32, num_key_value_heads=2, **small))
    example = {"input_ids": torch.randint(0, 64, (2, 6))}
    groups = channel_graph(model, example)
    free = [g for g in groups if g.free]
    assert free, [g.describe() for g in groups]
    # every feed-forward hidden space is free; every split into heads is pinned
    hidden = 64 if arch == "gpt2" else 32  # GPT-2's feed-forward is 4 x n_embd
    assert any(g.size == hidden and g.free for g in groups)
    assert any("heads" in reason or "split" in reason for g in groups for reason in g.pinned)
    assert_same_function(model, example, groups)


def test_untraceable_model_gets_a_one_line_error_and_opaque_overrides():
    model = Residual()
    with pytest.raises(TraceError, match="cannot trace Residual.*opaque") as caught:
        channel_graph(model, torch.randn(2, 5, 6, 6))  # wrong channel count
    assert "\n" not in str(caught.value)
    groups = channel_graph(model, torch.randn(2, 3, 6, 6), opaque=["b"])
    stream = group_with(groups, "stem.weight", "producer")
    assert not stream.free and "opaque module b" in stream.pinned[0]


def test_hand_written_groups_are_checked_and_pinned_ones_refused():
    model = Residual()
    with pytest.raises(ValueError, match="not a parameter"):
        check_groups(model, [ChannelGroup(8, [Slice("nope.weight", 0, 0, 8, "producer")])])
    with pytest.raises(ValueError, match="does not fit"):
        check_groups(model, [ChannelGroup(9, [Slice("a.weight", 0, 0, 9, "producer")])])
    with pytest.raises(ValueError, match="pinned"):
        permute_group(model, ChannelGroup(8, [], ["output"]), torch.arange(8))
    with pytest.raises(ValueError, match="permutation"):
        permute_group(model, ChannelGroup(8, []), torch.zeros(8))
    with pytest.raises(ValueError, match="role"):
        Slice("a.weight", 0, 0, 8, "reader")
