"""Block-DCT frequency channels of images, as JPEG stores them (Xu et al., "Learning in the
Frequency Domain", CVPR 2020).

:class:`BlockDCT` maps a float batch ``(B, C, H, W)`` to ``(B, C' * b * b, H / b, W / b)``:
colour images (C = 3, RGB) are first converted to YCbCr (the JPEG / BT.601 full-range
matrix, linear: no +128 offset, which would only shift the DC coefficients), grayscale images
(C = 1) stay Y only; then each channel is cut into ``b x b`` blocks (``block``, 8 as in JPEG
by default; H and W must be multiples of it) and each block gets the orthonormal 2-D DCT-II.
Output channel ``c * b * b + u * b + v`` holds frequency ``(u, v)`` (row, column) of colour
channel ``c`` (Y, Cb, Cr), so channel 0 is the Y DC term: ``b`` times the block mean. Unlike
the paper, Cb and Cr are not subsampled 2x (both chroma planes keep full resolution).

:meth:`BlockDCT.inverse` undoes it exactly (up to float rounding): the DCT matrix is
orthonormal and the colour matrix is inverted.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# JPEG's RGB -> YCbCr (ITU-R BT.601, full range), without the chroma offset.
YCBCR = torch.tensor([[0.299, 0.587, 0.114],
                      [-0.168736, -0.331264, 0.5],
                      [0.5, -0.418688, -0.081312]], dtype=torch.float64)


def dct_matrix(size: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The orthonormal DCT-II matrix ``D`` (``D @ x`` transforms a length-``size`` vector):
    ``D[k, i] = a_k cos(pi (2i + 1) k / (2 size))`` with ``a_0 = sqrt(1/size)``, else
    ``sqrt(2/size)``."""
    k = torch.arange(size, dtype=torch.float64)[:, None]
    i = torch.arange(size, dtype=torch.float64)[None, :]
    matrix = torch.cos(math.pi * (2 * i + 1) * k / (2 * size)) * math.sqrt(2 / size)
    matrix[0] = math.sqrt(1 / size)
    return matrix.to(dtype)


def _colour(images: Tensor, matrix: Tensor) -> Tensor:
    return torch.einsum("oc,bchw->bohw", matrix.to(images.dtype), images)


class BlockDCT:
    """Images to block-DCT frequency channels and back; see the module docstring."""

    def __init__(self, block: int = 8) -> None:
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise ValueError(f"BlockDCT: block must be a positive int (8 in JPEG), got {block!r}")
        self.block = block

    def output_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """``(channels, H / b, W / b)`` for images shaped ``image_shape`` (C, H, W)."""
        channels, height, width = image_shape
        b = self.block
        if channels not in (1, 3):
            raise ValueError(f"BlockDCT takes grayscale (1 channel) or RGB (3 channels) "
                             f"images, got {channels} channels")
        if height % b or width % b:
            raise ValueError(f"BlockDCT: image size {height}x{width} is not a multiple of the "
                             f"block size {b}; pick a block that divides both")
        return channels * b * b, height // b, width // b

    def __call__(self, images: Tensor) -> Tensor:
        if images.dim() != 4:
            raise ValueError(f"BlockDCT expects a (B, C, H, W) batch, got shape "
                             f"{tuple(images.shape)}")
        _, grid_h, grid_w = self.output_shape(tuple(images.shape[1:]))
        if images.shape[1] == 3:
            images = _colour(images, YCBCR)
        b, batch, channels = self.block, images.shape[0], images.shape[1]
        d = dct_matrix(b, images.dtype).to(images.device)
        # (B, C, gh, b, gw, b): rows i and columns j inside each block
        blocks = images.reshape(batch, channels, grid_h, b, grid_w, b)
        coeffs = torch.einsum("ui,vj,bchiwj->bcuvhw", d, d, blocks)
        return coeffs.reshape(batch, channels * b * b, grid_h, grid_w)

    def inverse(self, coeffs: Tensor, colour_channels: int) -> Tensor:
        """Frequency channels back to images with ``colour_channels`` (1 or 3) channels."""
        b = self.block
        batch, total, grid_h, grid_w = coeffs.shape
        if colour_channels not in (1, 3) or total != colour_channels * b * b:
            raise ValueError(f"BlockDCT.inverse: {total} channels do not hold "
                             f"{colour_channels} colour channels of {b}x{b} blocks")
        d = dct_matrix(b, coeffs.dtype).to(coeffs.device)
        spectra = coeffs.reshape(batch, colour_channels, b, b, grid_h, grid_w)
        images = torch.einsum("ui,vj,bcuvhw->bchiwj", d, d, spectra)
        images = images.reshape(batch, colour_channels, grid_h * b, grid_w * b)
        if colour_channels == 3:
            images = _colour(images, torch.linalg.inv(YCBCR))
        return images
