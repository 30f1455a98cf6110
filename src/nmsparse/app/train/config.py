"""The training configuration: one dataclass, resolved as defaults < recipe file < flags.

A recipe file (TOML or YAML) uses the field names below (``-`` or ``_`` both accepted);
an unknown key is an error, never silently ignored. The resolved configuration is written
into the run folder as ``config.json`` and into every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...atomic import atomic_open
from ...methods import METHODS, Method, make_method
from ...patterns import parse_pattern

DENSE = "dense"
OPTIMIZERS = ("sgd", "adamw")
AMP_MODES = ("none", "bf16", "fp16")


class ConfigError(ValueError):
    """A configuration value or recipe file that cannot be used."""


@dataclass
class TrainConfig:
    # what to train
    model: str = "mlp"
    model_options: dict[str, Any] = field(default_factory=dict)
    data: str = "digits"
    data_dir: str | None = None
    text_file: str | None = None
    seq_len: int = 128
    init: str | None = None  # start from this run's or pruned checkpoint's weights and masks
    # sparsity
    pattern: str = "2:4"
    method: str = "srste"  # any registered method (nmsparse.METHODS)
    method_options: dict[str, Any] = field(default_factory=dict)  # its hyperparameters
    # deprecated: a method's hyperparameters are method_options (e.g. {decay = 1e-3}; the
    # CLI's --decay is the shorthand of --method-option decay=...)
    decay: float | None = None
    exclude: list[str] = field(default_factory=list)
    include: list[str] | None = None
    layout: str = "in"
    # CHEX channel exploration (nmsparse.channels.Chex; dense pattern only): kept channel
    # fraction, steps between explorations, share of the run that explores
    chex_budget: float | None = None
    chex_every: int = 100
    chex_until: float = 0.5
    # optimisation (the paper's recipe shape: SGD momentum, warm-up then cosine per step)
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-5
    warmup_epochs: float = 1.0
    epochs: int = 30
    batch_size: int = 64
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    amp: str = "none"
    # run
    seed: int = 0
    device: str = "auto"
    out: str | None = None
    num_workers: int = 0
    log_every: int = 10
    limit_train_batches: int | None = None
    limit_test_batches: int | None = None
    tensorboard: bool = False
    plots: bool = True

    @property
    def dense(self) -> bool:
        return self.pattern.strip().lower() == DENSE

    def make_method(self) -> Method:
        """The configured method: ``method`` from the registry with ``method_options`` (an
        option it does not take is an error, as in the library)."""
        return make_method(self.method, **self.method_options)

    def make_model_methods(self, model, example, total_steps: int) -> list:
        """The configured model-level methods (:class:`nmsparse.methods.ModelMethod`) for
        ``model``, traced on ``example``: CHEX with ``--chex-budget``."""
        if self.chex_budget is None:
            return []
        from ...channels import Chex

        return [Chex(model, example, budget=self.chex_budget, every=self.chex_every,
                     until=round(self.chex_until * total_steps))]

    def validate(self) -> TrainConfig:
        """Raise :class:`ConfigError` naming the first unusable value."""
        if self.decay is not None:
            warnings.warn("the 'decay' setting is deprecated: give it as a method option "
                          "(method_options = {decay = ...}, or --decay / --method-option "
                          "decay=... on the command line)", DeprecationWarning, stacklevel=2)
            self.method_options = with_decay(self.method_options, self.decay, "decay")
            self.decay = None
        if not self.dense:
            try:
                parse_pattern(self.pattern)
            except ValueError as error:
                raise ConfigError(f"--pattern: {error}; or 'dense'") from None
        _choice("method", self.method, tuple(METHODS.names()))
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("amp", self.amp, AMP_MODES)
        _choice("layout", self.layout, ("in", "flat"))
        for name in ("epochs", "batch_size", "seq_len", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, "
                                  f"got {getattr(self, name)}")
        for name in ("lr", "weight_decay", "warmup_epochs", "label_smoothing", "momentum"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be a finite number >= 0, "
                                  f"got {value}")
        try:
            method = self.make_method()
        except (TypeError, ValueError) as error:
            raise ConfigError(f"--method {self.method}: {error}") from None
        _check_optimizer(self, method)
        if self.label_smoothing >= 1:
            raise ConfigError(f"--label-smoothing must be < 1, got {self.label_smoothing}")
        _check_chex(self)
        check_seed(self.seed)
        for name in ("limit_train_batches", "limit_test_batches", "grad_clip"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {value}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def with_decay(options: dict[str, Any], decay: Any, spelling: str) -> dict[str, Any]:
    """``options`` with ``decay`` added (``spelling``: how it was given, for the error); the
    same option given twice with different values is an error, never one silently winning."""
    if "decay" in options and options["decay"] != decay:
        raise ConfigError(f"{spelling} {decay} and method option decay={options['decay']} "
                          "disagree: give the decay once")
    return {**options, "decay": decay}


def legacy_decay(values: dict[str, Any]) -> dict[str, Any]:
    """A configuration saved before ``decay`` became a method option: versions up to 0.1
    saved ``decay`` (default 2e-4) in every run whatever its method, so it joins the method
    options of a method that takes it and is dropped for the others."""
    values = dict(values)
    decay = values.pop("decay", None)
    method = values.get("method", TrainConfig.method)
    if decay is not None and method in METHODS and "decay" in {
            f.name for f in dataclasses.fields(METHODS.get(method))}:
        values["method_options"] = {"decay": decay, **values.get("method_options", {})}
    return values


def _check_optimizer(config: TrainConfig, method: Method) -> None:
    """A method that works with some optimizers only (STEP: Adam) is refused before the run."""
    import torch

    accepted = method.optimizers
    if config.dense or accepted is None:
        return
    classes = {name: getattr(torch.optim, {"sgd": "SGD", "adamw": "AdamW"}[name])
               for name in OPTIMIZERS}
    if not issubclass(classes[config.optimizer], accepted):
        usable = [name for name, cls in classes.items() if issubclass(cls, accepted)]
        raise ConfigError(f"--method {config.method} does not work with --optimizer "
                          f"{config.optimizer}; use --optimizer {' or '.join(usable)}")


MAX_SEED = 2**63 - 1  # torch and the data loaders take any seed in [0, MAX_SEED]


def check_seed(seed: int, flag: str = "--seed") -> None:
    """Refuse a seed the random number generators cannot take (one line naming the flag)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"{flag} must be an integer from 0 to 2**63 - 1 "
                          f"({MAX_SEED}), got {seed!r}")


def _check_chex(config: TrainConfig) -> None:
    if config.chex_budget is None:
        return
    if not 0 < config.chex_budget <= 1:
        raise ConfigError(f"--chex-budget must be in (0, 1] (the kept channel fraction), got "
                          f"{config.chex_budget}")
    if not config.dense:
        raise ConfigError("--chex-budget needs --pattern dense: CHEX prunes whole channels; "
                          "apply N:M to its exported model")
    if config.chex_every < 1:
        raise ConfigError(f"--chex-every must be >= 1, got {config.chex_every}")
    if not 0 <= config.chex_until <= 1:
        raise ConfigError(f"--chex-until must be in [0, 1] (a fraction of the run), got "
                          f"{config.chex_until}")


def _choice(name: str, value: str, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise ConfigError(f"--{name}: unknown value {value!r}; accepted: {', '.join(accepted)}")


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _field_type(name: str) -> tuple[str, bool]:
    """``(base type, None allowed)`` from the field's annotation, e.g. ``("float", True)``."""
    parts = [part.strip() for part in str(FIELDS[name].type).split("|")]
    base = [part for part in parts if part != "None"]
    return base[0].split("[")[0], len(base) < len(parts)


_TYPE_WORDS = {"str": "a string", "int": "an integer", "float": "a number",
               "bool": "true or false", "list": "a list of strings",
               "dict": "a table of options"}


def _coerce(name: str, value: Any, where: str = "recipe key") -> Any:
    """Check a value against the field's declared type (recipes are hand-written, saved
    configurations may be damaged): a wrong type is a one-line ConfigError."""
    kind, optional = _field_type(name)
    if value is None:
        if optional:
            return value
        ok = False
    elif kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind == "list":
        value = [value] if isinstance(value, str) else value
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    elif kind == "dict":
        ok = isinstance(value, dict) and all(isinstance(k, str) for k in value)
    else:
        ok = isinstance(value, str)
    if not ok:
        expected = _TYPE_WORDS.get(kind, kind) + (" or nothing" if optional else "")
        raise ConfigError(f"{where} {name!r}: expected {expected}, got {value!r} "
                          f"({type(value).__name__})")
    return value


def read_recipe(path: str | Path) -> dict[str, Any]:
    """Read a TOML or YAML recipe into ``{field: value}``; unknown keys are an error."""
    path = Path(path)
    if not path.is_file():
        what = "is not a regular file" if path.exists() else "does not exist"
        raise ConfigError(f"recipe file {str(path)!r} {what}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"recipe {str(path)!r} is not a text file (TOML or YAML): byte "
                          f"{error.start} is not UTF-8") from None
    try:
        if path.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            raw = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ConfigError(f"recipe {str(path)!r}: YAML recipes need PyYAML: pip install "
                                  "'nmsparse[yaml]' (or write the recipe as .toml)") from None

            raw = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"recipe {str(path)!r}: unknown file type; accepted: .toml, "
                              ".yaml, .yml")
    except ConfigError:
        raise
    except Exception as error:  # the parsers' own exception types differ
        raise ConfigError(f"recipe {str(path)!r} does not parse: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {str(path)!r} must be a table of keys, got "
                          f"{type(raw).__name__}")
    values = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS or name == "out":
            known = ", ".join(n for n in FIELDS if n != "out")
            raise ConfigError(f"recipe {str(path)!r}: unknown key {key!r}; known keys: {known}")
        values[name] = _coerce(name, value, f"recipe {str(path)!r}: key")
    return values


def resolve(recipe: str | Path | None, overrides: dict[str, Any]) -> TrainConfig:
    """Defaults, then the recipe file, then explicit flags (``overrides``). Model and method
    options merge key by key: ``--model-option width=0.5`` changes one option of the recipe's
    ``model_options``, not the whole table."""
    values = read_recipe(recipe) if recipe else {}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    for table in ("model_options", "method_options"):
        if table in overrides:
            overrides[table] = {**values.get(table, {}), **overrides[table]}
    values.update(overrides)
    return TrainConfig(**values).validate()


def from_dict(values: dict[str, Any], source: str = "the saved configuration") -> TrainConfig:
    """Rebuild a configuration saved by :meth:`TrainConfig.to_dict` (checkpoints, runs),
    checking every key and type: ``source`` names the file in the one-line error."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: the configuration is a {type(values).__name__}, not a "
                          "table")
    unknown = set(values) - set(FIELDS)
    if unknown:
        raise ConfigError(f"{source}: the configuration has unknown keys {sorted(unknown)}")
    checked = {name: _coerce(name, value, f"{source}: configuration key")
               for name, value in legacy_decay(values).items()}
    try:
        return TrainConfig(**checked).validate()
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None


def config_json(config: TrainConfig) -> bytes:
    """The bytes of a run's ``config.json``."""
    return (json.dumps(config.to_dict(), indent=2) + "\n").encode("utf-8")


def write_json(config: TrainConfig, path: Path) -> None:
    data = config_json(config)
    with atomic_open(path, "wb") as file:
        file.write(data)
