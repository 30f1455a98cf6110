"""``mlp``: a multilayer perceptron on the flattened input (digits, tabular data, images).

Linear -> ReLU (-> Dropout) per hidden layer, then a Linear classifier; ``hidden=()`` gives
a linear (logistic-regression) model. Weights use
PyTorch's default ``nn.Linear`` initialisation (Kaiming-uniform), biases likewise.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from . import _checks
from ._registry import register_model


class MLP(nn.Module):
    def __init__(self, in_features: int, hidden: tuple[int, ...], num_classes: int,
                 dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


@register_model("mlp", description="multilayer perceptron on the flattened input "
                "(hidden=(256, 256), ReLU)", tasks=("classification",),
                smoke_options={"hidden": (32,)})
def mlp(*, input_shape: tuple[int, ...], num_classes: int,
        hidden: tuple[int, ...] | list[int] = (256, 256), dropout: float = 0.0) -> MLP:
    hidden = _checks.int_sequence("mlp", "hidden", hidden)
    dropout = _checks.probability("mlp", "dropout", dropout)
    return MLP(math.prod(input_shape), hidden, num_classes, dropout)
