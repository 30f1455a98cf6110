"""ImageNet-style ResNets (He et al., 2016): ``resnet18``, ``resnet34`` (basic blocks) and
``resnet50`` (bottleneck blocks, expansion 4).

Four stages of 64/128/256/512 channels (times the ``width`` option, rounded), the first at
stride 1 and the others at stride 2; projection shortcuts (1x1 conv + BN) wherever the
shape changes; global average pooling and a final ``fc``. In the bottleneck the stride sits
on the 3x3 conv ("ResNet v1.5"), which changes no parameter count. At width 1 and 224x224,
1000 classes the counts are the reference ones: resnet18 11,689,512, resnet34 21,797,672,
resnet50 25,557,032.

Stem rule (option ``stem="auto"``): images of at least 64x64 pixels get the ImageNet stem
(7x7 stride-2 conv + 3x3 stride-2 max-pool, /4 overall); smaller images (28x28, 32x32,
8x8 digits) get a 3x3 stride-1 conv without max-pool, as CIFAR ResNets do, so the last
stage still sees a few pixels. ``stem="imagenet"`` / ``"cifar"`` force either one.

Init: Kaiming-normal (fan_out, ReLU) convs, BN gamma 1 / beta 0, and with
``zero_init_residual=True`` the last BN gamma of each residual block is 0 so every block
starts as the identity (Goyal et al., 2017).
"""

from __future__ import annotations

from torch import Tensor, nn

from . import _checks
from ._registry import register_model

STEMS = ("auto", "imagenet", "cifar")
LARGE_IMAGE = 64  # from this size on, "auto" picks the 7x7 stride-2 stem with max-pool


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Module | None:
    """Option-B shortcut: a 1x1 conv + BN projection where the shape changes, else None."""
    if stride == 1 and in_planes == out_planes:
        return None
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
                         nn.BatchNorm2d(out_planes))


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN; ``out = relu(F(x) + shortcut(x))``."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = shortcut(in_planes, planes, stride)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand (x4), with BN; residual as in BasicBlock."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = shortcut(in_planes, out_planes, stride)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def init_resnet(model: nn.Module, zero_init_residual: bool) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    if zero_init_residual:
        for module in model.modules():
            if isinstance(module, (BasicBlock, Bottleneck)):
                nn.init.zeros_(module.last_bn.weight)


class ResNet(nn.Module):
    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: tuple[int, ...],
                 in_channels: int, num_classes: int, width: float = 1.0,
                 large_stem: bool = True, zero_init_residual: bool = False) -> None:
        super().__init__()
        planes = [_checks.scaled(c, width) for c in (64, 128, 256, 512)]
        self.in_planes = planes[0]
        if large_stem:
            self.conv1 = nn.Conv2d(in_channels, planes[0], 7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            self.conv1 = conv3x3(in_channels, planes[0])
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._stage(block, planes[0], layers[0], stride=1)
        self.layer2 = self._stage(block, planes[1], layers[1], stride=2)
        self.layer3 = self._stage(block, planes[2], layers[2], stride=2)
        self.layer4 = self._stage(block, planes[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes[3] * block.expansion, num_classes)
        init_resnet(self, zero_init_residual)

    def _stage(self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int,
               stride: int) -> nn.Sequential:
        stage = []
        for i in range(blocks):
            stage.append(block(self.in_planes, planes, stride if i == 0 else 1))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*stage)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def _build(name: str, block: type[BasicBlock] | type[Bottleneck], layers: tuple[int, ...],
           input_shape: tuple[int, ...], num_classes: int, width: float, stem: str,
           zero_init_residual: bool) -> ResNet:
    channels, height, image_width = _checks.image_shape(name, input_shape, min_size=8)
    width = _checks.positive_float(name, "width", width)
    stem = _checks.choice(name, "stem", stem, STEMS)
    zero_init_residual = _checks.boolean(name, "zero_init_residual", zero_init_residual)
    large_stem = (min(height, image_width) >= LARGE_IMAGE) if stem == "auto" else \
        stem == "imagenet"
    return ResNet(block, layers, channels, num_classes, width, large_stem, zero_init_residual)


_SMOKE = {"width": 0.25}


@register_model("resnet18", description="ImageNet ResNet-18, basic blocks (11.7M params at "
                "224px/1000 classes); 3x3 stem without max-pool below 64px",
                tasks=("classification",), smoke_options=_SMOKE)
def resnet18(*, input_shape: tuple[int, ...], num_classes: int, width: float = 1.0,
             stem: str = "auto", zero_init_residual: bool = False) -> ResNet:
    return _build("resnet18", BasicBlock, (2, 2, 2, 2), input_shape, num_classes, width, stem,
                  zero_init_residual)


@register_model("resnet34", description="ImageNet ResNet-34, basic blocks (21.8M params at "
                "224px/1000 classes); 3x3 stem without max-pool below 64px",
                tasks=("classification",), smoke_options=_SMOKE)
def resnet34(*, input_shape: tuple[int, ...], num_classes: int, width: float = 1.0,
             stem: str = "auto", zero_init_residual: bool = False) -> ResNet:
    return _build("resnet34", BasicBlock, (3, 4, 6, 3), input_shape, num_classes, width, stem,
                  zero_init_residual)


@register_model("resnet50", description="ImageNet ResNet-50, bottleneck blocks (25.6M params "
                "at 224px/1000 classes); 3x3 stem without max-pool below 64px",
                tasks=("classification",), smoke_options=_SMOKE)
def resnet50(*, input_shape: tuple[int, ...], num_classes: int, width: float = 1.0,
             stem: str = "auto", zero_init_residual: bool = False) -> ResNet:
    return _build("resnet50", Bottleneck, (3, 4, 6, 3), input_shape, num_classes, width, stem,
                  zero_init_residual)
