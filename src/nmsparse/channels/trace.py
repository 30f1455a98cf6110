"""Trace a model's channel dependency graph by running it once on an example input.

Why not ``torch.fx.symbolic_trace``: the project's own ViT and GPT check their input's shape
in ``forward`` (``if idx.dim() != 2``), which symbolic tracing refuses, and so does most of
Hugging Face. Here the model runs for real, under a ``TorchFunctionMode`` that sees every
torch function and tensor method at the top level (``F.linear``, ``F.conv2d``,
``F.batch_norm``, ``F.layer_norm``, ``F.embedding``, ``F.multi_head_attention_forward``,
``x + y``, ``x.view(...)``, ``torch.cat``...), with concrete shapes, so any Python control
flow is fine.

Every activation tensor gets a *layout*: which of its dimensions carries channels and which
channel spaces, in order, lie along it (a concatenation has several). Producers open a
space; elementwise ops, adds and residuals unify the spaces of their operands; the
consumers and per-channel parameters are recorded on the spaces they read. Anything the
rules below do not know to preserve channel order pins the spaces involved (safe: a pinned
group is never permuted). Spaces that reach the model output are pinned.

Manual override: ``opaque=`` names modules (or module classes) whose inside is not
analysed: what enters them is pinned and what leaves is a new pinned space. A model that
cannot run on the example input gets a one-line error; groups can also be written by hand
(:class:`~nmsparse.channels.groups.ChannelGroup`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .groups import ChannelGroup, Slice

# Ops that act on every element alike (or broadcast): channel order in = channel order out.
_ELEMENTWISE = {
    "add", "add_", "__add__", "__radd__", "__iadd__", "sub", "sub_", "__sub__", "__rsub__",
    "__isub__", "mul", "mul_", "__mul__", "__rmul__", "__imul__", "div", "div_", "__truediv__",
    "__rtruediv__", "__itruediv__", "relu", "relu_", "relu6", "gelu", "silu", "silu_",
    "sigmoid", "sigmoid_", "tanh", "tanh_", "hardtanh", "hardtanh_", "leaky_relu", "elu",
    "selu", "celu", "softplus", "mish", "hardswish", "hardsigmoid", "dropout", "dropout1d",
    "dropout2d", "dropout3d", "alpha_dropout", "contiguous", "clone", "float", "half",
    "bfloat16", "double", "to", "type_as", "neg", "__neg__", "abs", "exp", "sqrt", "rsqrt",
    "pow", "__pow__", "square", "clamp", "clamp_", "clip", "erf", "detach", "masked_fill",
    "cpu", "cuda", "requires_grad_", "maximum", "minimum", "log", "sin", "cos", "logsigmoid",
    "tanhshrink", "softsign", "threshold", "__and__", "__or__",
}
# Pools and resizes of NC... tensors: channels stay on dim 1.
_SPATIAL = {
    "avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d", "max_pool2d", "max_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
    "adaptive_max_pool2d", "adaptive_max_pool3d", "interpolate", "upsample", "lp_pool2d",
    "max_pool2d_with_indices", "_max_pool2d", "boolean_dispatch",
}
_RESHAPE = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "expand",
            "expand_as", "view_as", "reshape_as", "ravel", "squeeze_", "unsqueeze_"}
_REDUCE = {"mean", "sum", "amax", "amin", "max", "min", "std", "var", "norm", "logsumexp",
           "prod"}
_TRANSPOSE = {"transpose", "transpose_", "swapaxes", "permute", "movedim", "t", "mT", "T"}
_SPLIT = {"split", "chunk", "unbind", "tensor_split", "split_with_sizes"}
_CAT = {"cat", "concat", "concatenate", "stack"}
_IGNORED = {"size", "dim", "shape", "__get__", "numel", "__len__", "item", "tolist",
            "__bool__", "__format__", "__repr__", "is_floating_point", "element_size",
            "data_ptr", "stride", "is_contiguous", "__index__", "__int__", "__float__",
            "device", "dtype", "get_device", "nelement", "ndimension", "__hash__",
            "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__",
            "_has_compatible_shallow_copy_type"}


class TraceError(RuntimeError):
    """The model could not be run on the example input."""


@dataclass
class _Space:
    size: int
    members: list[Slice] = field(default_factory=list)
    pinned: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Layout:
    dim: int  # non-negative
    spaces: tuple[int, ...]  # space ids along ``dim``, in order


class _Graph:
    """Union-find over channel spaces, and the layout of every live activation."""

    def __init__(self, names: dict[int, str]) -> None:
        self.names = names  # id(parameter or buffer) -> qualified name
        self.spaces: list[_Space] = []
        self.parent: list[int] = []
        self.layouts: dict[int, _Layout] = {}
        self.alive: list[torch.Tensor] = []  # keeps ids unique while tracing
        # id(tensor) -> (parameter name, its last dim) for views of a parameter that keep
        # its last dimension last (a class token expanded to the batch)
        self.views: dict[int, tuple[str, int]] = {}

    # -- spaces ----------------------------------------------------------------------------
    def new(self, size: int, pinned: str | None = None) -> int:
        self.spaces.append(_Space(size, pinned=[pinned] if pinned else []))
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, space: int) -> int:
        while self.parent[space] != space:
            self.parent[space] = self.parent[self.parent[space]]
            space = self.parent[space]
        return space

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        keep, gone = self.spaces[a], self.spaces[b]
        keep.members += gone.members
        keep.pinned += gone.pinned
        keep.notes += gone.notes
        self.parent[b] = a

    def space(self, space: int) -> _Space:
        return self.spaces[self.find(space)]

    def size(self, layout: _Layout) -> int:
        return sum(self.space(s).size for s in layout.spaces)

    def pin(self, layout: _Layout | None, reason: str) -> None:
        if layout is not None:
            for s in layout.spaces:
                self.space(s).pinned.append(reason)

    def record(self, layout: _Layout, tensor: str, dim: int, role: str) -> None:
        """Slices of ``tensor`` along ``dim``, one per space of ``layout``, in order."""
        start = 0
        for s in layout.spaces:
            space = self.space(s)
            space.members.append(Slice(tensor, dim, start, space.size, role))
            start += space.size

    # -- activations -------------------------------------------------------------------------
    def layout(self, value: Any) -> _Layout | None:
        return self.layouts.get(id(value)) if isinstance(value, torch.Tensor) else None

    def set(self, tensor: Any, layout: _Layout | None) -> None:
        if isinstance(tensor, torch.Tensor):
            self.alive.append(tensor)
            if layout is None:
                self.layouts.pop(id(tensor), None)
            else:
                self.layouts[id(tensor)] = layout

    def fresh(self, tensor: torch.Tensor, dim: int, pinned: str | None = None) -> _Layout:
        layout = _Layout(dim, (self.new(tensor.shape[dim], pinned),))
        self.set(tensor, layout)
        return layout

    def unify(self, a: _Layout, b: _Layout, why: str) -> None:
        """``a`` and ``b`` index the same channels: unify their spaces run by run."""
        cuts = lambda layout: [sum(self.space(s).size for s in layout.spaces[:i + 1])  # noqa: E731
                               for i in range(len(layout.spaces))]
        if cuts(a) != cuts(b):
            self.pin(a, f"{why} channels concatenated differently")
            self.pin(b, f"{why} channels concatenated differently")
            return
        for x, y in zip(a.spaces, b.spaces, strict=True):
            self.union(x, y)

    def groups(self) -> list[ChannelGroup]:
        roots = sorted({self.find(i) for i in range(len(self.spaces))})
        found = []
        for root in roots:
            space = self.spaces[root]
            if not space.members:
                continue
            members = list(dict.fromkeys(space.members))
            found.append(ChannelGroup(space.size, members, list(dict.fromkeys(space.pinned)),
                                      list(dict.fromkeys(space.notes))))
        return found


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default


def _dims(value: Any, ndim: int) -> list[int] | None:
    if value is None:
        return None
    values = [value] if isinstance(value, int) else list(value)
    return [v % ndim for v in values]


class _Recorder(TorchFunctionMode):
    """Applies the layout rules to every top-level torch call while the model runs."""

    def __init__(self, graph: _Graph) -> None:
        super().__init__()
        self.g = graph
        self.opaque_depth = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.opaque_depth:
            return out
        name = getattr(func, "__name__", "")
        try:
            self.follow_parameter_view(name, args, out)
            self.apply(name, args, kwargs, out)
        except Exception as error:  # a rule that does not fit: pin, never guess
            self.pin_inputs(args, kwargs, f"{name}: {error}")
        return out

    # -- helpers -----------------------------------------------------------------------------
    def follow_parameter_view(self, name: str, args: tuple, out: Any) -> None:
        source = args[0] if args else None
        if not isinstance(source, torch.Tensor) or not isinstance(out, torch.Tensor) \
                or name not in _RESHAPE | _ELEMENTWISE or source.dim() == 0 or out.dim() == 0:
            return
        view = self.g.views.get(id(source))
        if view is None and self.param(source) is not None:
            view = (self.param(source), source.dim() - 1)
        if view is not None and out.shape[-1] == source.shape[-1]:
            self.g.alive.append(out)
            self.g.views[id(out)] = view

    def param(self, value: Any) -> str | None:
        return self.g.names.get(id(value)) if isinstance(value, torch.Tensor) else None

    def tensors(self, args, kwargs) -> list[torch.Tensor]:
        return [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]

    def pin_inputs(self, args, kwargs, reason: str) -> None:
        for tensor in self.tensors(args, kwargs):
            self.g.pin(self.g.layout(tensor), reason)

    def input_layout(self, value: torch.Tensor, dim: int, what: str) -> _Layout:
        """The layout of an input read along ``dim``; a new pinned space if it is unknown."""
        layout = self.g.layout(value)
        if layout is not None and layout.dim == dim % value.dim():
            return layout
        self.g.pin(layout, f"{what} reads them along another dimension")
        return _Layout(dim % value.dim(), (self.g.new(value.shape[dim],
                                                      f"{what} input is not traced"),))

    # -- rules -------------------------------------------------------------------------------
    def apply(self, name: str, args: tuple, kwargs: dict, out: Any) -> None:
        g = self.g
        if name in _IGNORED or not self.tensors(args, kwargs):
            return
        if name == "linear":
            self.weighted(args[0], _arg(args, kwargs, 1, "weight"),
                          _arg(args, kwargs, 2, "bias"), out, -1, "linear")
        elif name in ("conv1d", "conv2d", "conv3d"):
            self.conv(args, kwargs, out)
        elif name == "addmm" and self.param(_arg(args, kwargs, 2, "mat2")):
            # Hugging Face Conv1D: bias + x @ W with W stored (in, out)
            weight, bias = args[2], args[0]
            layout = self.input_layout(args[1], -1, self.param(weight))
            g.record(layout, self.param(weight), 0, "consumer")
            produced = g.fresh(out, out.dim() - 1)
            g.record(produced, self.param(weight), 1, "producer")
            if self.param(bias):
                g.record(produced, self.param(bias), 0, "producer")
        elif name == "batch_norm":
            self.norm(args[0], 1, [_arg(args, kwargs, i, n) for i, n in
                                   ((1, "running_mean"), (2, "running_var"), (3, "weight"),
                                    (4, "bias"))], out, "batch_norm")
        elif name == "layer_norm":
            shape = _arg(args, kwargs, 1, "normalized_shape")
            params = [_arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias")]
            if len(tuple(shape)) == 1:
                self.norm(args[0], -1, params, out, "layer_norm")
            else:
                self.pin_inputs(args, kwargs, "layer_norm over several dimensions")
        elif name == "group_norm":
            params = [_arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias")]
            self.norm(args[0], 1, params, out, "group_norm")
            g.pin(g.layout(out), "group_norm mixes channels of a group")
        elif name == "embedding":
            weight = _arg(args, kwargs, 1, "weight")
            if self.param(weight) is None:
                self.pin_inputs(args, kwargs, "embedding of a non-parameter table")
                return
            produced = g.fresh(out, out.dim() - 1)
            g.record(produced, self.param(weight), 1, "producer")
        elif name == "multi_head_attention_forward":
            self.attention(args, kwargs, out)
        elif name in _ELEMENTWISE:
            self.elementwise(name, args, kwargs, out)
        elif name in _SPATIAL:
            layout = g.layout(args[0])
            first = out[0] if isinstance(out, tuple) else out
            if layout is not None and layout.dim == 1:
                g.set(first, layout)
            else:
                self.pin_inputs(args, kwargs, f"{name} on a tensor without channels on dim 1")
        elif name in _RESHAPE:
            self.reshape(name, args, out)
        elif name in _TRANSPOSE:
            self.transpose(name, args, kwargs, out)
        elif name in _REDUCE:
            self.reduce(name, args, kwargs, out)
        elif name in ("softmax", "log_softmax", "_softmax"):
            layout = g.layout(args[0])
            dim = _arg(args, kwargs, 1, "dim")
            if layout is not None and dim is not None and dim % args[0].dim() == layout.dim:
                g.pin(layout, f"{name} across channels")
            g.set(out, layout)
        elif name in _CAT:
            self.cat(name, args, kwargs, out)
        elif name in _SPLIT:
            self.split(name, args, kwargs, out)
        elif name == "__getitem__":
            self.getitem(args, out)
        else:
            self.pin_inputs(args, kwargs, f"{name} is not known to keep channel order")

    def weighted(self, x, weight, bias, out, dim: int, what: str) -> None:
        g = self.g
        name = self.param(weight)
        if name is None:
            self.pin_inputs((x,), {}, f"{what} with a weight that is not a model parameter")
            g.fresh(out, dim % out.dim(), f"{what} with a weight that is not a parameter")
            return
        g.record(self.input_layout(x, dim, name), name, 1, "consumer")
        produced = g.fresh(out, dim % out.dim())
        g.record(produced, name, 0, "producer")
        if self.param(bias):
            g.record(produced, self.param(bias), 0, "producer")

    def conv(self, args, kwargs, out) -> None:
        g = self.g
        x, weight = args[0], _arg(args, kwargs, 1, "weight")
        bias, groups = _arg(args, kwargs, 2, "bias"), _arg(args, kwargs, 6, "groups", 1)
        if groups == 1:
            self.weighted(x, weight, bias, out, 1, "conv")
            return
        name = self.param(weight)
        layout = self.input_layout(x, 1, name or "conv")
        if name is not None and groups == x.shape[1] == out.shape[1]:
            # depthwise: output channel c is input channel c filtered on its own
            g.set(out, layout)
            g.record(layout, name, 0, "follower")
            if self.param(bias):
                g.record(layout, self.param(bias), 0, "follower")
            return
        g.pin(layout, f"grouped conv {name} (groups={groups}) ties channels to groups")
        produced = g.fresh(out, 1, f"grouped conv {name} (groups={groups}) output")
        if name is not None:
            g.record(layout, name, 1, "consumer")
            g.record(produced, name, 0, "producer")
            if self.param(bias):
                g.record(produced, self.param(bias), 0, "producer")

    def norm(self, x, dim: int, params: list, out, what: str) -> None:
        layout = self.input_layout(x, dim, what)
        if what != "batch_norm":  # statistics over the channels: fine to move, not to remove
            for s in layout.spaces:
                self.g.space(s).notes.append(f"{what} statistics over the channels")
        for param in params:
            if param is not None:
                name = self.param(param)
                if name is None:
                    self.g.pin(layout, f"{what} with a tensor that is not a model parameter")
                else:
                    self.g.record(layout, name, 0, "follower")
        self.g.set(out, layout)

    def attention(self, args, kwargs, out) -> None:
        g = self.g
        query, key, value = args[0], args[1], args[2]
        names = ["in_proj_weight", "out_proj_weight", "out_proj_bias"]
        index = {"in_proj_weight": 5, "out_proj_weight": 11, "out_proj_bias": 12}
        tensors = {n: _arg(args, kwargs, index[n], n) for n in names}
        separate = _arg(args, kwargs, 17, "use_separate_proj_weight", False)
        if separate or self.param(tensors["in_proj_weight"]) is None:
            self.pin_inputs((query, key, value), {}, "attention with separate projections")
            g.fresh(out[0], 2, "attention output with separate projections")
            return
        layout = self.input_layout(query, 2, "attention")
        for other in (key, value):
            if other is not query:
                g.unify(layout, self.input_layout(other, 2, "attention"), "attention q/k/v")
        g.record(layout, self.param(tensors["in_proj_weight"]), 1, "consumer")
        produced = g.fresh(out[0], 2)
        for s in (*layout.spaces, *produced.spaces):  # embed_dim is fixed by the heads
            g.space(s).notes.append("attention embedding width")
        for n in ("out_proj_weight", "out_proj_bias"):
            if self.param(tensors[n]):
                g.record(produced, self.param(tensors[n]), 0, "producer")

    def operand_layout(self, value, out_dim: int, out: torch.Tensor) -> _Layout | None | str:
        """How an operand of a broadcasting op lines up with output dimension ``out_dim``:
        its layout there, ``None`` if it broadcasts along it, or ``"bad"``."""
        if not isinstance(value, torch.Tensor):
            return None
        offset = out.dim() - value.dim()
        local = out_dim - offset
        if local < 0 or value.shape[local] == 1:
            return None if self.g.layout(value) is None else "bad"
        layout = self.g.layout(value)
        if layout is not None:
            return layout if layout.dim == local else "bad"
        name, dim = self.param(value), local
        if name is None and id(value) in self.g.views and local == value.dim() - 1:
            name, dim = self.g.views[id(value)]
        if name is not None:  # a parameter added per channel (position embedding, class token)
            layout = _Layout(local, (self.g.new(value.shape[local]),))
            self.g.record(layout, name, dim, "follower")
            return layout
        return "bad"

    def elementwise(self, name, args, kwargs, out) -> None:
        g = self.g
        operands = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        target = out if isinstance(out, torch.Tensor) else operands[0]
        known = [(a, g.layout(a)) for a in operands if g.layout(a) is not None]
        if not known:
            return
        first = known[0][1]
        out_dim = first.dim + target.dim() - known[0][0].dim()
        lined_up = [self.operand_layout(a, out_dim, target) for a in operands]
        if any(layout == "bad" for layout in lined_up):
            for a in operands:
                g.pin(g.layout(a), f"{name} combines channels with an untraced tensor")
            g.set(out, None)
            return
        present = [layout for layout in lined_up if layout is not None]
        for other in present[1:]:
            g.unify(present[0], other, name)
        g.set(out, _Layout(out_dim, present[0].spaces))

    def reshape(self, name, args, out) -> None:
        g = self.g
        x = args[0]
        layout = g.layout(x)
        if layout is None or not isinstance(out, torch.Tensor):
            return
        size = x.shape[layout.dim]
        if name in ("expand", "expand_as") and out.dim() >= x.dim():
            g.set(out, _Layout(layout.dim + out.dim() - x.dim(), layout.spaces))
            return
        before = math.prod(x.shape[:layout.dim])
        product = 1
        for k, extent in enumerate(out.shape):
            if product == before and extent == size:
                g.set(out, _Layout(k, layout.spaces))
                return
            product *= extent
        g.pin(layout, f"{name} to {tuple(out.shape)} splits or merges the channels "
              "(e.g. into attention heads)")
        g.set(out, None)

    def transpose(self, name, args, kwargs, out) -> None:
        g = self.g
        x = args[0]
        layout = g.layout(x)
        if layout is None:
            return
        d, ndim = layout.dim, x.dim()
        if name in ("t", "T", "mT") or (name in ("transpose", "transpose_", "swapaxes")):
            if name in ("t", "T"):
                pair = (0, 1) if ndim == 2 else (0, 0)
            elif name == "mT":
                pair = (ndim - 2, ndim - 1)
            else:
                pair = (args[1] % ndim, args[2] % ndim)
            mapped = pair[1] if d == pair[0] else pair[0] if d == pair[1] else d
        elif name == "permute":
            order = args[1:] if len(args) > 2 or isinstance(args[1], int) else args[1]
            mapped = [o % ndim for o in order].index(d)
        else:  # movedim
            source, destination = _dims(args[1], ndim), _dims(args[2], ndim)
            order = [i for i in range(ndim) if i not in source]
            for s, t in sorted(zip(destination, source, strict=True)):
                order.insert(s, t)
            mapped = order.index(d)
        g.set(out, _Layout(mapped, layout.spaces))

    def reduce(self, name, args, kwargs, out) -> None:
        g = self.g
        x = args[0]
        layout = g.layout(x)
        result = out[0] if isinstance(out, tuple) else out
        if layout is None or not isinstance(result, torch.Tensor):
            return
        dims = _dims(_arg(args, kwargs, 1, "dim"), x.dim())
        if dims is None or layout.dim in dims:
            for s in layout.spaces:
                g.space(s).notes.append(f"{name} over the channels")
            g.set(result, None)
            return
        keep = result.dim() == x.dim()
        g.set(result, _Layout(layout.dim - (0 if keep else sum(d < layout.dim for d in dims)),
                              layout.spaces))

    def cat(self, name, args, kwargs, out) -> None:
        g = self.g
        tensors = list(_arg(args, kwargs, 0, "tensors"))
        dim = _arg(args, kwargs, 1, "dim", 0) % out.dim()
        if name == "stack":
            lined = [g.layout(t) for t in tensors]
            if any(lay is None for lay in lined):
                for lay in lined:
                    g.pin(lay, "stacked with an untraced tensor")
                return
            for other in lined[1:]:
                g.unify(lined[0], other, "stack")
            base = lined[0]
            g.set(out, _Layout(base.dim + (dim <= base.dim), base.spaces))
            return
        lined = [g.layout(t) for t in tensors]
        if all(lay is None for lay in lined):
            return
        if any(lay is not None and lay.dim == dim for lay in lined):
            spaces: list[int] = []
            for t, lay in zip(tensors, lined, strict=True):
                if lay is None or lay.dim != dim:
                    g.pin(lay, "concatenated along another dimension")
                    lay = _Layout(dim, (g.new(t.shape[dim], "concatenated untraced tensor"),))
                spaces += lay.spaces
            g.set(out, _Layout(dim, tuple(spaces)))
            return
        lined_up = [self.operand_layout(t, next(lay for lay in lined if lay).dim, out)
                    for t in tensors]
        if any(lay == "bad" for lay in lined_up):
            for lay in lined:
                g.pin(lay, "concatenated with an untraced tensor")
            return
        present = [lay for lay in lined_up if lay is not None]
        for other in present[1:]:
            g.unify(present[0], other, "cat")
        g.set(out, present[0])

    def split(self, name, args, kwargs, out) -> None:
        g = self.g
        x = args[0]
        layout = g.layout(x)
        if layout is None:
            return
        dim = _arg(args, kwargs, 2 if name != "unbind" else 1, "dim", 0) % x.dim()
        pieces = list(out)
        if dim != layout.dim:
            for piece in pieces:
                shift = int(name == "unbind" and dim < layout.dim)
                g.set(piece, _Layout(layout.dim - shift, layout.spaces))
            return
        cuts, start = {}, 0
        for s in layout.spaces:
            cuts[start] = s
            start += g.space(s).size
        start = 0
        for piece in pieces:
            length = piece.shape[dim] if name != "unbind" else 1
            inside, position = [], start
            while position in cuts and position < start + length:
                inside.append(cuts[position])
                position += g.space(cuts[position]).size
            if position != start + length or name == "unbind":
                g.pin(layout, f"{name} cuts through a run of channels")
                for p in pieces:
                    g.set(p, None)
                return
            g.set(piece, _Layout(dim, tuple(inside)))
            start += length

    def getitem(self, args, out) -> None:
        g = self.g
        x, key = args[0], args[1]
        layout = g.layout(x)
        if layout is None or not isinstance(out, torch.Tensor):
            return
        key = key if isinstance(key, tuple) else (key,)
        if any(isinstance(k, (torch.Tensor, list)) for k in key):
            g.pin(layout, "advanced indexing")
            g.set(out, None)
            return
        explicit = sum(k is not None and k is not Ellipsis for k in key)
        expanded: list = []
        for k in key:
            if k is Ellipsis:
                expanded += [slice(None)] * (x.dim() - explicit)
            else:
                expanded.append(k)
        expanded += [slice(None)] * (x.dim() - sum(k is not None for k in expanded))
        in_dim = out_dim = 0
        for k in expanded:
            if k is None:
                out_dim += 1
                continue
            if in_dim == layout.dim:
                whole = isinstance(k, slice) and k.step in (None, 1) and \
                    range(*k.indices(x.shape[in_dim])) == range(x.shape[in_dim])
                if not whole:
                    g.pin(layout, "indexed along the channels")
                    g.set(out, None)
                    return
                g.set(out, _Layout(out_dim, layout.spaces))
                return
            in_dim += 1
            out_dim += int(not isinstance(k, int))


def _names(model: nn.Module) -> dict[int, str]:
    names: dict[int, str] = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False),
                         *model.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(tensor), name)
    return names


def _opaque_hooks(model: nn.Module, opaque: Iterable, recorder: _Recorder) -> list:
    wanted = list(opaque)
    hooks = []
    for module_name, module in model.named_modules():
        if not any(module_name == w or (isinstance(w, type) and isinstance(module, w))
                   for w in wanted):
            continue

        def before(module, args, kwargs, module_name=module_name):
            recorder.pin_inputs(args, kwargs, f"enters opaque module {module_name}")
            recorder.opaque_depth += 1

        def after(module, args, kwargs, output, module_name=module_name):
            recorder.opaque_depth -= 1
            for tensor in tree_flatten(output)[0]:
                if isinstance(tensor, torch.Tensor) and tensor.dim() > 0:
                    recorder.g.set(tensor, None)

        hooks.append(module.register_forward_pre_hook(before, with_kwargs=True))
        hooks.append(module.register_forward_hook(after, with_kwargs=True))
    return hooks


def channel_graph(model: nn.Module, example: Any, *, opaque: Iterable = ()
                  ) -> list[ChannelGroup]:
    """The groups of coupled channels of ``model``, traced by running it on ``example``
    (a tensor, a tuple of positional arguments, or a dict of keyword arguments).

    ``opaque``: module names or classes whose inside is not analysed (their inputs and
    outputs are pinned). The model is run in eval mode without gradients and restored.
    """
    graph = _Graph(_names(model))
    recorder = _Recorder(graph)
    hooks = _opaque_hooks(model, opaque, recorder)
    was_training = model.training
    model.eval()
    args, kwargs = ((), dict(example)) if isinstance(example, dict) else \
        ((tuple(example) if isinstance(example, (tuple, list)) else (example,)), {})
    try:
        with torch.no_grad(), recorder:
            output = model(*args, **kwargs)
    except Exception as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise TraceError(f"cannot trace {type(model).__name__} on the example input "
                         f"({type(error).__name__}: {message}); give an example its forward "
                         "accepts, mark the failing module opaque=[name], or write the "
                         "ChannelGroups by hand") from None
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    if isinstance(output, dict):  # Hugging Face ModelOutput included
        output = list(output.values())
    for tensor in tree_flatten(output)[0]:
        graph.pin(graph.layout(tensor), "reaches the model output")
    return graph.groups()
