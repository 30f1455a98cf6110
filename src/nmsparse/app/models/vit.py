"""``vit_tiny``: a small Vision Transformer (Dosovitskiy et al., 2021) for image classification.

Patch embedding by a Conv2d with kernel = stride = ``patch_size``, a class token, a learned
position embedding, ``depth`` pre-LayerNorm blocks (``nn.MultiheadAttention`` with
``batch_first=True``, then an ``nn.Linear`` MLP with GELU), a final LayerNorm and a linear
head on the class token. Attention and MLP are standard modules, so ``nmsparse.sparsify``
finds their weights (the attention's input projection and ``out_proj``, both MLP layers).

Default patch size: the smallest common divisor p of H and W whose grid max(H, W) / p is at
most 8 (4 for 28x28 and 32x32, giving 7x7 and 8x8 grids; 1 for 8x8 digits; 28 for 224x224);
if no divisor gets there, the largest common divisor. An explicit ``patch_size`` must divide
both H and W.

Init: truncated normal (std 0.02) for linear, patch-embedding, class-token and position
weights, zero biases, LayerNorm 1 / 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import _checks
from ._registry import register_model

MAX_GRID = 8


def default_patch_size(height: int, width: int) -> int:
    common = math.gcd(height, width)
    for p in range(1, common + 1):
        if common % p == 0 and max(height, width) // p <= MAX_GRID:
            return p
    return common


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_hidden), nn.GELU(),
                                 nn.Linear(mlp_hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self, image_shape: tuple[int, int, int], num_classes: int, patch_size: int,
                 dim: int, depth: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        channels, height, width = image_shape
        self.image_shape = image_shape
        self.patch_embed = nn.Conv2d(channels, dim, patch_size, stride=patch_size)
        num_patches = (height // patch_size) * (width // patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        mlp_hidden = max(1, round(dim * mlp_ratio))
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_hidden) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for param in (self.cls_token, self.pos_embed):
            nn.init.trunc_normal_(param, std=0.02)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.MultiheadAttention):
                nn.init.trunc_normal_(module.in_proj_weight, std=0.02)
                nn.init.zeros_(module.in_proj_bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classify(self.blocks(self.tokens(x)))

    def tokens(self, x: Tensor) -> Tensor:
        """Images to the token sequence ``(batch, 1 + patches, dim)``, class token first."""
        if tuple(x.shape[1:]) != self.image_shape:
            # the position embedding fixes the grid, so other sizes cannot be taken
            raise ValueError(f"vit_tiny was built for images {self.image_shape}, got a batch "
                             f"shaped {tuple(x.shape)}")
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (batch, patches, dim)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.pos_embed

    def classify(self, x: Tensor) -> Tensor:
        """Logits from the class token of a sequence (of any length) after the blocks."""
        return self.head(self.norm(x[:, 0]))


@register_model("vit_tiny", description="Vision Transformer, dim 192, depth 6, 3 heads, "
                "patch grid up to 8x8 (2.7M params on 32px)", tasks=("classification",),
                smoke_options={"dim": 32, "depth": 2, "heads": 2})
def vit_tiny(*, input_shape: tuple[int, ...], num_classes: int, patch_size: int | None = None,
             dim: int = 192, depth: int = 6, heads: int = 3,
             mlp_ratio: float = 4.0) -> VisionTransformer:
    name = "vit_tiny"
    image = _checks.image_shape(name, input_shape)
    _, height, width = image
    if patch_size is None:
        patch_size = default_patch_size(height, width)
    patch_size = _checks.positive_int(name, "patch_size", patch_size)
    if height % patch_size or width % patch_size:
        divisors = [p for p in range(1, math.gcd(height, width) + 1)
                    if height % p == 0 and width % p == 0]
        raise ValueError(f"{name}: patch_size={patch_size} does not divide the image size "
                         f"{height}x{width}; accepted: {', '.join(map(str, divisors))}")
    dim = _checks.positive_int(name, "dim", dim)
    depth = _checks.positive_int(name, "depth", depth)
    heads = _checks.positive_int(name, "heads", heads)
    mlp_ratio = _checks.positive_float(name, "mlp_ratio", mlp_ratio)
    if dim % heads:
        raise ValueError(f"{name}: dim={dim} is not divisible by heads={heads}")
    return VisionTransformer(image, num_classes, patch_size, dim, depth, heads, mlp_ratio)
