"""``PreparedNMLinear``: an :class:`NMLinear` whose bf16 weight is held in the CPU kernel's
prepared layout, and ``prepare_cpu`` / ``unprepare_cpu``, which convert a model's layers.

For bf16 inference on a CPU with AVX512_BF16 (like ``ipex.optimize`` for dense models):
every call of the plain lanes kernel first lays the packed rows out lane by lane, which at a
few rows costs as much as the product; the prepared layout is that arrangement made once, in
the same number of bytes (:mod:`nmsparse.kernels.cpu.prepacked`). ``forward`` calls
``torch.ops.nmsparse.nm_linear_prepacked`` (traceable by ``torch.compile``; the backward
gives x's and the bias's gradients).

Checkpoints do not change: ``state_dict()`` holds the same ``values`` / ``indices`` / ``bias``
as the NMLinear it came from, and ``load_state_dict`` takes them (so a prepared model saves
to, and loads from, the files of an unprepared one). The layer stays on the CPU in bf16:
moving or casting it raises, saying to call :func:`unprepare_cpu` first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..packing import PackedWeight, packed_shapes
from ..patterns import NM
from ..tables import format_table
from ._module import NMLinear, checked_bias, linear_shape
from ._op import call_directly

_LIB = torch.library.Library("nmsparse", "FRAGMENT")
_LIB.define("nm_linear_prepacked(Tensor x, Tensor layout, int n, int m, int in_features, "
            "int out_features, Tensor? bias=None) -> Tensor")
# the dense bf16 weight of a layout: an op of its own, so that the backward traces
_LIB.define("nm_prepacked_dense(Tensor layout, int n, int m, int in_features, "
            "int out_features) -> Tensor")


def _dense_impl(layout, n, m, in_features, out_features):
    from .cpu.prepacked import dense_rows

    return dense_rows(layout, n, m, in_features, out_features)


torch.library.impl("nmsparse::nm_prepacked_dense", "default", lib=_LIB)(_dense_impl)


@torch.library.register_fake("nmsparse::nm_prepacked_dense", lib=_LIB)
def _dense_fake(layout, n, m, in_features, out_features):
    return layout.new_empty((out_features, in_features), dtype=torch.bfloat16)


def _prepacked_impl(x, layout, n, m, in_features, out_features, bias=None):
    from .cpu.prepacked import nm_linear_prepacked

    return nm_linear_prepacked(x, layout, n, m, in_features, out_features, bias)


torch.library.impl("nmsparse::nm_linear_prepacked", "default", lib=_LIB)(_prepacked_impl)


@torch.library.register_fake("nmsparse::nm_linear_prepacked", lib=_LIB)
def _prepacked_fake(x, layout, n, m, in_features, out_features, bias=None):
    torch._check(x.shape[-1] == in_features, lambda: "input features do not match the weight")
    return x.new_empty((*x.shape[:-1], out_features))


def _setup_context(ctx, inputs, output) -> None:
    x, layout, n, m, in_features, out_features, bias = inputs
    ctx.save_for_backward(layout)
    ctx.shape = (n, m, in_features, out_features)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    (layout,) = ctx.saved_tensors
    weight = torch.ops.nmsparse.nm_prepacked_dense(layout, *ctx.shape)
    grad_x = grad @ weight.to(grad.dtype)
    grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
    return grad_x, None, None, None, None, None, grad_bias


torch.library.register_autograd("nmsparse::nm_linear_prepacked", _backward,
                                setup_context=_setup_context, lib=_LIB)

_KEYS = ("values", "indices", "bias")


class PreparedNMLinear(nn.Module):
    """``y = x @ W.T + bias`` with ``W`` (bf16, N:M) in the CPU kernel's prepared layout."""

    layout: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None = None) -> None:
        from .cpu.prepacked import prepack

        super().__init__()
        self.out_features, self.in_features = linear_shape(packed, "PreparedNMLinear")
        self.n, self.m = packed.n, packed.m
        self.register_buffer("layout", prepack(packed.values, packed.indices, self.n, self.m,
                                               self.in_features))
        self.register_buffer("bias", checked_bias(bias, self.out_features, "cpu",
                                                  torch.bfloat16))

    @classmethod
    def from_nm_linear(cls, layer: NMLinear) -> PreparedNMLinear:
        prepared = cls(layer.packed, layer.bias)
        prepared.train(layer.training)
        return prepared

    @property
    def pattern(self) -> NM:
        return NM(self.n, self.m)

    @property
    def packed(self) -> PackedWeight:
        from .cpu.prepacked import unprepack

        values, indices = unprepack(self.layout, self.n, self.m, self.in_features,
                                    self.out_features)
        return PackedWeight(values, indices, self.n, self.m,
                            (self.out_features, self.in_features), "in")

    def dense_weight(self) -> torch.Tensor:
        """The dense ``(out, in)`` bf16 weight (zeros at pruned positions)."""
        return _dense_impl(self.layout, self.n, self.m, self.in_features, self.out_features)

    def to_nm_linear(self) -> NMLinear:
        """The equivalent :class:`NMLinear` (its packed buffers, bit for bit)."""
        layer = NMLinear(self.packed, self.bias)
        layer.train(self.training)
        return layer

    def to_linear(self) -> nn.Linear:
        return self.to_nm_linear().to_linear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if call_directly(x, self.bias):
            return _prepacked_impl(x, self.layout, self.n, self.m, self.in_features,
                                   self.out_features, self.bias)
        return torch.ops.nmsparse.nm_linear_prepacked(x, self.layout, self.n, self.m,
                                                      self.in_features, self.out_features,
                                                      self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"pattern={self.n}:{self.m}, bias={self.bias is not None}, layout=cpu-prepared")

    # the checkpoint keys and bytes of NMLinear
    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        packed = self.packed
        destination[prefix + "values"] = packed.values
        destination[prefix + "indices"] = packed.indices
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        from .cpu.prepacked import prepack, prepack_reason

        wanted = [key for key in _KEYS if key != "bias" or self.bias is not None]
        for key in state_dict:
            if key.startswith(prefix) and key[len(prefix):] not in _KEYS and \
                    "." not in key[len(prefix):]:
                unexpected_keys.append(key)
        missing = [prefix + key for key in wanted if prefix + key not in state_dict]
        if missing:
            missing_keys.extend(missing)
            return
        values, indices = state_dict[prefix + "values"], state_dict[prefix + "indices"]
        expected = packed_shapes((self.out_features, self.in_features), self.n, self.m, "in")
        if (tuple(values.shape), tuple(indices.shape)) != expected:
            error_msgs.append(f"{prefix}values / indices of shapes {tuple(values.shape)} / "
                              f"{tuple(indices.shape)} do not fit a packed {self.pattern} "
                              f"{self.out_features}x{self.in_features} weight {expected}")
            return
        values, indices = values.to("cpu", torch.bfloat16), indices.to("cpu")
        reason = prepack_reason(values, self.n, self.m, indices)
        if reason:
            error_msgs.append(f"{prefix}values / indices cannot be prepared: {reason}")
            return
        with torch.no_grad():
            self.layout.copy_(prepack(values, indices, self.n, self.m, self.in_features))
            if self.bias is not None:
                self.bias.copy_(state_dict[prefix + "bias"])

    def _apply(self, fn, recurse=True):
        probe = fn(torch.zeros((), dtype=torch.bfloat16))
        if probe.device.type != "cpu" or probe.dtype != torch.bfloat16:
            raise ValueError(f"a PreparedNMLinear stays on the CPU in bfloat16 (asked for "
                             f"{probe.dtype} on {probe.device}): call "
                             "nmsparse.kernels.unprepare_cpu(model) first")
        return super()._apply(fn, recurse)


@dataclass
class PrepareReport:
    """What :func:`prepare_cpu` did to every NMLinear of the model."""

    rows: list[tuple[str, str, str]] = field(default_factory=list)  # name, pattern, reason

    @property
    def prepared(self) -> list[str]:
        return [name for name, _, reason in self.rows if not reason]

    @property
    def skipped(self) -> dict[str, str]:
        return {name: reason for name, _, reason in self.rows if reason}

    def __str__(self) -> str:
        head = (f"{len(self.prepared)} NMLinear layer(s) prepared for the CPU kernel, "
                f"{len(self.skipped)} left as they were")
        rows = [[name, pattern, "skipped" if reason else "prepared", reason]
                for name, pattern, reason in self.rows]
        return head + "\n" + format_table(["layer", "pattern", "status", "reason"], rows)


def prepare_cpu(model: nn.Module) -> PrepareReport:
    """Replace, in place, every :class:`NMLinear` layer of ``model`` by a
    :class:`PreparedNMLinear` where the prepared layout can hold it (bf16 on the CPU, a
    pattern it takes, a CPU with AVX512_BF16); the report says why each other layer was left
    as it was. (To prepare some layers only: :meth:`PreparedNMLinear.from_nm_linear`.)"""
    from .cpu.prepacked import prepack_reason

    report = PrepareReport()
    modules = dict(model.named_modules())
    plan = []
    for name, module in modules.items():
        if not isinstance(module, NMLinear):
            continue
        reason = prepack_reason(module.values, module.n, module.m, module.indices)
        if not reason and not name:
            reason = "the model itself is an NMLinear: use PreparedNMLinear.from_nm_linear"
        report.rows.append((name or "(model)", f"{module.n}:{module.m}", reason or ""))
        if not reason:
            plan.append(name)
    for name in plan:
        model.set_submodule(name, PreparedNMLinear.from_nm_linear(modules[name]))
    return report


def unprepare_cpu(model: nn.Module) -> int:
    """Turn every :class:`PreparedNMLinear` of ``model`` back into the :class:`NMLinear` it was
    (bit for bit), in place; returns how many."""
    modules = dict(model.named_modules())
    names = [name for name, module in modules.items()
             if isinstance(module, PreparedNMLinear) and name]
    for name in names:
        model.set_submodule(name, modules[name].to_nm_linear())
    return len(names)
