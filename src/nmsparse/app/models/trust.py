"""Which ``"package.module:factory"`` model names may be imported when a model is rebuilt
from a file (a run folder, a checkpoint, a recipe, the run given to ``train --init``).

Importing a module runs its code, so a name read from a file is never imported on the file's
say-so: a checkpoint whose configuration says ``"os:system"`` must not run a shell command.
A ``module:factory`` name taken from a file is imported only when the user trusts it, by

* giving it at load time (``--trust-model NAME`` on the command line, ``trusted_models=`` in
  the API; ``nmsparse train --model NAME`` trusts the name it was given), or
* listing it in the environment variable ``NMSPARSE_TRUSTED_MODELS`` (names separated by
  commas or whitespace; ``package.*`` trusts the factories ``package`` and its submodules
  define).

The rule, exactly:

* Trust is decided on the name that will be imported, after every merge of settings (a
  recipe, the ``--init`` run's configuration, flags), with all whitespace removed
  (``" os : system "`` is ``os:system``).
* An exact entry (``pkg.mod:Net.build``) trusts exactly that module and attribute path.
* A package glob ``pkg.*`` trusts ``module:attr.path`` when ``module`` is ``pkg`` or below it
  **and** every object along ``attr.path`` is defined in ``pkg`` or below it: a module by its
  ``__name__``, anything else by its ``__module__``. Attribute names starting with ``__`` are
  never followed. So with ``mypkg.*`` the names ``mypkg.mod:Net.build`` and ``mypkg:make`` (a
  function of ``mypkg.impl`` re-exported by ``mypkg``) are trusted, while
  ``mypkg.mod:os.system`` (the ``os`` module) and ``mypkg.mod:system`` after
  ``from os import system`` (defined in ``posix``) are refused. Checking this imports the
  module, which the glob trusts; nothing outside the package is called.
* ``*``, ``.*``, an empty entry or an empty variable trust nothing.

Registered model names (``mlp``, ``resnet20``, ...) import nothing and are always accepted.
"""

from __future__ import annotations

import importlib
import os
import types
from collections.abc import Iterable
from typing import Any

TRUST_ENV = "NMSPARSE_TRUSTED_MODELS"


def is_factory_name(name: object) -> bool:
    """Whether ``name`` names a factory to import (``"package.module:factory"``)."""
    return isinstance(name, str) and ":" in name


def split_name(name: str) -> tuple[str, str]:
    """``(module, attribute path)`` of a factory name, whitespace removed: the exact names
    that are imported and looked up (:func:`nmsparse.app.models.create_model` uses this too)."""
    module, _, attribute = "".join(name.split()).partition(":")
    return module, attribute


def _normalise(name: str) -> str:
    return ":".join(split_name(name))


def configured_trust() -> list[str]:
    """The names listed in ``NMSPARSE_TRUSTED_MODELS`` (empty when unset)."""
    raw = os.environ.get(TRUST_ENV, "")
    return [entry for entry in raw.replace(",", " ").split() if entry]


def _glob_package(entry: str) -> str | None:
    """``pkg`` for an entry ``pkg.*`` naming a package, else None."""
    if not entry.endswith(".*"):
        return None
    package = entry[:-2].strip()
    return package if package and all(p.isidentifier() for p in package.split(".")) else None


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _scope(name: str, trusted: Iterable[str]) -> tuple[bool, list[str]]:
    """``(trusted exactly, packages whose glob covers the module)`` for a normalised name."""
    exact, packages = False, []
    for entry in [*trusted, *configured_trust()]:
        package = _glob_package(entry)
        if package is not None:
            if _within(split_name(name)[0], package):
                packages.append(package)
        elif is_factory_name(entry) and _normalise(entry) == name:
            exact = True
    return exact, packages


def is_trusted(name: str, trusted: Iterable[str] = ()) -> bool:
    """Whether the name ``name`` is trusted: given exactly, or its module lies under a trusted
    package glob. (For a glob, :func:`require_trusted` also checks that the attribute path
    stays inside the package, which needs the import this function does not do.)"""
    exact, packages = _scope(_normalise(name), trusted)
    return exact or bool(packages)


def _home(value: object) -> str | None:
    home = value.__name__ if isinstance(value, types.ModuleType) else getattr(
        value, "__module__", None)
    return home if isinstance(home, str) else None


def _check_defined_within(name: str, package: str) -> None:
    """Refuse (one line) an attribute path that leaves ``package`` (see the module docs)."""

    module, attribute = split_name(name)
    if any(part.startswith("__") for part in attribute.split(".")):
        raise ValueError(f"model {name!r}: the trusted package glob '{package}.*' does not "
                         "follow attributes starting with '__'; trust the exact name with "
                         f"--trust-model {name} if you mean it")
    path = module + ":"
    for part, value in resolve_factory_path(name):
        path += part if path.endswith(":") else "." + part
        home = _home(value)
        if home is None or not _within(home, package):
            where = f"defined in {home!r}" if home else "not defined in any module"
            raise ValueError(f"model {name!r}: {path!r} is {where}, outside the trusted "
                             f"package '{package}.*' (a package glob trusts only what the "
                             f"package defines); give --trust-model {name} to trust this "
                             "exact name if you mean it")


def require_trusted(name: object, trusted: Iterable[str], source: str) -> None:
    """Raise ``ValueError`` (one line) if ``name``, read from ``source``, is a factory to
    import that the user has not trusted (by the rule in the module docstring); registered
    names pass."""
    if not is_factory_name(name):
        return
    normalised = _normalise(name)
    exact, packages = _scope(normalised, trusted)
    if exact:
        return
    if packages:
        _check_defined_within(normalised, min(packages, key=len))
        return
    raise ValueError(f"{source} names the model factory {name!r}; nmsparse never imports "
                     "code because a file names it. If you trust it, give --trust-model "
                     f"{normalised} (API: trusted_models=[{normalised!r}]) or add it to "
                     f"{TRUST_ENV}")


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def resolve_factory_path(spec: str) -> list[tuple[str, Any]]:
    """Import the module of ``"package.module:factory"`` and look up the attribute path (it may
    be dotted: ``Class.build``): ``[(part, object)]`` for every step, the factory last. The
    name is read as :func:`split_name` reads it (the name trusted)."""
    module_name, attribute = split_name(spec)
    if not module_name or not attribute or ":" in attribute:
        raise ValueError(f"model {spec!r}: expected 'package.module:factory'")
    try:
        target: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name is None or not module_name.startswith(error.name):
            raise ValueError(f"model {spec!r}: importing {module_name!r} failed: "
                             f"{_one_line(error)}") from error
        raise ValueError(f"model {spec!r}: no module {error.name!r} on the Python path; "
                         "install its package, run from the folder that holds it (the "
                         "command line looks there), or add that folder to PYTHONPATH"
                         ) from error
    except Exception as error:  # any failure while importing user code, reported uniformly
        raise ValueError(f"model {spec!r}: cannot import module {module_name!r}: "
                         f"{type(error).__name__}: {_one_line(error)}") from error
    steps = []
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"model {spec!r}: module {module_name!r} has no attribute "
                             f"{attribute!r}")
        target = getattr(target, part)
        steps.append((part, target))
    return steps
