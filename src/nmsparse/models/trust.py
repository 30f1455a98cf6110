"""Which ``"package.module:factory"`` model names may be imported when a model is rebuilt
from a file (a run folder, a checkpoint, a recipe).

Importing a module runs its code, so a name read from a file is never imported on the file's
say-so: a checkpoint whose configuration says ``"os:system"`` must not run a shell command.
A ``module:factory`` name taken from a file is imported only when the user trusts it, by

* giving it at load time (``--trust-model NAME`` on the command line, ``trusted_models=`` in
  the API; ``nmsparse train --model NAME`` trusts the name it was given), or
* listing it in the environment variable ``NMSPARSE_TRUSTED_MODELS`` (names separated by
  commas or whitespace; ``package.*`` trusts every factory of ``package`` and its
  submodules).

Registered model names (``mlp``, ``resnet20``, ...) import nothing and are always accepted.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

TRUST_ENV = "NMSPARSE_TRUSTED_MODELS"


def is_factory_name(name: object) -> bool:
    """Whether ``name`` names a factory to import (``"package.module:factory"``)."""
    return isinstance(name, str) and ":" in name


def _normalise(name: str) -> str:
    module, _, attribute = name.partition(":")
    return f"{module.strip()}:{attribute.strip()}"


def configured_trust() -> list[str]:
    """The names listed in ``NMSPARSE_TRUSTED_MODELS`` (empty when unset)."""
    raw = os.environ.get(TRUST_ENV, "")
    return [entry for entry in raw.replace(",", " ").split() if entry]


def _matches(name: str, entry: str) -> bool:
    if entry.endswith(".*"):  # a package and everything below it
        package = entry[:-2]
        module = name.partition(":")[0]
        return bool(package) and (module == package or module.startswith(package + "."))
    return is_factory_name(entry) and _normalise(entry) == name


def is_trusted(name: str, trusted: Iterable[str] = ()) -> bool:
    """Whether the factory ``name`` may be imported: given in ``trusted`` or configured."""
    name = _normalise(name)
    return any(_matches(name, entry) for entry in [*trusted, *configured_trust()])


def require_trusted(name: object, trusted: Iterable[str], source: str) -> None:
    """Raise ``ValueError`` (one line) if ``name``, read from ``source``, is a factory to
    import that the user has not trusted; registered names pass."""
    if not is_factory_name(name) or is_trusted(name, trusted):
        return
    raise ValueError(f"{source} names the model factory {name!r}; nmsparse never imports "
                     "code because a file names it. If you trust it, give --trust-model "
                     f"{name} (API: trusted_models=[{name!r}]) or add it to {TRUST_ENV}")
