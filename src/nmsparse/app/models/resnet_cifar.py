"""CIFAR-style ResNets (He et al., 2016, section 4.2): ``resnet20``, ``resnet32``,
``resnet56`` (6n+2 layers with n = 3, 5, 9).

A 3x3 stride-1 stem conv, then three stages of n basic blocks with 16/32/64 channels (times
the ``width`` option, rounded), the second and third at stride 2, global average pooling
and a final ``fc``. Shortcuts are option B of the paper: identity where the shape is kept,
a 1x1 conv + BN projection where it changes (the paper's CIFAR models use option A,
zero-padding; B adds 2,752 parameters to resnet20: 272,474 instead of 269,722 for 10
classes). Any channel count and any image of at least 8x8 pixels is accepted.
"""

from __future__ import annotations

from torch import Tensor, nn

from . import _checks
from ._registry import register_model
from .resnet import BasicBlock, conv3x3, init_resnet


class CifarResNet(nn.Module):
    def __init__(self, blocks_per_stage: int, in_channels: int, num_classes: int,
                 width: float = 1.0, zero_init_residual: bool = False) -> None:
        super().__init__()
        planes = [_checks.scaled(c, width) for c in (16, 32, 64)]
        self.conv1 = conv3x3(in_channels, planes[0])
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.relu = nn.ReLU(inplace=True)
        in_planes, stages = planes[0], []
        for stage, out_planes in enumerate(planes):
            blocks = []
            for i in range(blocks_per_stage):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(in_planes, out_planes, stride))
                in_planes = out_planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes[2], num_classes)
        init_resnet(self, zero_init_residual)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


def _build(name: str, blocks_per_stage: int, input_shape: tuple[int, ...], num_classes: int,
           width: float, zero_init_residual: bool) -> CifarResNet:
    channels, _, _ = _checks.image_shape(name, input_shape, min_size=8)
    width = _checks.positive_float(name, "width", width)
    zero_init_residual = _checks.boolean(name, "zero_init_residual", zero_init_residual)
    return CifarResNet(blocks_per_stage, channels, num_classes, width, zero_init_residual)


_SMOKE = {"width": 0.25}


@register_model("resnet20", description="CIFAR ResNet-20 (16/32/64 channels, option-B "
                "shortcuts, 0.27M params)", tasks=("classification",), smoke_options=_SMOKE)
def resnet20(*, input_shape: tuple[int, ...], num_classes: int, width: float = 1.0,
             zero_init_residual: bool = False) -> CifarResNet:
    return _build("resnet20", 3, input_shape, num_classes, width, zero_init_residual)


@register_model("resnet32", description="CIFAR ResNet-32 (16/32/64 channels, option-B "
                "shortcuts, 0.47M params)", tasks=("classification",), smoke_options=_SMOKE)
def resnet32(*, input_shape: tuple[int, ...], num_classes: int, width: float = 1.0,
             zero_init_residual: bool = False) -> CifarResNet:
    return _build("resnet32", 5, input_shape, num_classes, width, zero_init_residual)


@register_model("resnet56", description="CIFAR ResNet-56 (16/32/64 channels, option-B "
                "shortcuts, 0.86M params)", tasks=("classification",), smoke_options=_SMOKE)
def resnet56(*, input_shape: tuple[int, ...], num_classes: int, width: float = 1.0,
             zero_init_residual: bool = False) -> CifarResNet:
    return _build("resnet56", 9, input_shape, num_classes, width, zero_init_residual)
