"""The model registry: factories registered by name, and ``create_model`` to build one.

A factory is a function taking keyword arguments ``input_shape`` and ``num_classes`` (and
``task`` if it wants it) plus its own options, each with a default, and returning an
``nn.Module`` sized for that data. Besides registered names, ``"package.module:factory"``
imports any user factory, which is called with the keyword arguments its signature accepts.

Every user-facing mistake (unknown name, wrong task, unknown or invalid option, an input
shape the model cannot take) is a ``ValueError`` with a one-line message, so a command-line
front end can print it as is.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from torch import nn

from ...registry import Registry
from .trust import resolve_factory_path, split_name

TASKS = ("classification", "language_model")
# Arguments every factory may receive from create_model; anything else is a model option.
_DATA_ARGUMENTS = ("input_shape", "num_classes", "task")

Factory = Callable[..., nn.Module]
_EMPTY = inspect.Parameter.empty


@dataclass(frozen=True)
class ModelInfo:
    """What ``list_models()`` reports about a registered model.

    ``options`` maps each option to its default; ``smoke_options`` are small option values
    for quick checks (the test-suite, a dry run); ``large`` marks models too big to build
    on a CPU casually (tests build them on the ``meta`` device only).
    """

    name: str
    description: str
    tasks: tuple[str, ...]
    options: Mapping[str, Any] = field(default_factory=dict, compare=False)
    smoke_options: Mapping[str, Any] = field(default_factory=dict, compare=False)
    large: bool = False


MODELS: Registry[tuple[ModelInfo, Factory]] = Registry("model", normalize=lambda name: name)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _signature(factory: Callable, label: str) -> inspect.Signature:
    try:
        return inspect.signature(factory)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{label}: cannot inspect the factory's signature: "
                         f"{_one_line(error)}") from error


def _keyword_parameters(signature: inspect.Signature) -> tuple[dict[str, inspect.Parameter],
                                                               bool]:
    """The parameters that can be passed by keyword, and whether ``**kwargs`` is accepted."""
    keywords = {name: p for name, p in signature.parameters.items()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    var_keyword = any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values())
    return keywords, var_keyword


def register_model(name: str, *, description: str, tasks: tuple[str, ...],
                   smoke_options: Mapping[str, Any] | None = None,
                   large: bool = False) -> Callable[[Factory], Factory]:
    """Decorator registering ``factory(*, input_shape, num_classes, [task], **options)``.

    Every option must have a default (``create_model`` only passes the options it is given).
    Returns the factory unchanged.
    """
    if not isinstance(name, str) or not name or ":" in name or name != name.strip():
        raise ValueError(f"model name must be a non-empty string without ':' or surrounding "
                         f"spaces, got {name!r}")
    tasks = tuple(tasks) if not isinstance(tasks, str) else (tasks,)
    unknown = [task for task in tasks if task not in TASKS]
    if not tasks or unknown:
        raise ValueError(f"model {name!r}: tasks must be a non-empty subset of {TASKS}, "
                         f"got {tasks!r}")

    def decorator(factory: Factory) -> Factory:
        label = f"model {name!r}"
        keywords, _ = _keyword_parameters(_signature(factory, label))
        for required in ("input_shape", "num_classes"):
            if required not in keywords:
                raise ValueError(f"{label}: the factory must accept the keyword argument "
                                 f"{required!r}")
        options = {option: p.default for option, p in keywords.items()
                   if option not in _DATA_ARGUMENTS}
        missing = [option for option, default in options.items() if default is _EMPTY]
        if missing:
            raise ValueError(f"{label}: every option needs a default; {missing} have none")
        smoke = dict(smoke_options or {})
        if unknown_smoke := sorted(set(smoke) - set(options)):
            raise ValueError(f"{label}: smoke_options {unknown_smoke} are not options of the "
                             f"factory (options: {sorted(options)})")
        info = ModelInfo(name, description, tasks, MappingProxyType(options),
                         MappingProxyType(smoke), bool(large))
        # Re-registering the same function (a module reload) is fine; a clash is not.
        MODELS.add(name, (info, factory), where=factory)
        return factory

    return decorator


def list_models() -> dict[str, ModelInfo]:
    """``{name: ModelInfo}`` of every registered model, sorted by name."""
    return {name: MODELS.get(name)[0] for name in MODELS.names()}


def _load_factory(spec: str) -> Factory:
    """The factory ``"package.module:factory"`` names, imported."""
    target = resolve_factory_path(spec)[-1][1]
    if not callable(target):
        raise ValueError(f"model {spec!r}: {split_name(spec)[1]!r} is a "
                         f"{type(target).__name__}, not a callable factory")
    return target


def _check_data(input_shape: Any, num_classes: Any, task: Any) -> tuple[int, ...]:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    if (not isinstance(input_shape, (tuple, list)) or not input_shape
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0
                       for d in input_shape)):
        raise ValueError(f"input_shape must be a non-empty tuple of positive ints (the shape "
                         f"of one sample, without the batch dimension), got {input_shape!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return tuple(input_shape)


def _call_factory(factory: Factory, label: str, data: dict[str, Any],
                  options: dict[str, Any]) -> nn.Module:
    keywords, var_keyword = _keyword_parameters(_signature(factory, label))
    accepted = [name for name in keywords if name not in _DATA_ARGUMENTS]
    if not var_keyword:
        unknown = [option for option in options if option not in keywords
                   or option in _DATA_ARGUMENTS]
        if unknown:
            listed = ", ".join(accepted) if accepted else "none"
            raise ValueError(f"{label} has no option {', '.join(map(repr, unknown))}; "
                             f"accepted options: {listed}")
    arguments = {key: value for key, value in data.items() if var_keyword or key in keywords}
    arguments.update(options)
    missing = [name for name, p in keywords.items()
               if p.default is _EMPTY and name not in arguments]
    if missing:
        raise ValueError(f"{label}: the factory requires {', '.join(map(repr, missing))}, "
                         "which create_model does not provide; give it as an option or a "
                         "default")
    model = factory(**arguments)
    if not isinstance(model, nn.Module):
        raise ValueError(f"{label}: the factory returned a {type(model).__name__}, "
                         "not a torch.nn.Module")
    return model


def create_model(name: str, *, input_shape: tuple[int, ...], num_classes: int,
                 task: str = "classification", **options: Any) -> nn.Module:
    """Build model ``name`` for samples of ``input_shape`` (no batch dim) and ``num_classes``.

    ``name`` is a registered name (see :func:`list_models`) or ``"package.module:factory"``.
    For ``task="language_model"`` the input is ``(seq_len,)`` int64 token ids and
    ``num_classes`` is the vocabulary size. Raises ``ValueError`` for an unknown name, a task
    the model does not support, an unknown or invalid option, or an input shape the model
    cannot take.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    shape = _check_data(input_shape, num_classes, task)
    data = {"input_shape": shape, "num_classes": num_classes, "task": task}
    if ":" in name:
        return _call_factory(_load_factory(name), f"model {name!r}", data, options)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; registered models: "
                         f"{', '.join(MODELS.names())} (or 'package.module:factory')")
    info, factory = MODELS.get(name)
    if task not in info.tasks:
        fitting = sorted(n for n, (i, _) in MODELS.items() if task in i.tasks)
        raise ValueError(f"model {name!r} does not support task {task!r} (it supports "
                         f"{', '.join(info.tasks)}); models for {task}: "
                         f"{', '.join(fitting) or 'none'}")
    return _call_factory(factory, f"model {name!r}", data, options)
