"""``NMLinear``: a Linear layer whose weight is stored packed N:M, and ``swap_linear_layers``.

``NMLinear`` keeps ``values`` / ``indices`` (the :mod:`nmsparse.packing` format of the
``(out, in)`` weight) and ``bias`` as buffers, so ``state_dict()`` holds the packed bytes and
``.to(device)`` / ``.half()`` move / cast them (``indices`` stay uint8). It is for inference:
nothing in it is trained. ``forward`` calls ``torch.ops.nmsparse.nm_linear``.

``swap_linear_layers`` replaces the plain ``nn.Linear`` modules and Hugging Face ``Conv1D``
modules (GPT-2's; their ``(in, out)`` weight is packed as its ``(out, in)`` transpose) of a
*finalized* model (masks baked into the weights, see :func:`nmsparse.finalize`) whose weights
are N:M by their non-zero pattern, and reports every one it left alone with the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..engine.selection import is_hf_conv1d
from ..engine.sparse_module import original_class, sparse_states
from ..packing import PackedWeight, pack, unpack_rows
from ..patterns import NM, parse_pattern
from ..tables import format_table
from . import _op  # registers torch.ops.nmsparse.nm_linear
from ._eligibility import not_asked, shared_parameters, structural_reason


def linear_shape(packed: PackedWeight, owner: str) -> tuple[int, int]:
    """``(out_features, in_features)`` of a packed Linear weight, checked for ``owner``."""
    if len(packed.shape) != 2:
        raise ValueError(f"{owner} needs a packed 2-D (out, in) weight, got shape "
                         f"{packed.shape}")
    return packed.shape[0], packed.shape[1]


def checked_bias(bias: torch.Tensor | None, out_features: int, device: torch.device | str,
                 dtype: torch.dtype) -> torch.Tensor | None:
    """A detached copy of ``bias`` on ``device`` in ``dtype``, checked against the outputs."""
    if bias is None:
        return None
    bias = bias.detach().to(device, dtype)
    if tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias of shape {tuple(bias.shape)} does not match {out_features} "
                         "output features")
    return bias


class NMLinear(nn.Module):
    """``y = x @ W.T + bias`` with ``W`` held in the packed N:M format."""

    values: torch.Tensor
    indices: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = linear_shape(packed, "NMLinear")
        self.n, self.m = packed.n, packed.m
        self.register_buffer("values", packed.values)
        self.register_buffer("indices", packed.indices)
        self.register_buffer("bias", checked_bias(bias, self.out_features, packed.values.device,
                                                  packed.values.dtype))

    @classmethod
    def from_linear(cls, linear: nn.Module, n: int, m: int,
                    mask: torch.Tensor | None = None) -> NMLinear:
        """Pack the weight of ``linear``, an ``nn.Linear`` or a Hugging Face ``Conv1D`` (whose
        ``(in, out)`` weight is packed as its ``(out, in)`` transpose).

        Without ``mask`` the weight must already be N:M (at most ``n`` non-zeros per group of
        ``m`` along ``in``), else ``ValueError``; with ``mask`` (bool, ``(out, in)``, exactly
        ``n`` per group) the weight's values at the mask's positions are kept, whatever the
        others are.
        """
        packed = pack(_linear_weight(linear), n, m, layout="in", mask=mask)
        return cls(packed, None if linear.bias is None else linear.bias.detach())

    @property
    def pattern(self) -> NM:
        return NM(self.n, self.m)

    @property
    def packed(self) -> PackedWeight:
        return PackedWeight(self.values, self.indices, self.n, self.m,
                            (self.out_features, self.in_features), "in")

    def dense_weight(self) -> torch.Tensor:
        """The dense ``(out, in)`` weight (zeros at pruned positions)."""
        return unpack_rows(self.values, self.indices, self.n, self.m)

    def to_linear(self) -> nn.Linear:
        """An equivalent dense ``nn.Linear`` (same device and dtype)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.dense_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def fits(self, x: torch.Tensor) -> bool:
        """Whether ``x`` meets this layer's weight as the op's checks require (its last
        dimension, dtype and device), so that the op's own checks can be skipped."""
        return _fits(x, self.values, self.bias, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # each buffer read once: a module attribute lookup is ~0.3 us of a ~20 us small call
        values, indices, bias = self.values, self.indices, self.bias
        if _op.call_directly(x, bias):
            if _fits(x, values, bias, self.in_features):
                return _op.run_checked(x, values, indices, self.n, self.m, bias)
            return _op._nm_linear_impl(x, values, indices, self.n, self.m, bias)
        return torch.ops.nmsparse.nm_linear(x, values, indices, self.n, self.m, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"pattern={self.n}:{self.m}, bias={self.bias is not None}")


def _fits(x: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None,
          in_features: int) -> bool:
    return (x.dim() >= 1 and x.shape[-1] == in_features and x.dtype == values.dtype
            and x.device == values.device and (bias is None or bias.dtype == x.dtype))


@dataclass(frozen=True)
class SwapRow:
    name: str
    shape: tuple[int, ...]
    swapped: bool
    reason: str = ""


@dataclass
class SwapReport:
    """What :func:`swap_linear_layers` did to every ``nn.Linear`` of the model."""

    pattern: NM
    rows: list[SwapRow] = field(default_factory=list)
    # names of the swapped layers then prepared for the CPU kernel (nmsparse.load_pretrained)
    prepared: list[str] = field(default_factory=list)
    # how many swapped layers prepare_cpu could still lay out for the CPU kernel
    preparable: int = 0

    @property
    def swapped(self) -> list[str]:
        return [row.name for row in self.rows if row.swapped]

    @property
    def skipped(self) -> dict[str, str]:
        """Names of the Linear layers left dense, with the reason."""
        return {row.name: row.reason for row in self.rows if not row.swapped}

    def __str__(self) -> str:
        rows = [[row.name, "x".join(map(str, row.shape)),
                 "swapped" if row.swapped else "skipped", row.reason] for row in self.rows]
        head = (f"{len(self.swapped)} Linear layer(s) swapped to NMLinear {self.pattern}, "
                f"{len(self.skipped)} skipped")
        if self.prepared:
            head += (f"; {len(self.prepared)} of them prepared for the CPU kernel "
                     "(PreparedNMLinear)")
        elif self.preparable:
            head += (f"; nmsparse.kernels.prepare_cpu(model) would lay {self.preparable} of "
                     "them out for the CPU kernel (faster at every batch size)")
        return head + "\n" + format_table(["layer", "weight", "status", "reason"], rows)


def _linear_weight(module: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` weight of an ``nn.Linear`` or a Hugging Face ``Conv1D`` (a view of
    the latter's ``(in, out)`` parameter)."""
    weight = module.weight.detach()
    return weight.t() if is_hf_conv1d(module) else weight


def _skip_reason(module: nn.Module, parent: nn.Module, pattern: NM, shared: set[int]) -> str | None:
    if sparse_states(module) or original_class(module) is not type(module):
        return "still sparsified by nmsparse: call nmsparse.finalize(model) first"
    reason = structural_reason(module, parent, shared)
    if reason:
        return reason
    weight = _linear_weight(module)
    if weight.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return f"weight dtype {weight.dtype} is not floating point"
    if weight.shape[1] % pattern.m:
        return f"in_features {weight.shape[1]} is not divisible by M={pattern.m}"
    found = pattern.violations(weight)  # the one definition of "is this N:M"
    if not found.ok:
        return (f"weight is not {pattern}: {found.violating}/{found.groups} groups have more "
                f"than {pattern.n} non-zeros (up to {found.max_kept})")
    return None


def swap_linear_layers(model: nn.Module, pattern: str | NM | tuple[int, int] = "2:4",
                       filter_fn: Callable[[str, nn.Module], bool] | None = None, *,
                       include: str | Sequence[str] | None = None,
                       exclude: str | Sequence[str] | None = None) -> SwapReport:
    """Replace, in place, the N:M ``nn.Linear`` layers of a finalized ``model`` by NMLinear.

    Hugging Face ``Conv1D`` layers (GPT-2's ``c_attn``, ``c_proj``, ``c_fc``) count as Linear
    layers: their ``(in, out)`` weight is grouped along ``in``, as ``sparsify`` grouped it,
    and packed as its ``(out, in)`` transpose (the report gives their stored shape).

    A layer is swapped when it is a plain ``nn.Linear``, the ``include`` / ``exclude`` globs
    select it (as in every verb; ``filter_fn`` is deprecated), its ``in_features`` is
    divisible by M and every group of M weights along ``in`` has at most N non-zeros.
    Skipped: live nmsparse layers (not finalized), subclasses of Linear, the projections of
    ``nn.MultiheadAttention`` (it reads ``.weight`` directly), tied weights, and weights that
    are not N:M. Returns a :class:`SwapReport`.
    """
    pattern = parse_pattern(pattern)
    left_out = not_asked(model, pattern, include, exclude, filter_fn, "swap_linear_layers")
    shared = shared_parameters(model)
    report = SwapReport(pattern)
    parents = {name: module for name, module in model.named_modules()}
    plan: list[tuple[str, nn.Linear]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) and not is_hf_conv1d(module):
            continue
        shape = tuple(module.weight.shape)
        if name in left_out:
            report.rows.append(SwapRow(name, shape, False, left_out[name]))
            continue
        if not name:
            report.rows.append(SwapRow("(model)", shape, False, "the model itself is an "
                                       "nn.Linear: use NMLinear.from_linear"))
            continue
        parent = parents[name.rpartition(".")[0]]
        reason = _skip_reason(module, parent, pattern, shared)
        if reason:
            report.rows.append(SwapRow(name, shape, False, reason))
        else:
            plan.append((name, module))
            report.rows.append(SwapRow(name, shape, True))
    for name, module in plan:
        replacement = NMLinear.from_linear(module, pattern.n, pattern.m)
        replacement.train(module.training)
        model.set_submodule(name, replacement)
        report.preparable += _preparable(replacement)
    return report


def _preparable(layer: NMLinear) -> bool:
    if layer.values.device.type != "cpu" or layer.values.dtype != torch.bfloat16:
        return False  # decided without building the CPU kernels
    from .cpu.prepacked import prepack_reason

    return prepack_reason(layer.values, layer.n, layer.m) is None
