"""``check(model_or_state_dict, pattern)``: which layers really follow their pattern.

The pattern says what complies (:meth:`~nmsparse.patterns.Pattern.violations`; for N:M a
group complies when it has at most N non-zero entries). For a live sparse layer the weight
the forward pass uses is checked (``module.weight``: a write into it, e.g. a LoRA merge,
shows; under FSDP2 the mask is checked); for a state dict holding ``<weight>_mask`` the
mask; otherwise the weight's non-zeros (a finalized or exported model).
For a model the eligible weights are checked (Linear, Conv, MultiheadAttention); for a state
dict every floating 2-D to 5-D tensor whose key ends in ``weight``: narrow it with
``include`` / ``exclude``. A state dict does not say which weights are stored ``(in, out)``
(Hugging Face ``Conv1D``, e.g. GPT-2's ``c_attn``, ``c_proj``, ``c_fc``): name them with
``transposed`` globs so their groups run along the input axis as in the live model.

Sharded models and state dicts (FSDP2, DTensors) are checked whole: each checked tensor is
all-gathered in turn, so call ``check`` on every rank; every rank gets the same report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .engine._dtensor import gather, is_dtensor
from .engine.masks import MASK_SUFFIX
from .engine.selection import PatternSpec, as_globs, choose, matches, select
from .patterns import OnTranspose, Pattern
from .patterns.grouping import check_layout
from .tables import format_table


class NMViolationError(ValueError):
    """Raised by :func:`check` with ``raise_on_violation=True``."""


@dataclass(frozen=True)
class CheckRow:
    name: str
    shape: tuple[int, ...]
    pattern: Pattern | None
    groups: int = 0
    violating_groups: int = 0
    max_kept: int = 0
    note: str = ""

    @property
    def status(self) -> str:
        if self.pattern is None:
            return "skipped"
        return "violation" if self.violating_groups else "ok"


@dataclass
class CheckReport:
    rows: list[CheckRow] = field(default_factory=list)

    @property
    def violations(self) -> list[CheckRow]:
        return [row for row in self.rows if row.status == "violation"]

    @property
    def ok(self) -> bool:
        return not self.violations

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        rows = [[row.name, "x".join(map(str, row.shape)), str(row.pattern or "-"), row.status,
                 f"{row.violating_groups}/{row.groups}" if row.pattern else "",
                 row.max_kept if row.pattern else "", row.note] for row in self.rows]
        verdict = "all checked layers are N:M" if self.ok else \
            f"{len(self.violations)} layer(s) violate their pattern"
        return verdict + "\n" + format_table(
            ["weight", "shape", "pattern", "status", "bad groups", "max kept", "note"], rows,
            right_aligned=(4, 5))


def _tensors_of_state_dict(state_dict: Mapping[str, torch.Tensor]):
    for key, tensor in state_dict.items():
        if (not key.rsplit(".", 1)[-1].endswith("weight") or not isinstance(tensor, torch.Tensor)
                or not torch.is_floating_point(tensor) or not 2 <= tensor.dim() <= 5):
            continue
        module_name = key.rsplit(".", 1)[0] if "." in key else ""
        yield module_name, key, state_dict.get(key + MASK_SUFFIX, tensor)


def _model_rows(model: nn.Module, pattern, include, exclude, layout: str):
    """The eligible weights as :func:`~nmsparse.engine.selection.select` chose them (a tied weight
    under each of its names, as the state dict holds it); a live sparse weight is checked by
    the weight its forward pass uses (a write into it that bypassed the mask shows), or its
    mask when sharded (FSDP2: the mask is gathered, the forward weight is not)."""
    for choice in select(model, pattern, include, exclude, layout=layout, tied="each"):
        state = choice.sparse_state
        if state is None:
            tensor = choice.weight.detach()
        elif is_dtensor(state.owned()):
            tensor = state.mask
        else:
            tensor = state.forward_weight().detach()
        yield choice.name, tensor, choice.pattern, choice.reason


def _state_dict_rows(state_dict: Mapping[str, torch.Tensor], pattern, include, exclude,
                     layout: str, transposed_globs: list[str]):
    tensors = list(_tensors_of_state_dict(state_dict))
    if not tensors:
        raise ValueError("nothing to check: no eligible weight found")
    names = [(module_name, name) for module_name, name, _ in tensors]
    choices = choose(names, pattern, include, exclude, layout=layout)
    for glob in transposed_globs:
        if not any(matches(glob, pair) for pair in names):
            raise ValueError(f"transposed glob {glob!r} matches no checked weight")
    for (_, name, tensor), pair, (chosen, _, reason) in zip(tensors, names, choices,
                                                            strict=True):
        if chosen is not None and any(matches(glob, pair) for glob in transposed_globs):
            chosen = OnTranspose(chosen)
        error = chosen.why_not(tuple(tensor.shape)) if chosen is not None else None
        yield name, tensor, None if error else chosen, reason or error


def check(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
          pattern: PatternSpec | Mapping[str, PatternSpec] = "2:4", *,
          include: str | Sequence[str] | None = None,
          exclude: str | Sequence[str] | None = None, layout: str = "in",
          transposed: str | Sequence[str] | None = None,
          raise_on_violation: bool = False) -> CheckReport:
    """Report, per layer, how many M-groups hold more than N non-zeros."""
    check_layout(layout)
    transposed_globs = as_globs(transposed, "transposed") or []
    if isinstance(model_or_state_dict, nn.Module):
        if transposed_globs:
            raise ValueError("transposed= applies to state dicts: in a model, Hugging Face "
                             "Conv1D layers are recognised by their class")
        rows = _model_rows(model_or_state_dict, pattern, include, exclude, layout)
    elif isinstance(model_or_state_dict, Mapping):
        rows = _state_dict_rows(model_or_state_dict, pattern, include, exclude, layout,
                                transposed_globs)
    else:
        raise ValueError("check takes an nn.Module or a state dict (a mapping of names to "
                         f"tensors), got {type(model_or_state_dict).__name__}")
    report = CheckReport()
    for name, tensor, chosen, reason in rows:
        shape = tuple(tensor.shape)
        if chosen is None:
            report.rows.append(CheckRow(name, shape, None, note=reason))
            continue
        found = chosen.violations(gather(tensor))
        report.rows.append(CheckRow(name, shape, chosen, found.groups, found.violating,
                                    found.max_kept))
    if raise_on_violation and not report.ok:
        raise NMViolationError(str(report))
    return report
