"""Input-channel permutations for N:M pruning (the idea of NVIDIA ASP's channel permutations).

N:M keeps N of every M *consecutive* input channels. Which channels share a group of M is
an accident of training order; reordering the input channels of a layer, and the output
channels of the layers that produce them the same way, changes nothing in what the network
computes but can put large weights into different groups, so more magnitude survives the
prune. Here every free :class:`~nmsparse.channels.groups.ChannelGroup` whose consumers will
be pruned gets such an order, applied to all its members (so the function is unchanged up to
float rounding).

Search, per group, over the partition of its channels into stripes of M (the order inside a
stripe and of the stripes does not matter to N:M). The objective is the kept magnitude: for
every consumer row (output channel, kernel position) and every stripe, the sum of the N
largest ``|w|``, summed over all consumers of the group (they share the order).

* **Exhaustive** when the number of partitions is at most ``exhaustive_limit`` (6,000; e.g. 8
  channels at M=4: 35 partitions; 12 at M=4: 5,775).
* **Greedy channel swaps** beyond: starting from the original order, the single swap of two
  channels of different stripes that raises the kept magnitude most is applied, again and
  again, until no swap helps or ``max_swaps`` (default 4 x channels) were made. A table of
  "stripe s with position i holding channel c" scores makes each step cheap (only the two
  changed stripes are rescored). Every applied swap raises the objective, so the result never
  keeps less than the original order (a local optimum, not a proven best).
* **Stripe pairs** then (the stripe groups of NVIDIA apex's search, at two stripes): for every
  pair of stripes the best split of their 2M channels into two stripes is found by trying all
  C(2M-1, M-1) splits (35 at M=4, 6,435 at M=8); the best non-overlapping pair moves are
  applied and the pairs they touch rescored, until no pair improves. A pair move contains
  every single swap between its two stripes, so this ends in a pair-optimal partition.
* **Escapes**: ``escapes`` times (seeded, so the result is reproducible) the best order so far
  gets two random channels of two random stripes swapped and is re-optimised by stripe
  pairs; the result is kept when it keeps more. Pair search and escapes run where the pair
  table stays within ``pair_budget`` scored entries (rows x channels of every split; 1e9:
  e.g. 256 channels read by 256 rows at M=4, small groups at M=8), and the escapes spend at
  most ``_ESCAPE_BUDGET`` (1e8) scored entries, so the search stays within seconds; otherwise
  the greedy swaps stand alone.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..patterns import NM, PatternLike, parse_pattern
from .groups import ChannelGroup, model_tensors, permute_group

_CHUNK_ELEMENTS = 1 << 23  # bounds the scratch tensor of one swap evaluation
_NETWORK_MAX_M = 16
_ESCAPE_BUDGET = 1e8  # scored entries all escapes of one group may spend


@dataclass
class GroupPermutation:
    """What the search did for one group."""

    size: int
    consumers: list[str]
    kept_before: float  # sum of kept |w| over the group's consumers
    kept_after: float
    total: float  # sum of |w| over the group's consumers
    search: str  # "exhaustive" or "greedy swaps (K applied)"


@dataclass
class PermutationReport:
    """Per group, and in total, the magnitude N:M keeps with and without the permutation."""

    pattern: NM
    groups: list[GroupPermutation] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # groups left alone, and why

    @property
    def kept_before(self) -> float:
        return sum(g.kept_before for g in self.groups)

    @property
    def kept_after(self) -> float:
        return sum(g.kept_after for g in self.groups)

    @property
    def total(self) -> float:
        return sum(g.total for g in self.groups)

    def __str__(self) -> str:
        if not self.groups:
            return f"channel permutation for {self.pattern}: no group could be permuted"
        return (f"channel permutation for {self.pattern}: {len(self.groups)} groups, kept |w| "
                f"{100 * self.kept_before / self.total:.2f}% -> "
                f"{100 * self.kept_after / self.total:.2f}% of the permuted layers' total")


def stripe_kept(matrix: torch.Tensor, stripes: torch.Tensor, n: int) -> torch.Tensor:
    """Kept magnitude of each stripe: ``matrix`` is ``(rows, C)`` of ``|w|``, ``stripes`` is
    ``(..., M)`` column indices; returns ``(...)``: the sum over rows of the ``n`` largest."""
    m = stripes.shape[-1]
    if m > _NETWORK_MAX_M:
        return matrix[:, stripes].topk(n, dim=-1).values.sum(-1).sum(0)
    # an odd-even transposition sorting network on M tensors: much faster than topk on a
    # last dimension of 4 or 8
    columns = [matrix[:, stripes[..., k]] for k in range(m)]
    for round_ in range(m):
        for a in range(round_ % 2, m - 1, 2):
            low = torch.minimum(columns[a], columns[a + 1])
            columns[a + 1] = torch.maximum(columns[a], columns[a + 1])
            columns[a] = low
    return torch.stack(columns[m - n:]).sum(0).sum(0)


def _partitions(items: tuple[int, ...], m: int) -> Iterable[list[tuple[int, ...]]]:
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for others in itertools.combinations(rest, m - 1):
        remaining = tuple(i for i in rest if i not in others)
        for tail in _partitions(remaining, m):
            yield [(first, *others), *tail]


def partition_count(channels: int, m: int) -> int:
    stripes = channels // m
    return math.factorial(channels) // (math.factorial(m) ** stripes * math.factorial(stripes))


def exhaustive_order(matrix: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The best partition into stripes of ``m`` by trying every one (small ``C`` only)."""
    channels = matrix.shape[1]
    subsets = list(itertools.combinations(range(channels), m))
    scores = stripe_kept(matrix, torch.tensor(subsets), n).tolist()
    score_of = dict(zip(subsets, scores, strict=True))
    best, best_score = None, -math.inf
    for partition in _partitions(tuple(range(channels)), m):
        score = sum(score_of[s] for s in partition)
        if best is None or score > best_score + 1e-9 * abs(best_score):
            best, best_score = partition, score
    return torch.tensor([c for stripe in best for c in stripe])


def replaced_kept(matrix: torch.Tensor, stripes: torch.Tensor, n: int) -> torch.Tensor:
    """``out[k, i, c]``: kept magnitude of stripe ``stripes[k]`` with its position ``i``
    holding channel ``c`` instead; ``stripes`` is ``(K, M)``."""
    count, m = stripes.shape
    channels = matrix.shape[1]
    chunk = max(1, _CHUNK_ELEMENTS // max(1, matrix.shape[0] * m * channels * m))
    positions = torch.arange(m)
    parts = []
    for start in range(0, count, chunk):
        part = stripes[start:start + chunk]
        index = part[:, None, None, :].expand(part.shape[0], m, channels, m).clone()
        index[:, positions, :, positions] = torch.arange(channels)
        parts.append(stripe_kept(matrix, index, n))
    return torch.cat(parts)


def greedy_swap_order(matrix: torch.Tensor, n: int, m: int, max_swaps: int | None = None
                      ) -> tuple[torch.Tensor, int]:
    """Improve the identity order by greedy swaps between stripes (see the module docstring);
    returns the order and the number of swaps applied."""
    channels = matrix.shape[1]
    count = channels // m
    max_swaps = 4 * channels if max_swaps is None else max_swaps
    stripes = torch.arange(channels).reshape(count, m)
    current = stripe_kept(matrix, stripes, n)
    table = replaced_kept(matrix, stripes, n)  # (S, M, C)
    same = torch.eye(count, dtype=torch.bool)[:, None, :, None].expand(count, m, count, m)
    swaps = 0
    while swaps < max_swaps:
        # gain[s, i, t, j] of swapping position i of stripe s with position j of stripe t
        mine = table[:, :, stripes.reshape(-1)].reshape(count, m, count, m)
        gain = mine + mine.permute(2, 3, 0, 1) - current[:, None, None, None] \
            - current[None, None, :, None]
        gain = gain.masked_fill(same, -math.inf)
        value, flat = gain.reshape(-1).max(0)
        if value.item() <= 1e-6 * max(current.sum().item(), 1e-30) / count:
            break
        s, i, t, j = (int(v) for v in torch.unravel_index(flat, gain.shape))
        stripes[s, i], stripes[t, j] = stripes[t, j].item(), stripes[s, i].item()
        changed = torch.tensor([s, t])
        current[changed] = stripe_kept(matrix, stripes[changed], n)
        table[changed] = replaced_kept(matrix, stripes[changed], n)
        swaps += 1
    return stripes.reshape(-1), swaps


def group_splits(m: int, size: int = 2) -> torch.Tensor:
    """``(S, size * M)``: every split of ``size * m`` local channels into ``size`` stripes of
    ``m`` (each counted once: the order of and inside the stripes does not matter)."""
    return torch.tensor([[c for stripe in split for c in stripe]
                         for split in _partitions(tuple(range(size * m)), m)])


class _StripeGroupSearch:
    """Best split of every group of ``size`` stripes, kept up to date as stripes change."""

    def __init__(self, matrix: torch.Tensor, n: int, m: int, stripes: torch.Tensor,
                 size: int = 2):
        self.matrix, self.n, self.m, self.size = matrix, n, m, size
        self.splits = group_splits(m, size)  # (S, size * M)
        self.stripes = stripes.clone()
        count = stripes.shape[0]
        self.pairs = torch.combinations(torch.arange(count), size)  # (P, size)
        self.current = stripe_kept(matrix, self.stripes, n)
        self.gain = torch.zeros(len(self.pairs))
        self.best = torch.zeros(len(self.pairs), dtype=torch.long)
        self._rescore(torch.arange(len(self.pairs)))

    def _rescore(self, which: torch.Tensor) -> None:
        """Best split and its gain for the pairs ``which``."""
        if len(which) == 0:
            return
        splits, m, size = self.splits, self.m, self.size
        per_pair = self.matrix.shape[0] * len(splits) * size * m
        chunk = max(1, _CHUNK_ELEMENTS // max(1, per_pair))
        for start in range(0, len(which), chunk):
            idx = which[start:start + chunk]
            members = self.pairs[idx]  # (K, size)
            columns = self.stripes[members].reshape(len(idx), size * m)
            candidates = columns[:, splits].reshape(len(idx), len(splits), size, m)
            kept = stripe_kept(self.matrix, candidates, self.n).sum(-1)  # (K, S)
            value, arg = kept.max(-1)
            self.gain[idx] = value - self.current[members].sum(-1)
            self.best[idx] = arg

    def snapshot(self) -> tuple[torch.Tensor, ...]:
        return (self.stripes.clone(), self.current.clone(), self.gain.clone(),
                self.best.clone())

    def restore(self, state: tuple[torch.Tensor, ...]) -> None:
        self.stripes, self.current, self.gain, self.best = (x.clone() for x in state)

    def _touching(self, changed: list[int]) -> torch.Tensor:
        hit = torch.zeros(len(self.pairs), dtype=torch.bool)
        for stripe in changed:
            hit |= (self.pairs == stripe).any(-1)
        return hit.nonzero().flatten()

    def set_stripes(self, changed: list[int]) -> None:
        """Rescore after the caller changed the stripes ``changed``."""
        self.current[changed] = stripe_kept(self.matrix, self.stripes[changed], self.n)
        self._rescore(self._touching(changed))

    def run(self) -> int:
        """Apply improving pair moves until none is left; returns how many were applied."""
        applied = 0
        tolerance = 1e-6 * max(self.current.sum().item(), 1e-30) / len(self.current)
        while True:
            order = torch.argsort(self.gain, descending=True, stable=True)
            used: set[int] = set()
            changed: list[int] = []
            for k in order.tolist():
                if self.gain[k].item() <= tolerance:
                    break
                members = self.pairs[k].tolist()
                if used.intersection(members):
                    continue
                columns = self.stripes[members].reshape(-1)
                self.stripes[members] = columns[self.splits[self.best[k]]].reshape(-1, self.m)
                used.update(members)
                changed += members
                applied += 1
            if not changed:
                return applied
            self.set_stripes(changed)


def pair_search_order(matrix: torch.Tensor, n: int, m: int, start: torch.Tensor | None = None,
                      escapes: int = 100, seed: int = 0, budget: float = 2e9
                      ) -> tuple[torch.Tensor, int]:
    """Stripe-pair search with escape moves from ``start`` (default: the identity order),
    then stripe triples where they fit ``budget``, alternating until neither improves;
    returns the order and the number of moves applied."""
    order, moves = _pairs_with_escapes(matrix, n, m, start, escapes, seed)
    if not group_search_fits(matrix.shape[0], matrix.shape[1], m, budget, size=3):
        return order, moves
    while True:
        triples = _StripeGroupSearch(matrix, n, m, order.reshape(-1, m), size=3)
        found = triples.run()
        if not found:
            return order, moves
        order, more = _pairs_with_escapes(matrix, n, m, triples.stripes.reshape(-1), 0, seed)
        moves += found + more


def _pairs_with_escapes(matrix: torch.Tensor, n: int, m: int, start: torch.Tensor | None,
                        escapes: int, seed: int) -> tuple[torch.Tensor, int]:
    channels = matrix.shape[1]
    start = torch.arange(channels) if start is None else start
    search = _StripeGroupSearch(matrix, n, m, start.reshape(-1, m))
    moves = search.run()
    best = search.snapshot()
    best_score = search.current.sum().item()
    count = channels // m
    generator = torch.Generator().manual_seed(seed)
    for _ in range(escapes if count > 1 else 0):
        s, t = torch.randperm(count, generator=generator)[:2].tolist()
        i, j = torch.randint(m, (2,), generator=generator).tolist()
        search.restore(best)  # every escape starts from the best order, its table intact
        stripes = search.stripes
        stripes[s, i], stripes[t, j] = stripes[t, j].item(), stripes[s, i].item()
        search.set_stripes([s, t])
        moves += search.run()
        score = search.current.sum().item()
        if score > best_score + 1e-9 * abs(best_score):
            best, best_score = search.snapshot(), score
    return best[0].reshape(-1), moves


def group_search_fits(rows: int, channels: int, m: int, budget: float, size: int = 2) -> bool:
    """Whether one full table of stripe groups of ``size`` stays within ``budget`` scored
    entries (rows x channels of every split of every group)."""
    count = channels // m
    if count < size:
        return False
    splits = partition_count(size * m, m)
    return math.comb(count, size) * splits * size * m * max(rows, 1) <= budget


def _affordable_escapes(rows: int, channels: int, m: int, budget: float) -> int:
    """Escapes that fit the budget left after the first pair table (each rescores the pairs
    of two stripes)."""
    count, entries = channels // m, partition_count(2 * m, m) * 2 * m * max(rows, 1)
    left = min(budget - math.comb(count, 2) * entries, _ESCAPE_BUDGET)
    return max(0, int(left // (2 * (count - 1) * entries)))


def consumer_matrix(model: nn.Module, group: ChannelGroup,
                    weights: set[str] | None = None) -> tuple[torch.Tensor, list[str]]:
    """``|w|`` of the group's consumers as ``(rows, C)``: one row per output channel and
    kernel position of each consumer (restricted to ``weights`` if given)."""
    tensors = model_tensors(model)
    rows, names = [], []
    for piece in group.consumers:
        if weights is not None and piece.tensor not in weights:
            continue
        window = tensors[piece.tensor].detach().narrow(piece.dim, piece.start, piece.length)
        rows.append(window.movedim(piece.dim, -1).reshape(-1, group.size).abs().float())
        names.append(piece.tensor)
    if not rows:
        return torch.zeros(0, group.size), names
    return torch.cat(rows), names


def permute_for_nm(model: nn.Module, groups: list[ChannelGroup], pattern: PatternLike = "2:4",
                   *, weights: Iterable[str] | None = None, exhaustive_limit: int = 6000,
                   max_swaps: int | None = None, escapes: int = 100,
                   pair_budget: float = 1e9, seed: int = 0) -> PermutationReport:
    """Permute every free group whose consumers are N:M-pruned so that more ``|w|`` survives
    ``pattern``; the model's function is unchanged. ``weights``: the names of the weights
    that will be pruned (default: every consumer). ``escapes``, ``pair_budget``, ``seed``:
    the stripe-pair search (module docstring)."""
    pattern = parse_pattern(pattern)
    if not isinstance(pattern, NM) or pattern.layout != "in":
        raise ValueError(f"channel permutations need an N:M pattern grouped along the input "
                         f"channels (e.g. '2:4'), got {pattern}")
    n, m = pattern.n, pattern.m
    wanted = None if weights is None else set(weights)
    report = PermutationReport(pattern)
    for group in groups:
        label = f"group of {group.size} read by " + \
            ", ".join(sorted({s.tensor for s in group.consumers})) if group.consumers else ""
        if not group.consumers or (wanted is not None
                                   and not any(s.tensor in wanted for s in group.consumers)):
            continue
        if group.pinned:
            report.skipped.append(f"{label}: pinned ({group.pinned[0]})")
            continue
        misaligned = [s.tensor for s in group.consumers if s.start % m]
        if group.size % m or misaligned:
            report.skipped.append(f"{label}: {group.size} channels or their offset not "
                                  f"divisible by M={m}")
            continue
        matrix, names = consumer_matrix(model, group, wanted)
        if group.size == m:
            continue  # one stripe: nothing to reorder
        identity = torch.arange(group.size)
        before = stripe_kept(matrix, identity.reshape(-1, m), n).sum().item()
        if partition_count(group.size, m) <= exhaustive_limit:
            order, search = exhaustive_order(matrix, n, m), "exhaustive"
        else:
            order, swaps = greedy_swap_order(matrix, n, m, max_swaps)
            search = f"greedy swaps ({swaps} applied)"
            if group_search_fits(matrix.shape[0], group.size, m, pair_budget):
                affordable = _affordable_escapes(matrix.shape[0], group.size, m, pair_budget)
                tries = min(escapes, affordable)
                order, moves = pair_search_order(matrix, n, m, order, tries, seed,
                                                 pair_budget)
                search += f", stripe pairs ({moves} moves, {tries} escapes)"
        after = stripe_kept(matrix, order.reshape(-1, m), n).sum().item()
        if after <= before:
            order, after = identity, before
        else:
            permute_group(model, group, order)
        report.groups.append(GroupPermutation(group.size, names, before, after,
                                              matrix.sum().item(), search))
    return report


def permute_model(model: nn.Module, pattern: PatternLike, batch, weights: Iterable[str] | None
                  = None) -> PermutationReport:
    """Trace ``model`` on one calibration ``batch`` (a tensor, a mapping of keyword arguments
    or an ``(inputs, targets)`` pair) and permute it for ``pattern`` (what
    ``nmsparse.prune(..., permute=True)`` calls)."""
    from .trace import channel_graph

    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        batch = batch[0]
    device = next(model.parameters()).device
    if isinstance(batch, torch.Tensor):
        batch = batch.to(device)
    elif isinstance(batch, dict):
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return permute_for_nm(model, channel_graph(model, batch), pattern, weights=weights)
