"""Learning in the frequency domain (Xu et al., CVPR 2020) for the CIFAR ResNets:
``dct_resnet`` and its baseline at the same input size, ``downsampled_resnet``.

``dct_resnet`` turns each image batch into block-DCT channels
(:class:`~nmsparse.app.data.frequency.BlockDCT`: YCbCr or Y, ``block x block`` frequencies per
colour channel, on a grid ``block`` times smaller), optionally keeps only the listed
``channels`` (a static selection, e.g. the top-k of a trained gate), standardises each
channel (``BatchNorm2d`` without affine parameters: running mean and variance), optionally
multiplies them by a learned :class:`ChannelGate`, and feeds them to a CIFAR ResNet whose
first layers are adapted as in the paper: the stem conv takes the frequency channels, and the
trunk's first ``log2(block)`` stride-2 reductions (at most the two the CIFAR ResNet has) are
removed, since the DCT already shrank the grid by ``block``.

``downsampled_resnet`` is the same network (standardisation included) fed the image
area-averaged by ``factor`` in space (so its input grid equals the DCT grid at ``block =
factor``), with the same strides removed: only the input differs.

:class:`ChannelGate`: one keep logit per channel (starting at 0: keep with probability 1/2);
in training a Gumbel-softmax hard decision per channel and forward pass (straight-through
gradient; the logit is bounded to +-6 by a tanh), at inference ``logit > 0``. Its
``gate_loss`` is ``gate_weight * (kept fraction - gate_target)^2`` on the sampled decisions;
its gradient is attached to the gated output (:mod:`._auxiliary`), so any loop that
backpropagates through the model trains with it; models expose its value as
``auxiliary_loss`` (``nmsparse train`` adds it to the loss it reports).
:func:`top_channels` reads the static top-k from a trained gate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..data.frequency import BlockDCT
from . import _checks
from ._auxiliary import with_auxiliary
from ._registry import register_model
from .resnet_cifar import CifarResNet

BASES = {"resnet20": 3, "resnet32": 5, "resnet56": 9}
LOGIT_LIMIT = 6.0


class ChannelGate(nn.Module):
    """Learned per-channel keep gate for ``(B, C, H, W)`` inputs; see the module docstring."""

    def __init__(self, channels: int, target: float, weight: float = 1.0, tau: float = 1.0,
                 init: float = 0.0) -> None:
        super().__init__()
        if not 0 < target <= 1 or weight < 0 or tau <= 0:
            raise ValueError(f"ChannelGate: need 0 < target <= 1, weight >= 0 and tau > 0; got "
                             f"target={target}, weight={weight}, tau={tau}")
        self.logits = nn.Parameter(torch.full((channels,), float(init)))
        self.target, self.weight, self.tau = float(target), float(weight), float(tau)
        self._decision: Tensor | None = None

    def effective_logits(self) -> Tensor:
        """The parameter bounded to (-LIMIT, LIMIT) by tanh: a straight-through gradient
        summed over a whole batch can throw a raw logit far out in one momentum step."""
        return LOGIT_LIMIT * torch.tanh(self.logits / LOGIT_LIMIT)

    def forward(self, x: Tensor) -> Tensor:
        logits = self.effective_logits()
        if not self.training:
            self._decision = None
            return x * (logits > 0).to(x.dtype)[None, :, None, None]
        pair = torch.stack([logits, torch.zeros_like(logits)], dim=-1)
        decision = nn.functional.gumbel_softmax(pair, tau=self.tau, hard=True)[:, 0]
        self._decision = decision.detach()
        return with_auxiliary(x * decision[None, :, None, None], self._gate_loss(decision))

    def _gate_loss(self, decision: Tensor) -> Tensor:
        return self.weight * (decision.mean() - self.target) ** 2

    def gate_loss(self) -> Tensor:
        """The last training forward's gate loss, as a value: its gradient already flows
        through that forward's output (:mod:`._auxiliary`)."""
        if self._decision is None:
            return self.logits.new_zeros(())
        return self._gate_loss(self._decision)

    def kept_fraction(self) -> float:
        """Fraction of channels the inference decision (``logit > 0``) keeps."""
        return float((self.logits.detach() > 0).float().mean())

    def expected_fraction(self) -> float:
        """Mean keep probability of the training decision: what the gate loss drives to
        ``target`` (the hard count above can fall short of it when logits sit just below
        0; the static top-k then fixes the count)."""
        return float(torch.sigmoid(self.effective_logits().detach()).mean())


def top_channels(gate: ChannelGate, k: int) -> list[int]:
    """The ``k`` channels with the highest keep logits, ascending: the static selection."""
    if not 1 <= k <= gate.logits.numel():
        raise ValueError(f"top_channels: k={k} must be between 1 and {gate.logits.numel()}")
    return sorted(gate.logits.detach().topk(k).indices.tolist())


def remove_strides(net: CifarResNet, count: int) -> None:
    """Make the first ``count`` stride-2 stages of ``net`` (layer2, layer3) stride 1."""
    for stage in (net.layer2, net.layer3)[:count]:
        first = stage[0]
        first.conv1.stride = (1, 1)
        if first.downsample is not None:
            first.downsample[0].stride = (1, 1)


class FrequencyNet(nn.Module):
    """Input transform (DCT or downsampling), optional selection and gate, then the trunk."""

    def __init__(self, transform: nn.Module, trunk: CifarResNet,
                 channels: Sequence[int] | None, gate: ChannelGate | None) -> None:
        super().__init__()
        self.transform = transform
        self.trunk = trunk
        self.gate = gate
        index = torch.tensor(list(channels) if channels is not None else [], dtype=torch.long)
        self.register_buffer("channels", index)
        self.select = channels is not None
        # Per-channel standardisation with running statistics (no parameters), as the paper
        # normalises each frequency channel: DC is ~block times larger than the high ones.
        self.normalize = nn.BatchNorm2d(trunk.conv1.in_channels, affine=False)

    def forward(self, images: Tensor) -> Tensor:
        x = self.transform(images)
        if self.select:
            x = x.index_select(1, self.channels)
        x = self.normalize(x)
        if self.gate is not None:
            x = self.gate(x)
        return self.trunk(x)

    def auxiliary_loss(self) -> Tensor:
        if self.gate is None:
            return self.trunk.fc.weight.new_zeros(())
        return self.gate.gate_loss()


class DCTInput(nn.Module):
    """:class:`BlockDCT` as a module (no parameters: nothing to sparsify, no MACs counted)."""

    def __init__(self, block: int) -> None:
        super().__init__()
        self.dct = BlockDCT(block)

    def forward(self, images: Tensor) -> Tensor:
        return self.dct(images)


def _trunk(name: str, base: str, in_channels: int, num_classes: int, width: float,
           reductions: int) -> CifarResNet:
    _checks.choice(name, "base", base, tuple(BASES))
    width = _checks.positive_float(name, "width", width)
    net = CifarResNet(BASES[base], in_channels, num_classes, width)
    remove_strides(net, min(2, reductions))
    return net


@register_model("dct_resnet", description="CIFAR ResNet on block-DCT frequency channels "
                "(Xu et al. 2020), optional channel selection and learned gate",
                tasks=("classification",), smoke_options={"width": 0.25, "block": 4})
def dct_resnet(*, input_shape: tuple[int, ...], num_classes: int, base: str = "resnet20",
               block: int = 8, channels: Sequence[int] | None = None,
               gate_target: float | None = None, gate_weight: float = 1.0,
               width: float = 1.0) -> FrequencyNet:
    name = "dct_resnet"
    image = _checks.image_shape(name, input_shape)
    block = _checks.positive_int(name, "block", block)
    dct = DCTInput(block)
    try:
        total, _, _ = dct.dct.output_shape(image)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from error
    if channels is not None:
        if (not isinstance(channels, (list, tuple)) or not channels
                or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < total
                           for c in channels)):
            raise ValueError(f"{name}: option channels={channels!r} is invalid; expected a "
                             f"non-empty list of channel indices in 0..{total - 1} (the "
                             f"frequency channels of {image[0]} colour channel(s) at block "
                             f"{block})")
        channels = sorted(set(channels))
    used = len(channels) if channels is not None else total
    gate = None
    if gate_target is not None:
        gate_target = _checks.positive_float(name, "gate_target", gate_target)
        gate_weight = _checks.positive_float(name, "gate_weight", gate_weight)
        if gate_target > 1:
            raise ValueError(f"{name}: option gate_target={gate_target} is invalid; expected "
                             "the fraction of channels to keep, in (0, 1]")
        gate = ChannelGate(used, gate_target, gate_weight)
    trunk = _trunk(name, base, used, num_classes, width, int(math.log2(block)))
    return FrequencyNet(dct, trunk, channels, gate)


@register_model("downsampled_resnet", description="CIFAR ResNet on images area-downsampled "
                "by factor, strides removed like dct_resnet (its same-input-size baseline)",
                tasks=("classification",), smoke_options={"width": 0.25, "factor": 2})
def downsampled_resnet(*, input_shape: tuple[int, ...], num_classes: int,
                       base: str = "resnet20", factor: int = 8,
                       width: float = 1.0) -> FrequencyNet:
    name = "downsampled_resnet"
    channels, height, width_px = _checks.image_shape(name, input_shape)
    factor = _checks.positive_int(name, "factor", factor)
    if height % factor or width_px % factor:
        raise ValueError(f"{name}: image size {height}x{width_px} is not a multiple of "
                         f"factor={factor}")
    trunk = _trunk(name, base, channels, num_classes, width, int(math.log2(factor)))
    return FrequencyNet(nn.AvgPool2d(factor), trunk, None, None)
