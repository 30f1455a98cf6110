"""One registry idiom for everything nmsparse finds by name: models, data sets, methods and
pattern kinds.

A :class:`Registry` maps names to entries. Registering a name twice raises, unless both
entries come from the same place (the same module and qualified name: a module that is
reloaded registers its entries again). Looking up an unknown name raises ``ValueError`` with
one line that lists the accepted names, so command-line front ends can print it as is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def origin(entry: object) -> str:
    """Where an entry was defined (``module.qualname``), to tell a reload from a clash."""
    target = entry if hasattr(entry, "__qualname__") else type(entry)
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', '?')}"


class Registry(Generic[T]):
    """Entries of one ``kind`` (e.g. ``"method"``) by name, in registration order."""

    def __init__(self, kind: str, *, normalize: Callable[[str], str] = str.lower,
                 error: type[Exception] = ValueError) -> None:
        self.kind = kind
        self._normalize = normalize
        self._error = error
        self._entries: dict[str, T] = {}
        self._origins: dict[str, str] = {}

    def key(self, name: object) -> str:
        if not isinstance(name, str) or not name.strip():
            raise self._error(f"{self.kind} name must be a non-empty string, got {name!r}")
        return self._normalize(name.strip())

    def add(self, name: str, entry: T, *, where: object | None = None) -> T:
        """Register ``entry`` as ``name``; ``where`` (default: the entry) says where it was
        defined, for the clash check."""
        key = self.key(name)
        source = origin(entry if where is None else where)
        if key in self._entries and self._origins[key] != source:
            raise self._error(f"{self.kind} name {key!r} is already registered by "
                              f"{self._origins[key]}; choose another name")
        self._entries[key] = entry
        self._origins[key] = source
        return entry

    def copy(self) -> Registry[T]:
        """An independent registry with the same entries (tests register into copies)."""
        other = Registry(self.kind, normalize=self._normalize, error=self._error)
        other._entries, other._origins = dict(self._entries), dict(self._origins)
        return other

    def remove(self, name: str) -> None:
        key = self.key(name)
        self._entries.pop(key, None)
        self._origins.pop(key, None)

    def get(self, name: object) -> T:
        """The entry registered as ``name``; an unknown name raises with the accepted ones."""
        key = self.key(name)
        if key not in self._entries:
            raise self._error(f"unknown {self.kind} {name!r}; accepted: "
                              f"{', '.join(sorted(self._entries)) or '(none registered)'}")
        return self._entries[key]

    def build(self, spec: object, base: type, **options: Any) -> Any:
        """An instance from ``spec``: a registered name or a ``base`` subclass (a dataclass)
        built with ``options``, or a ``base`` instance as is (``options`` must agree with it).
        An option the class does not take is an error naming the ones it takes, never
        silently dropped: the one rule for methods and pruners alike."""
        if isinstance(spec, base):
            conflicts = {k: v for k, v in options.items()
                         if not hasattr(spec, k) or getattr(spec, k) != v}
            if conflicts:
                raise self._error(f"options {conflicts} conflict with the {self.kind} "
                                  f"instance {spec!r}")
            return spec
        cls = spec if isinstance(spec, type) and issubclass(spec, base) else self.get(spec)
        accepted = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            takes = f"its options are {', '.join(accepted)}" if accepted else \
                "it takes no options"
            raise self._error(f"{self.kind} {getattr(cls, 'name', cls.__name__)!r} takes no "
                              f"{' or '.join(unknown)} ({takes})")
        return cls(**options)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._normalize(name.strip()) in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"
