"""Which layers get which pattern: eligible weights and glob-based selection.

Eligible weights: ``nn.Linear``, ``nn.Conv1d/2d/3d`` (a grouped conv by its per-group input
dimension) and the input projections of ``nn.MultiheadAttention`` (its output projection is
an ``nn.Linear`` child and is eligible as such). Globs (``fnmatch``, ``*`` also crosses dots)
are matched against the qualified module name and the qualified weight name.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Mapping, Sequence

from torch import nn

from .patterns import NM, parse_pattern

PatternSpec = str | NM | tuple | None
DENSE = "dense"


def eligible_weights(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """``(module name, module, parameter name)`` of every weight that can be made N:M."""
    for module_name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            names = (["in_proj_weight"] if module._qkv_same_embed_dim
                     else ["q_proj_weight", "k_proj_weight", "v_proj_weight"])
        elif isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            names = ["weight"]
        else:
            continue
        for name in names:
            if module._parameters.get(name) is not None:
                yield module_name, module, name


def qualified(module_name: str, param_name: str) -> str:
    return f"{module_name}.{param_name}" if module_name else param_name


def _as_globs(value: str | Sequence[str] | None, what: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what} must be a glob string or a list of glob strings, got {value!r}")
    return list(value)


def _matches(glob: str, names: tuple[str, str]) -> bool:
    return any(fnmatch.fnmatchcase(name, glob) for name in names)


def _pattern_or_dense(spec: PatternSpec) -> NM | None:
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == DENSE):
        return None
    return parse_pattern(spec)


def choose_patterns(layers: Sequence[tuple[str, str]], pattern: PatternSpec | Mapping,
                    include=None, exclude=None) -> list[tuple[NM | None, str]]:
    """For each ``(module name, weight name)``: ``(pattern, "")`` or ``(None, why dense)``.

    ``pattern`` is one pattern for all, or a mapping ``{glob: pattern or None/"dense"}``
    where the first matching glob wins. A glob that matches no eligible layer is an error:
    a typo must not silently leave a layer dense.
    """
    includes, excludes = _as_globs(include, "include"), _as_globs(exclude, "exclude")
    if isinstance(pattern, Mapping):
        rules = [(glob, _pattern_or_dense(spec)) for glob, spec in pattern.items()]
        _as_globs([glob for glob, _ in rules], "pattern mapping keys")
    else:
        rules = [("*", _pattern_or_dense(pattern))]
    for what, globs in (("include", includes), ("exclude", excludes),
                        ("pattern", [glob for glob, _ in rules])):
        for glob in globs or ():
            if not any(_matches(glob, names) for names in layers):
                known = ", ".join(module for module, _ in layers[:12])
                more = " ..." if len(layers) > 12 else ""
                raise ValueError(f"{what} glob {glob!r} matches no eligible layer; "
                                 f"eligible layers: {known}{more}")
    choices = []
    for names in layers:
        if includes is not None and not any(_matches(g, names) for g in includes):
            choices.append((None, "not matched by include"))
            continue
        excluded_by = next((g for g in excludes or () if _matches(g, names)), None)
        if excluded_by is not None:
            choices.append((None, f"excluded by {excluded_by!r}"))
            continue
        rule = next(((glob, nm) for glob, nm in rules if _matches(glob, names)), None)
        if rule is None:
            choices.append((None, "no pattern in the mapping matches"))
        elif rule[1] is None:
            choices.append((None, f"dense by pattern rule {rule[0]!r}"))
        else:
            choices.append((rule[1], ""))
    return choices
