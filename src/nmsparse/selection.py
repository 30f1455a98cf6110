"""Which layers get which pattern and method: eligible weights and glob-based selection.

Eligible weights: ``nn.Linear``, ``nn.Conv1d/2d/3d`` (a grouped conv by its per-group input
dimension), the input projections of ``nn.MultiheadAttention`` (its output projection is
an ``nn.Linear`` child and is eligible as such) and Hugging Face's ``Conv1D``, whose
``(in, out)`` weight is grouped along its input dimension (dim 0) through
:class:`~nmsparse.patterns.OnTranspose`. Globs (``fnmatch``, ``*`` also crosses dots)
are matched against the qualified module name and the qualified weight name.

A rule's value is a pattern spec (``"2:4"``, an :class:`~nmsparse.patterns.Pattern`, ``(2, 4)``),
``None`` / ``"dense"`` (keep dense), or a pair ``(pattern spec, method)`` where the method is a
registered name or a :class:`~nmsparse.methods.Method` instance.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Mapping, Sequence

from torch import nn

from .methods import Method, make_method
from .patterns import OnTranspose, Pattern, parse_pattern
from .sparse_module import original_class

PatternSpec = str | Pattern | tuple | None
DENSE = "dense"


def is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (a Linear whose weight is stored ``(in, out)``), recognised
    without importing transformers."""
    cls = original_class(module)
    return (cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.")
            and isinstance(getattr(module, "nf", None), int))


def layer_pattern(module: nn.Module, pattern: Pattern) -> Pattern:
    """The pattern as it applies to ``module``'s weight (transposed for ``Conv1D``)."""
    return OnTranspose(pattern) if is_hf_conv1d(module) else pattern


def eligible_weights(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """``(module name, module, parameter name)`` of every weight that can be made N:M."""
    for module_name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            names = (["in_proj_weight"] if module._qkv_same_embed_dim
                     else ["q_proj_weight", "k_proj_weight", "v_proj_weight"])
        elif isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) \
                or is_hf_conv1d(module):
            names = ["weight"]
        else:
            continue
        for name in names:
            if module._parameters.get(name) is not None:
                yield module_name, module, name


def qualified(module_name: str, param_name: str) -> str:
    return f"{module_name}.{param_name}" if module_name else param_name


def as_globs(value: str | Sequence[str] | None, what: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what} must be a glob string or a list of glob strings, got {value!r}")
    return list(value)


def matches(glob: str, names: tuple[str, str]) -> bool:
    return any(fnmatch.fnmatchcase(name, glob) for name in names)


def _is_pattern_and_method(spec: object) -> bool:
    """``("4:8", "ste")`` or ``("2:4", SRSTE())``, as opposed to the pattern ``(2, 4)``."""
    return (isinstance(spec, tuple) and len(spec) == 2
            and isinstance(spec[1], (str, Method)) and not isinstance(spec[0], int))


def _rule(spec: object, default_method: Method | None,
          layout: str) -> tuple[Pattern | None, Method | None]:
    method = default_method
    if _is_pattern_and_method(spec):
        spec, method = spec
        method = make_method(method)
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == DENSE):
        return None, None
    return parse_pattern(spec, layout=layout), method


def choose(layers: Sequence[tuple[str, str]], pattern: PatternSpec | Mapping,
           include=None, exclude=None, *, method: Method | None = None,
           layout: str = "in") -> list[tuple[Pattern | None, Method | None, str]]:
    """For each ``(module name, weight name)``: ``(pattern, method, "")`` or
    ``(None, None, why dense)``.

    ``pattern`` is one rule for all, or a mapping ``{glob: rule}`` where the first matching
    glob wins; ``method`` is the method of rules that name none. A glob that matches no
    eligible layer is an error: a typo must not silently leave a layer dense.
    """
    includes, excludes = as_globs(include, "include"), as_globs(exclude, "exclude")
    if isinstance(pattern, Mapping):
        as_globs(list(pattern), "pattern mapping keys")
        rules = [(glob, *_rule(spec, method, layout)) for glob, spec in pattern.items()]
    else:
        rules = [("*", *_rule(pattern, method, layout))]
    for what, globs in (("include", includes), ("exclude", excludes),
                        ("pattern", [glob for glob, _, _ in rules])):
        for glob in globs or ():
            if not any(matches(glob, names) for names in layers):
                known = ", ".join(module for module, _ in layers[:12])
                more = " ..." if len(layers) > 12 else ""
                raise ValueError(f"{what} glob {glob!r} matches no eligible layer; "
                                 f"eligible layers: {known}{more}")
    choices = []
    for names in layers:
        if includes is not None and not any(matches(g, names) for g in includes):
            choices.append((None, None, "not matched by include"))
            continue
        excluded_by = next((g for g in excludes or () if matches(g, names)), None)
        if excluded_by is not None:
            choices.append((None, None, f"excluded by {excluded_by!r}"))
            continue
        rule = next((r for r in rules if matches(r[0], names)), None)
        if rule is None:
            choices.append((None, None, "no pattern in the mapping matches"))
        elif rule[1] is None:
            choices.append((None, None, f"dense by pattern rule {rule[0]!r}"))
        else:
            choices.append((rule[1], rule[2], ""))
    return choices
