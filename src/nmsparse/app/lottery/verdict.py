"""Whether a winning ticket exists in a setting, from the arms' accuracies over seeds.

A *winning ticket* exists when the IMP-with-rewinding ticket beats both controls that keep
its sparsity but not its (mask, initialisation) pair, random re-initialisation and a random
mask, by more than the noise: the mean difference must exceed the combined seed standard
deviation ``sqrt(s_ticket^2 + s_control^2)`` (sample std over seeds), and at least 0.5
accuracy points when there is one seed only.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ...tables import format_table
from .harness import ARMS

CONTROLS = ("random_reinit", "random_mask")
SINGLE_SEED_MARGIN = 0.005


@dataclass(frozen=True)
class ArmStats:
    mean: float
    std: float
    seeds: int

    @classmethod
    def of(cls, values: Sequence[float]) -> ArmStats:
        values = list(values)
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return cls(statistics.fmean(values), std, len(values))


@dataclass(frozen=True)
class Verdict:
    exists: bool
    reason: str


def judge(runs: Sequence[Mapping[str, float]]) -> Verdict:
    """The verdict over ``runs`` (one ``{arm: accuracy}`` per seed)."""
    if not runs:
        raise ValueError("judge needs at least one run")
    ticket = ArmStats.of([r["imp_rewind"] for r in runs])
    reasons, exists = [], True
    for control in CONTROLS:
        other = ArmStats.of([r[control] for r in runs])
        gap = ticket.mean - other.mean
        noise = math.hypot(ticket.std, other.std) if len(runs) > 1 else SINGLE_SEED_MARGIN
        beats = gap > noise
        exists &= beats
        reasons.append(f"{'beats' if beats else 'does not beat'} {control} by "
                       f"{100 * gap:+.2f} pts (noise {100 * noise:.2f})")
    return Verdict(exists, "; ".join(reasons))


def verdict_table(settings: Mapping[str, Sequence[Mapping[str, float]]]) -> str:
    """A markdown table: per setting, every arm's mean ± std accuracy (%) and the verdict."""
    rows = []
    for name, runs in settings.items():
        stats = {arm: ArmStats.of([r[arm] for r in runs]) for arm in ARMS}
        verdict = judge(runs)
        rows.append([name, str(len(runs)),
                     *[f"{100 * s.mean:.2f} ± {100 * s.std:.2f}" for s in stats.values()],
                     "yes" if verdict.exists else "no"])
    return format_table(["setting", "seeds", *ARMS, "winning ticket"], rows, markdown=True)
