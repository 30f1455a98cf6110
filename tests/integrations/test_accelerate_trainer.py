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
