"""``SemiStructuredLinear``: a Linear whose (padded) weight is a PyTorch semi-structured
sparse tensor of one backend, for inference (the weight gets no gradient)."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ._tiles import _CLASS_NAMES, KERNEL_BACKENDS, ShapePlan, _backend_class, _check_backend

_PROTOTYPE_WARNING = "The PyTorch API of SparseSemiStructuredTensor is in prototype stage"


def to_semi_structured(weight: torch.Tensor, backend: str) -> torch.Tensor:
    """Compress a 2:4 CUDA ``weight`` with ``backend``: ``<class>.from_dense``, the same as
    ``to_sparse_semi_structured`` with ``SparseSemiStructuredTensor._FORCE_CUTLASS`` set for
    CUTLASS, without touching that global flag. Does not check the pattern."""
    cls = _backend_class(_check_backend(backend, KERNEL_BACKENDS))
    if cls is None:
        raise RuntimeError(f"this PyTorch ({torch.__version__}) has no "
                           f"torch.sparse.{_CLASS_NAMES[backend]}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_PROTOTYPE_WARNING)
        return cls.from_dense(weight.contiguous())


class SemiStructuredLinear(nn.Module):
    """``y = x @ W.T + bias`` with ``W`` a (padded) PyTorch semi-structured sparse tensor.

    ``x`` may have any number of leading dims; it is reshaped to 2-D, its rows padded to the
    backend's multiple and its columns to the padded weight, and the result sliced back.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, in_features: int,
                 out_features: int, backend: str, token_multiple: int = 8) -> None:
        super().__init__()
        padded_out, padded_in = weight.shape
        if padded_out < out_features or padded_in < in_features:
            raise ValueError(f"weight of shape {tuple(weight.shape)} is smaller than "
                             f"{out_features}x{in_features}")
        if bias is not None and tuple(bias.shape) != (padded_out,):
            raise ValueError(f"bias of shape {tuple(bias.shape)} does not match the padded "
                             f"weight's {padded_out} rows")
        self.in_features = in_features
        self.out_features = out_features
        self.padded_in = padded_in
        self.padded_out = padded_out
        self.backend = backend
        self.token_multiple = max(1, int(token_multiple))
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, plan: ShapePlan,
                    convert: Callable[[torch.Tensor, str], torch.Tensor] | None = None,
                    ) -> SemiStructuredLinear:
        """Pad ``linear``'s weight (and bias) to ``plan.padded`` and compress it with
        ``convert(weight, backend)`` (default :func:`to_semi_structured`). The weight is not
        verified here (see :func:`accelerate`).
        """
        convert = convert or to_semi_structured
        weight = linear.weight.detach()
        rows, cols = plan.shape
        if tuple(weight.shape) != (rows, cols):
            raise ValueError(f"plan for {rows}x{cols} given a weight of shape "
                             f"{tuple(weight.shape)}")
        padded_rows, padded_cols = plan.padded
        if plan.is_padded:
            # Zero rows / columns keep every group of 4 at <= 2 non-zeros.
            weight = F.pad(weight, (0, padded_cols - cols, 0, padded_rows - rows))
        bias = None
        if linear.bias is not None:
            bias = linear.bias.detach().to(weight.dtype)  # the kernels want one dtype
            bias = F.pad(bias, (0, padded_rows - rows)).contiguous()
        return cls(convert(weight.contiguous(), plan.backend), bias, cols, rows,
                   plan.backend, plan.rule.tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input of shape {tuple(x.shape)} does not match in_features="
                             f"{self.in_features}")
        dtype = self.weight.dtype
        if x.dtype != dtype:
            if not _autocast_enabled(x.device.type):
                raise RuntimeError(f"input dtype {x.dtype} differs from the layer's {dtype} "
                                   "(semi-structured kernels take one dtype)")
            x = x.to(dtype)  # what autocast does for the dense layer
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        rows = x2.shape[0]
        if rows == 0:
            return x.new_zeros(*lead, self.out_features, dtype=dtype)
        pad_cols = self.padded_in - self.in_features
        pad_rows = -rows % self.token_multiple
        if pad_cols or pad_rows:
            x2 = F.pad(x2, (0, pad_cols, 0, pad_rows))
        y = F.linear(x2.contiguous(), self.weight, self.bias)
        if pad_rows or self.padded_out != self.out_features:
            y = y[:rows, :self.out_features]
        # Some backends return a transposed view; nn.Linear's output is contiguous and code
        # after it may .view() it.
        return y.contiguous().reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        padded = (f", padded={self.padded_out}x{self.padded_in}"
                  if (self.padded_out, self.padded_in) != (self.out_features, self.in_features)
                  else "")
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, backend={self.backend}{padded}")


def _autocast_enabled(device_type: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except TypeError:  # an older signature without the device type (CUDA only)
        return device_type == "cuda" and bool(torch.is_autocast_enabled())
