"""Per-layer parameter and MAC counts of a dense, sparse or finalized model.

Contract of :func:`summary`:

* It runs exactly one forward pass of ``model`` on ``example_input`` in eval mode under
  ``torch.no_grad()``, with forward hooks that only read shapes. The hooks are always removed
  and every module's train/eval flag restored, even when the forward pass raises.
* Every module with parameters of its own gets a row, so ``total.params_dense`` equals
  ``sum(p.numel() for p in model.parameters())``. A parameter shared by several modules is
  counted once, in the first module (in ``named_modules()`` order) that owns it.
* Weights of ``nn.Linear``, Hugging Face ``Conv1D``, ``nn.Conv{1,2,3}d``,
  ``nn.ConvTranspose{1,2,3}d`` and ``nn.MultiheadAttention`` (``in_proj_weight`` or
  ``q/k/v_proj_weight``), and any parameter that has a ``<name>_mask`` buffer, are
  *sparsifiable weights*: their kept count is the number of True entries of the mask
  buffer when it exists, otherwise the number of nonzero entries (so a finalized model
  counts its kept weights). Every other parameter (biases,
  norm and embedding parameters) counts in full.
* MACs (multiply-accumulates) are counted for every call of those layer types, so a module
  called twice counts twice. Each weight element is used ``uses`` times per call (Linear and
  Conv1D: output rows; Conv: batch * output positions; ConvTranspose: batch * input positions;
  attention projections: batch * sequence length), giving ``macs_dense = uses * numel`` and
  ``macs_sparse = uses * kept`` per weight tensor, exact integers. ``in_proj_weight`` is
  counted as its q, k and v thirds, each with its own sequence length and kept count.
* ``nn.MultiheadAttention``'s ``out_proj`` is reported on its own ``<mha>.out_proj`` row.
  PyTorch's attention reads ``out_proj.weight`` without calling the module, so the attention
  hook counts it there, unless ``out_proj`` was called as a module during that attention
  call (then its own hook counted it: never twice).
* The attention score and value matmuls (``QK^T`` and ``softmax(.)V``, ``2 * batch * L * S *
  embed_dim`` MACs, with ``S`` including ``bias_k`` / ``add_zero_attn`` positions) have no
  weights; they are reported on a separate ``<mha>:attention`` row, dense in both columns.
* Layers of other types (norms, embeddings, RNNs, ...) report 0 MACs; so do functional ops
  and operations without a module (activations, pooling, ``torch.matmul``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .engine.masks import MASK_SUFFIX
from .engine.selection import is_hf_conv1d
from .engine.sparse_module import original_class
from .tables import format_table

__all__ = ["LayerRow", "ModelSummary", "summary"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_MHA_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


@dataclass
class LayerRow:
    """One layer (or the total): parameter counts, weight density and MACs of one forward.

    ``density`` is the kept fraction of the row's sparsifiable weights (1.0 when it has
    none); ``calls`` is how many times the layer ran during the forward pass.
    """

    name: str
    type: str
    weight_shapes: tuple[tuple[int, ...], ...]
    params_dense: int
    params_kept: int
    density: float
    macs_dense: int
    macs_sparse: int
    calls: int

    def to_dict(self) -> dict[str, Any]:
        row = asdict(self)
        row["weight_shapes"] = [list(shape) for shape in self.weight_shapes]
        return row


@dataclass
class ModelSummary:
    """Rows in ``named_modules()`` order plus their ``total`` (named ``"TOTAL"``).

    ``total.density`` is the kept fraction over all sparsifiable weights of the model.
    """

    rows: list[LayerRow]
    total: LayerRow

    @property
    def compression(self) -> float:
        """Parameter compression, ``params_dense / params_kept`` (inf if nothing is kept)."""
        return _ratio(self.total.params_dense, self.total.params_kept)

    @property
    def mac_reduction(self) -> float:
        """MAC reduction, ``macs_dense / macs_sparse`` (inf if no MAC is left)."""
        return _ratio(self.total.macs_dense, self.total.macs_sparse)

    def to_dict(self) -> dict[str, Any]:
        """Plain lists/dicts/numbers; strict JSON (an infinite ratio becomes ``None``)."""
        return {
            "rows": [row.to_dict() for row in self.rows],
            "total": self.total.to_dict(),
            "compression": _finite_or_none(self.compression),
            "mac_reduction": _finite_or_none(self.mac_reduction),
        }

    def __str__(self) -> str:
        headers = ("Layer", "Type", "Weight shape", "Params", "Kept", "Density", "MACs",
                   "Sparse MACs")
        cells = [_cells(row) for row in self.rows]
        table = format_table(headers, [*cells, _cells(self.total)],
                             right_aligned=range(3, len(headers)))
        # format_table rules off only the header; a second rule sets the TOTAL row apart.
        lines = table.split("\n")
        lines.insert(len(lines) - 1, lines[1])
        return "\n".join([*lines,
                          f"Compression: {self.compression:.2f}x parameters (dense/kept), "
                          f"{self.mac_reduction:.2f}x MACs (dense/sparse)"])


def summary(model: nn.Module, example_input: Any, *,
            device: torch.device | str | None = None) -> ModelSummary:
    """Count parameters and MACs of ``model`` per layer, dense and N:M sparse.

    ``example_input`` is a tensor (``model(x)``), a tuple (``model(*args)``) or a dict with
    string keys (``model(**kwargs)``); tensors in it, also inside nested lists, tuples and
    dicts, are moved to ``device``, by default the device of the model's first parameter
    or buffer. The model itself is never moved. See the module docstring for the rules.
    """
    args, kwargs = _split_input(example_input)
    target = torch.device(device) if device is not None else _model_device(model)
    args, kwargs = _to_device(args, target), _to_device(kwargs, target)

    tallies = {m: _Tally() for m in model.modules() if _counts_macs(m)}
    attention: dict[nn.Module, int] = {}
    _run_hooked(model, args, kwargs, tallies, attention)

    rows: list[LayerRow] = []
    seen_params: set[int] = set()
    seen_weights: set[int] = set()
    weights_total = weights_kept = 0
    for name, module in model.named_modules():
        tally = tallies.get(module)
        own = {n: p for n, p in module._parameters.items() if p is not None}
        if tally is None and not own:
            continue
        macs_dense = macs_sparse = row_total = row_kept = 0
        shapes: list[tuple[int, ...]] = []
        kept_of: dict[str, int] = {}
        for weight_name, weight in _sparsifiable_weights(module, own).items():
            mask = module._buffers.get(weight_name + MASK_SUFFIX)
            if mask is not None and mask.shape != weight.shape:
                raise ValueError(
                    f"{name or 'model'}: buffer {weight_name}_mask has shape "
                    f"{tuple(mask.shape)} but {weight_name} has shape {tuple(weight.shape)}; "
                    "a mask must match its weight")
            uses = tally.uses.get(weight_name, [0]) if tally is not None else [0]
            chunks = (mask if mask is not None else weight).chunk(len(uses), dim=0)
            kept = [int(torch.count_nonzero(chunk)) for chunk in chunks]
            macs_dense += sum(u * chunk.numel() for u, chunk in zip(uses, chunks, strict=True))
            macs_sparse += sum(u * k for u, k in zip(uses, kept, strict=True))
            shapes.append(tuple(weight.shape))
            kept_of[weight_name] = sum(kept)
            row_total += weight.numel()
            row_kept += sum(kept)
            if id(weight) not in seen_weights:
                seen_weights.add(id(weight))
                weights_total += weight.numel()
                weights_kept += sum(kept)

        params_dense = params_kept = 0
        for param_name, param in own.items():
            if id(param) in seen_params:
                continue
            seen_params.add(id(param))
            params_dense += param.numel()
            params_kept += kept_of.get(param_name, param.numel())

        rows.append(LayerRow(name, original_class(module).__name__, tuple(shapes), params_dense,
                             params_kept, row_kept / row_total if row_total else 1.0,
                             macs_dense, macs_sparse, tally.calls if tally else 0))
        if isinstance(module, nn.MultiheadAttention):
            macs = attention.get(module, 0)
            rows.append(LayerRow(f"{name}:attention", "attention", (), 0, 0, 1.0, macs, macs,
                                 tally.calls))

    total = LayerRow(
        "TOTAL", "", (),
        sum(r.params_dense for r in rows), sum(r.params_kept for r in rows),
        weights_kept / weights_total if weights_total else 1.0,
        sum(r.macs_dense for r in rows), sum(r.macs_sparse for r in rows), 0)
    return ModelSummary(rows, total)


@dataclass
class _Tally:
    """What the hooks saw of one layer: calls, and per weight how often each element was
    used, per dim-0 chunk (three chunks, q/k/v, for ``in_proj_weight``)."""

    calls: int = 0
    uses: dict[str, list[int]] = field(default_factory=dict)

    def add(self, weight_name: str, *uses: int) -> None:
        totals = self.uses.setdefault(weight_name, [0] * len(uses))
        for i, u in enumerate(uses):
            totals[i] += u


def _counts_macs(module: nn.Module) -> bool:
    return (isinstance(module, (nn.Linear, *_CONV, *_CONV_TRANSPOSE, nn.MultiheadAttention))
            or is_hf_conv1d(module))


def _sparsifiable_weights(module: nn.Module,
                          own: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    names = [n for n in own if n + MASK_SUFFIX in module._buffers]
    if isinstance(module, nn.MultiheadAttention):
        names += [n for n in _MHA_WEIGHTS if n not in names]
    elif _counts_macs(module) and "weight" not in names:
        names.append("weight")
    weights = {}
    for weight_name in names:
        weight = own.get(weight_name)
        # A weight moved out of _parameters (torch.nn.utils.parametrize / prune) is still
        # what forward multiplies with; its attribute gives the effective tensor.
        if weight is None and weight_name not in module._parameters:
            weight = getattr(module, weight_name, None)
        if isinstance(weight, torch.Tensor):
            weights[weight_name] = weight
    return weights


def _run_hooked(model: nn.Module, args: tuple, kwargs: dict[str, Any],
                tallies: dict[nn.Module, _Tally], attention: dict[nn.Module, int]) -> None:
    """One no-grad eval forward pass with counting hooks; leaves the model as it found it."""
    training = {m: m.training for m in model.modules()}
    handles = []
    try:
        for module in tallies:
            if isinstance(module, nn.MultiheadAttention):
                out_proj_calls: list[int] = []
                handles.append(module.register_forward_pre_hook(
                    _out_proj_snapshot(tallies, out_proj_calls)))
                handles.append(module.register_forward_hook(
                    _mha_hook(tallies, attention, out_proj_calls), with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(_layer_hook(tallies),
                                                            with_kwargs=True))
        model.eval()
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
        # Restore flags directly: model.train(mode) would overwrite mixed per-module modes.
        for module, mode in training.items():
            module.training = mode


def _layer_hook(tallies: dict[nn.Module, _Tally]) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        if isinstance(module, nn.Linear):
            uses = output.numel() // module.out_features
        elif is_hf_conv1d(module):  # weight (in, out): one use per output row
            uses = output.numel() // module.nf
        elif isinstance(module, _CONV):
            uses = output.numel() // module.out_channels
        else:  # transposed conv: each input element meets every weight of its group once
            uses = _argument(args, kwargs, 0, "input").numel() // module.in_channels
        tally = tallies[module]
        tally.calls += 1
        tally.add("weight", uses)

    return hook


def _out_proj_snapshot(tallies: dict[nn.Module, _Tally],
                       out_proj_calls: list[int]) -> Callable[..., None]:
    def pre_hook(module: nn.MultiheadAttention, args: tuple) -> None:
        out_proj = tallies.get(module.out_proj)
        out_proj_calls.append(out_proj.calls if out_proj is not None else 0)

    return pre_hook


def _mha_hook(tallies: dict[nn.Module, _Tally], attention: dict[nn.Module, int],
              out_proj_calls: list[int]) -> Callable[..., None]:
    def hook(module: nn.MultiheadAttention, args: tuple, kwargs: dict[str, Any],
             output: Any) -> None:
        query = _argument(args, kwargs, 0, "query")
        key = _argument(args, kwargs, 1, "key")
        if query.dim() == 2:  # unbatched (L, E)
            batch, q_len, kv_len = 1, query.shape[0], key.shape[0]
        elif module.batch_first:
            batch, q_len, kv_len = query.shape[0], query.shape[1], key.shape[1]
        else:
            q_len, batch, kv_len = query.shape[0], query.shape[1], key.shape[0]
        q_rows, kv_rows = batch * q_len, batch * kv_len

        tally = tallies[module]
        tally.calls += 1
        if module._parameters.get("in_proj_weight") is not None:
            tally.add("in_proj_weight", q_rows, kv_rows, kv_rows)
        else:
            tally.add("q_proj_weight", q_rows)
            tally.add("k_proj_weight", kv_rows)
            tally.add("v_proj_weight", kv_rows)

        out_proj = tallies.get(module.out_proj)
        if out_proj is not None and out_proj.calls == out_proj_calls.pop():
            out_proj.calls += 1
            out_proj.add("weight", q_rows)

        scores_len = kv_len + (module.bias_k is not None) + int(module.add_zero_attn)
        attention[module] = (attention.get(module, 0)
                             + 2 * batch * q_len * scores_len * module.embed_dim)

    return hook


def _argument(args: tuple, kwargs: dict[str, Any], index: int, name: str) -> torch.Tensor:
    return args[index] if len(args) > index else kwargs[name]


def _split_input(example_input: Any) -> tuple[tuple, dict[str, Any]]:
    if isinstance(example_input, torch.Tensor):
        return (example_input,), {}
    if isinstance(example_input, tuple):
        return example_input, {}
    if isinstance(example_input, Mapping):
        bad = [k for k in example_input if not isinstance(k, str)]
        if bad:
            raise ValueError(
                f"example_input dict keys must be str (they are passed as keyword arguments, "
                f"model(**example_input)); got non-str keys {bad!r}")
        return (), dict(example_input)
    hint = ""
    if isinstance(example_input, list):
        hint = ("; for positional arguments pass a tuple, for a single list argument wrap it "
                "as (example_input,)")
    elif hasattr(example_input, "__array__"):
        hint = "; convert arrays with torch.as_tensor(example_input)"
    raise ValueError(
        "example_input must be a torch.Tensor (called as model(x)), a tuple (model(*args)) "
        f"or a dict with str keys (model(**kwargs)); got {type(example_input).__name__}{hint}")


def _model_device(model: nn.Module) -> torch.device:
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if type(value) in (tuple, list):
        return type(value)(_to_device(v, device) for v in value)
    if type(value) is dict:
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def _ratio(dense: int, kept: int) -> float:
    if kept:
        return dense / kept
    return math.inf if dense else 1.0


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _human(count: int) -> str:
    """3 significant digits with a K/M/G/T/P suffix: 25.6M, 4.09G; plain below 1000."""
    for suffix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        # 0.9995 * scale: a count that rounds up to 1000 of a unit prints as 1 of the next.
        if abs(count) >= 0.9995 * scale:
            return f"{count / scale:.3g}{suffix}"
    return str(count)


def _cells(row: LayerRow) -> list[str]:
    shapes = " + ".join("x".join(map(str, s)) for s in row.weight_shapes) or "-"
    return [row.name or "(root)", row.type, shapes, _human(row.params_dense),
            _human(row.params_kept), f"{row.density:.1%}", _human(row.macs_dense),
            _human(row.macs_sparse)]
