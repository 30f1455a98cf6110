"""``parse_pattern``: the one place a pattern spec is read (above every kind: the ``"N:M"``
shorthand is :class:`~nmsparse.patterns.nm.NM`'s, ``"KIND:ARGS"`` asks the registered kind)."""

from __future__ import annotations

import re

from .base import PATTERN_KINDS, Pattern, PatternLike, accepted
from .nm import NM

_KIND = re.compile(r"\s*([a-z][a-z0-9_-]*)\s*:(.*)", re.ASCII | re.DOTALL)


def parse_pattern(spec: PatternLike, *, layout: str = "in") -> Pattern:
    """Turn a spec into a :class:`Pattern`: a ``Pattern`` is returned as is; ``"2:4"`` or
    ``(2, 4)`` is N:M grouped by ``layout``; ``"KIND:ARGS"`` asks the registered kind.

    Anything else (``"4:2"``, ``"0:4"``, ``"2/4"``, ``"a:b"``, ``"2:4:8"``) raises
    ``ValueError`` naming what is accepted.
    """
    if isinstance(spec, Pattern):
        return spec
    if isinstance(spec, tuple) and len(spec) == 2:
        return NM(*spec, layout=layout)
    if isinstance(spec, str):
        short = NM.parse_short(spec, layout=layout)
        if short is not None:
            return short
        match = _KIND.fullmatch(spec)
        if match and match.group(1) in PATTERN_KINDS:
            return PATTERN_KINDS.get(match.group(1)).from_arguments(match.group(2).strip(),
                                                                    layout=layout)
        raise ValueError(f"cannot parse pattern {spec!r}; accepted: {accepted()}")
    raise ValueError(f"cannot parse pattern {spec!r} of type {type(spec).__name__}; "
                     f"accepted: {accepted()}")
