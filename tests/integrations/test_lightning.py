"""PyTorch Lightning's automatic optimization calls ``optimizer.step(closure)``: the gradient
exists only inside ``step``. SR-STE must still be exact there, with gradient accumulation and
bf16 mixed precision, and match a plain PyTorch loop bit for bit."""

from __future__ import annotations

import pytest
import torch
from plain_loop import BATCH, DECAY, LR, data, network, plain_loop
from torch import nn

import nmsparse

lightning = pytest.importorskip("lightning")


class Module(lightning.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = network()

    def training_step(self, batch, index):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


def fit(steps: int, accumulate: int, precision: str) -> nn.Module:
    x, y = data(steps * accumulate)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y),
                                         batch_size=BATCH, shuffle=False)
    module = Module()
    trainer = lightning.Trainer(max_steps=steps, accumulate_grad_batches=accumulate,
                                precision=precision, accelerator="cpu", devices=1,
                                logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)
    return module.net


def test_one_step_is_the_sr_ste_formula():
    x, y = data(1)
    reference = network()
    w0 = reference[0]._parameters["weight"].detach().clone()
    m0 = reference[0].weight_mask.clone()
    nn.functional.cross_entropy(reference(x), y).backward()
    g = reference[0]._parameters["weight"].grad
    trained = fit(1, 1, "32-true")
    torch.testing.assert_close(trained[0]._parameters["weight"].detach(),
                               w0 - LR * (g + DECAY * (~m0).float() * w0), rtol=0, atol=1e-7)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_lightning_matches_a_plain_loop(accumulate, precision):
    trained = fit(3, accumulate, precision)
    reference = plain_loop(3, accumulate, precision == "bf16-mixed")
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(trained.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert nmsparse.check(trained, "2:4").ok
