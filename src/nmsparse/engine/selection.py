"""Which layers get which pattern and method: the one selection every verb uses.

:func:`select` is the model-level answer (``sparsify``, ``prune``, ``check``, ``save_packed``,
``swap_linear_layers``, ``accelerate``): for every eligible weight, its pattern (as it applies
to that weight) and method, or why it stays dense. :func:`choose` is its name-level core,
used alone for state dicts. The same include/exclude/pattern-rule mistake (a glob matching no
eligible layer) is the same one-line ``ValueError`` in every verb.

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
from dataclasses import dataclass

import torch
from torch import nn

from ..methods import Method, make_method
from ..patterns import OnTranspose, Pattern, parse_pattern
from .sparse_module import original_class
from .sparse_weight import STATE_ATTRIBUTE

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


UNINITIALIZED = "uninitialized (a lazy module): run one forward pass first"
TIED = ("dense", "sparse")  # what sparsify and prune take; select also takes "each"


@dataclass
class Choice:
    """One eligible weight and what a verb was asked to do with it: ``pattern`` (as it applies
    to this weight: ``OnTranspose`` for Hugging Face ``Conv1D``) and ``method``, or
    ``pattern`` None and the ``reason`` it stays dense."""

    module_name: str
    module: nn.Module
    param: str
    name: str  # the qualified weight name, e.g. "blocks.0.fc.weight"
    pattern: Pattern | None
    method: Method | None
    reason: str = ""
    requested: bool = False  # the globs and rules asked for a pattern (before the model's facts)

    @property
    def weight(self) -> nn.Parameter:
        return self.module._parameters[self.param]

    @property
    def transposed(self) -> bool:
        """The Parameter is stored ``(in, out)`` (Hugging Face ``Conv1D``)."""
        return is_hf_conv1d(self.module)

    @property
    def sparse_state(self):
        """The live :class:`~nmsparse.engine.sparse_weight.SparseWeight` of an earlier ``sparsify``
        on this weight, or None."""
        return getattr(self.weight, STATE_ATTRIBUTE, None)

    def leave_dense(self, reason: str) -> None:
        self.pattern, self.method, self.reason = None, None, reason


def check_tied(tied: object) -> None:
    if tied not in TIED:
        raise ValueError(f"tied must be 'dense' or 'sparse', got {tied!r}")


def parameter_holders(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """Every (qualified name, module, parameter name) holding each Parameter, by its id."""
    holders: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for module_name, module in model.named_modules():
        for param, value in module._parameters.items():
            if value is not None:
                holders.setdefault(id(value), []).append(
                    (qualified(module_name, param), module, param))
    return holders


def select(model: nn.Module, pattern: PatternSpec | Mapping = "2:4", include=None,
           exclude=None, *, method: Method | None = None, layout: str = "in",
           tied: str = "dense", strict: bool = False) -> list[Choice]:
    """Every eligible weight of ``model`` with its pattern and method, or why it stays dense.

    The rules, in order: include/exclude globs and the pattern rules (:func:`choose`; a glob
    matching nothing raises); a weight other modules also read is dense with ``tied="dense"``,
    and with ``tied="sparse"`` its first eligible reader takes it and the others read that;
    with ``tied="each"`` (verbs that only read weights: ``check``, ``save_packed``) every
    reader is judged on its own; a weight that is not floating point, or whose shape cannot
    take its pattern (``strict``: raise instead), is dense; so is a lazy module's
    uninitialized weight (``sparsify`` refuses it).
    """
    if tied != "each":
        check_tied(tied)
    candidates = list(eligible_weights(model))
    if not candidates:
        raise ValueError("the model has no layer nmsparse can make sparse "
                         "(nn.Linear, nn.Conv1d/2d/3d, nn.MultiheadAttention)")
    names = [(module_name, qualified(module_name, param)) for module_name, _, param in
             candidates]
    decided = choose(names, pattern, include, exclude, method=method, layout=layout)
    holders = parameter_holders(model)
    chosen_by: dict[int, str] = {}
    choices = []
    for (module_name, module, param), (_, name), (rule, how, reason) in zip(
            candidates, names, decided, strict=True):
        choice = Choice(module_name, module, param, name,
                        None if rule is None else layer_pattern(module, rule), how, reason,
                        requested=rule is not None)
        choices.append(choice)
        weight = choice.weight
        if choice.pattern is None:
            continue
        if isinstance(weight, nn.parameter.UninitializedParameter):
            choice.leave_dense(UNINITIALIZED)
            continue
        others = [other for other, m, p in holders.get(id(weight), ())
                  if (m, p) != (module, param)]
        if tied == "sparse" and id(weight) in chosen_by:
            choice.leave_dense(f"tied to {chosen_by[id(weight)]}: reads its sparse weight")
        elif tied == "dense" and others:
            choice.leave_dense(f"tied to {', '.join(others)}: kept dense (tied='sparse' makes "
                               "it sparse for every module that reads it)")
        elif not torch.is_floating_point(weight):
            choice.leave_dense(f"dtype {weight.dtype} is not floating point")
        elif error := choice.pattern.why_not(tuple(weight.shape)):
            if strict:
                raise ValueError(f"{name}: {error} (strict=True)")
            choice.leave_dense(error)
        else:
            chosen_by[id(weight)] = name
    return choices
