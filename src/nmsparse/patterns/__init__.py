"""Patterns: what a sparse weight's mask may look like (see :mod:`nmsparse.patterns.base`).

``parse_pattern`` is the one place where pattern specs are read: ``"2:4"`` (N:M along the
input dimension, keep N of every M), ``"flat:2:4"``, ``"unstructured:0.5"`` (keep that
fraction of each weight), and every registered ``"KIND:ARGS"``.
"""

from .base import PATTERN_KINDS, Pattern, PatternLike, Violations, accepted
from .block import Block
from .gather_scatter import GatherScatter
from .global_budget import GlobalUnstructured, global_masks, global_violations
from .nm import NM
from .on_transpose import OnTranspose
from .parse import parse_pattern
from .transposable import Transposable
from .unstructured import Unstructured

__all__ = ["NM", "OnTranspose", "PATTERN_KINDS", "Pattern", "PatternLike", "Violations",
           "Unstructured", "accepted", "parse_pattern"]
__all__ += ["Block", "GlobalUnstructured", "global_masks", "global_violations"]
__all__ += ["Transposable", "GatherScatter"]
