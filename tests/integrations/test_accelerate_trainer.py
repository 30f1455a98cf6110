"""accelerate (gradient accumulation, bf16) and the Hugging Face Trainer: SR-STE stays exact,
as in a plain PyTorch loop."""

from __future__ import annotations

import pytest
import torch
from plain_loop import BATCH, DECAY, LR, data, network, plain_loop
from torch import nn

import nmsparse

accelerate = pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("accumulate", [1, 2, 4])
def test_accelerate_matches_a_plain_loop(accumulate, bf16):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # each test its own settings
    accelerator = Accelerator(gradient_accumulation_steps=accumulate,
                              mixed_precision="bf16" if bf16 else "no", cpu=True)
    x, y = data(3 * accumulate)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y),
                                         batch_size=BATCH, shuffle=False)
    model = network()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    for xb, yb in loader:
        with accelerator.accumulate(model):
            loss = nn.functional.cross_entropy(model(xb), yb)
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad()
    trained = accelerator.unwrap_model(model)
    (handle,) = nmsparse.handles_of(trained)
    assert handle.steps == 3  # the wrapping optimizer's step runs the methods, once
    reference = plain_loop(3, accumulate, bf16)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(trained.state_dict()[key], value, rtol=0, atol=0, msg=key)
    AcceleratorState._reset_state(True)


def test_hugging_face_trainer_matches_a_plain_loop(tmp_path):
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1,
                                     n_head=2, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
                                     bos_token_id=0, eos_token_id=0)
    ids = torch.randint(1, 64, (8, 16), generator=torch.Generator().manual_seed(2))

    def make():
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(config)
        nmsparse.sparsify(model, "2:4", decay=DECAY)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        return model, opt

    model, opt = make()
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=3,
        max_grad_norm=0.0, report_to=[], save_strategy="no", use_cpu=True,
        logging_strategy="no", disable_tqdm=True, seed=0)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    transformers.Trainer(model=model, args=args, train_dataset=dataset,
                         optimizers=(opt, schedule)).train()

    reference, ref_opt = make()
    for _ in range(3):  # one batch holds the whole data set: the order inside it aside
        ref_opt.zero_grad()
        # the Trainer divides the summed token loss by its count of label tokens
        reference(input_ids=ids, labels=ids, num_items_in_batch=ids.numel()).loss.backward()
        ref_opt.step()
    for key, value in reference.state_dict().items():
        # one batch, rows in another order: sums differ by rounding only
        torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-6, atol=1e-7,
                                   msg=key)
    assert nmsparse.check(model, "2:4", exclude="lm_head").ok


def _tiny_llama(tied: bool):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=2, max_position_embeddings=16,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0,
                                      tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(config)


def _tiny_gpt2():
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1,
                                     n_head=2, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


@pytest.mark.parametrize("name", ["llama", "llama-tied", "gpt2"])
def test_trainer_with_default_arguments_trains_the_sparse_layers(name, tmp_path):
    """Default TrainingArguments pick fused AdamW, whose kernels bump no version counter: the
    forward weights must follow every step and finalize must not change the logits."""
    torch.manual_seed(0)
    model = _tiny_gpt2() if name == "gpt2" else _tiny_llama(tied=name == "llama-tied")
    handle = nmsparse.sparsify(model, "2:4", decay=DECAY)
    ids = torch.randint(1, 64, (8, 16), generator=torch.Generator().manual_seed(2))
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=6,
                                          per_device_train_batch_size=4, use_cpu=True,
                                          report_to=[], save_strategy="no",
                                          disable_tqdm=True, learning_rate=1e-2)
    assert args.optim == "adamw_torch_fused"  # the default this test is about
    dense_before = {w.name: w.dense.detach().clone() for w in handle}
    transformers.Trainer(model=model, args=args,
                         train_dataset=[{"input_ids": r, "labels": r} for r in ids]).train()
    assert handle.steps == 6
    for w in handle:
        dense = w.dense.detach()
        assert not torch.equal(dense, dense_before[w.name]), w.name  # it did train
        torch.testing.assert_close(w.module.weight.detach(), dense * w.mask, rtol=0, atol=0,
                                   msg=w.name)
        assert torch.equal(w.mask, w.pattern.mask(dense.abs())), w.name
    model.eval()
    expected = model(ids).logits
    nmsparse.finalize(model)
    torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=0)
