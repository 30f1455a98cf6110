"""CHEX channel exploration (Hou et al., CVPR 2022): train a channel-pruned sub-model from
scratch while repeatedly pruning channels and regrowing others under a global channel budget,
then export a physically smaller dense model.

    chex = Chex(model, example_batch, budget=0.5, every=100, until=1000, multiple_of=4)
    handle = nmsparse.drive(model, chex)   # runs after every optimizer.step()
    ...train...                            # handle.state_dict() holds CHEX's state
    small = chex.export()           # a smaller nn.Module, same outputs as the masked model

Which channels: the slimmable free groups of :func:`~nmsparse.channels.channel_graph` (the
others stay whole). ``budget`` is the fraction of those groups' channels kept, in total; each
group keeps a multiple of ``multiple_of`` channels (e.g. M, so N:M still fits the slimmed
layers), at least one multiple.

At construction the model is pruned at once to an allocation proportional to the group sizes
(so the whole run trains the sub-model). Then every ``every`` optimizer steps while
``step <= until`` one exploration runs, with the regrow fraction
``d = regrow * (1 + cos(pi * step / until)) / 2`` (decaying to 0 at ``until``):

1. **Prune** by column-subset selection: in each group's channel matrix (its consumers' input
   columns concatenated, one column per channel, active channels only) the channels with the
   smallest rank-k leverage scores ``||V_k[j, :]||^2`` are dropped, ``floor(d * width)`` of
   them, where ``V_k`` holds the top-k right singular vectors (k = the group's width, at most
   the matrix's rank). The paper *samples* channels in proportion to their leverage scores;
   here the largest are kept, deterministically. The dropped channels' values (every member
   slice: producer rows and biases, followers such as BatchNorm, consumer columns) are saved.
2. **Re-allocate** the widths under the global budget in proportion to each group's
   importance over its active channels: the sum of ``|gamma|`` of its BatchNorm followers
   when it has one, else the sum of the L2 norms of its producer rows (water-filling with
   each width between ``multiple_of`` and the group's size, rounded to multiples by largest
   remainders, so the widths sum exactly to the budget).
3. **Regrow** a group below its new width: the dropped channels whose saved consumer columns
   have the largest residual after orthogonal projection onto the active channels' columns
   come back with their most recently used values (the paper samples in proportion to the
   residuals; here the largest win, deterministically). A group above its new width is pruned
   further by leverage scores (``reallocate=False`` keeps the first widths: exploration of
   which channels only). So ``d`` is the share of each width that is re-explored; the
   re-allocation may move more.

CHEX is a model-level method (:class:`~nmsparse.methods.ModelMethod`): a sparsity handle runs
it inside ``optimizer.step()`` with the handle's step index and optimizer, and saves its state
in ``handle.state_dict()``, as for per-weight methods. Regrown channels get their optimizer
state reset by :func:`nmsparse.engine.optim_state.reset_optimizer_state` (the one prune-and-grow
uses). After every step (also after ``until``) dropped channels are re-masked: consumer columns
(:func:`~nmsparse.channels.mask_channels`), producer rows and biases are zeroed, so the
optimizer (momentum, weight decay) cannot revive them and :meth:`Chex.export` equals the
masked model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from ..engine.optim_state import reset_optimizer_state
from ..methods import ModelMethod, Step
from .groups import ChannelGroup, model_tensors
from .slim import mask_channels, slim, why_not_slimmable
from .trace import channel_graph


def leverage_scores(matrix: torch.Tensor, k: int) -> torch.Tensor:
    """Rank-k leverage score of every column of ``matrix``: ``||V_k[j, :]||^2`` with ``V_k``
    the top-``k`` right singular vectors (``k`` capped at the numerical rank)."""
    matrix = matrix.double()
    if matrix.numel() == 0:
        return torch.zeros(matrix.shape[1], dtype=torch.float64)
    _, values, vh = torch.linalg.svd(matrix, full_matrices=False)
    tolerance = values.max() * max(matrix.shape) * torch.finfo(torch.float64).eps
    rank = int((values > tolerance).sum())
    k = min(k, rank)
    if k == 0:
        return torch.zeros(matrix.shape[1], dtype=torch.float64)
    return (vh[:k] ** 2).sum(0)


def projection_residuals(candidates: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Norm of each column of ``candidates`` minus its orthogonal projection onto the span of
    the columns of ``basis``."""
    candidates = candidates.double()
    if basis.numel() == 0 or basis.shape[1] == 0:
        return candidates.norm(dim=0)
    q, r = torch.linalg.qr(basis.double())
    independent = r.diagonal().abs() > 1e-10 * max(r.diagonal().abs().max().item(), 1e-300)
    q = q[:, independent]
    return (candidates - q @ (q.T @ candidates)).norm(dim=0)


def _top(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Positions of the ``count`` largest scores, ties broken by the lower position."""
    order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))
    return torch.tensor(sorted(order[:count]), dtype=torch.long)


def allocate(importance: list[float], sizes: list[int], total: int, multiple_of: int
             ) -> list[int]:
    """Widths proportional to ``importance``, each a multiple of ``multiple_of`` between one
    multiple and the group's size (rounded down to a multiple), summing to ``total`` (itself
    clipped to what the bounds allow)."""
    caps = [max(1, size // multiple_of) for size in sizes]
    units = min(max(round(total / multiple_of), len(sizes)), sum(caps))
    weights = [max(float(i), 0.0) for i in importance]
    if not sum(weights):
        weights = [float(size) for size in sizes]
    fixed: dict[int, float] = {}
    while True:  # water-filling: clip at the bounds, share the rest among the others
        free = [g for g in range(len(sizes)) if g not in fixed]
        left = units - sum(fixed.values())
        mass = sum(weights[g] for g in free)
        share = {g: (left * weights[g] / mass if mass else left / len(free)) for g in free}
        clipped = {g: min(max(s, 1.0), caps[g]) for g, s in share.items()
                   if s > caps[g] or s < 1.0}
        if not clipped:
            break
        fixed.update(clipped)
    share.update(fixed)
    counts = {g: int(math.floor(s)) for g, s in share.items()}
    rest = units - sum(counts.values())
    order = sorted(share, key=lambda g: (-(share[g] - counts[g]), g))
    for g in order:
        if rest <= 0:
            break
        if counts[g] < caps[g]:
            counts[g] += 1
            rest -= 1
    return [counts[g] * multiple_of for g in range(len(sizes))]


class Chex(ModelMethod):
    """CHEX channel exploration of ``model`` (see the module docstring)."""

    name = "chex"

    def __init__(self, model: nn.Module, example, budget: float = 0.5, every: int = 100,
                 until: int = 1000, regrow: float = 0.3, multiple_of: int = 1,
                 opaque: Iterable = (), reallocate: bool = True) -> None:
        if not 0 < budget <= 1:
            raise ValueError(f"budget must be in (0, 1], got {budget}")
        if every < 1 or until < 0:
            raise ValueError(f"every must be >= 1 and until >= 0, got {every} and {until}")
        if not 0 <= regrow <= 1:
            raise ValueError(f"regrow must be in [0, 1], got {regrow}")
        if multiple_of < 1:
            raise ValueError(f"multiple_of must be >= 1, got {multiple_of}")
        self.model, self.budget, self.every, self.until = model, budget, every, until
        self.regrow, self.multiple_of, self.reallocate = regrow, multiple_of, reallocate
        self.groups: list[ChannelGroup] = [
            g for g in channel_graph(model, example, opaque=opaque)
            if why_not_slimmable(g) is None and g.consumers and g.size >= multiple_of]
        if not self.groups:
            raise ValueError("CHEX found no channel group it can prune in this model (every "
                             "group is pinned, unslimmable or smaller than multiple_of)")
        self.step = 0  # optimizer steps taken (the handle's index + 1 after a step)
        self.optimizer: torch.optim.Optimizer | None = None  # the one stepping (from Step)
        self.keep = [torch.ones(g.size, dtype=torch.bool) for g in self.groups]
        # most recently used values of every channel, per group and member slice
        self.saved = [[self._window(piece).detach().clone() for piece in g.members]
                      for g in self.groups]
        sizes = [g.size for g in self.groups]
        self.widths = allocate(sizes, sizes, round(budget * sum(sizes)), multiple_of)
        for index, width in enumerate(self.widths):
            self.prune_group(index, width)
        self.enforce()

    # -- tensors ----------------------------------------------------------------------------
    def _window(self, piece, tensors: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        tensors = model_tensors(self.model) if tensors is None else tensors
        return tensors[piece.tensor].narrow(piece.dim, piece.start, piece.length)

    def channel_matrix(self, index: int) -> torch.Tensor:
        """The consumer columns of group ``index`` as ``(rows, size)``, one column per
        channel (the saved values for dropped channels)."""
        group, rows = self.groups[index], []
        for position, piece in enumerate(group.members):
            if piece.role != "consumer":
                continue
            window = self._window(piece).detach().clone()
            dropped = (~self.keep[index]).nonzero().flatten().to(window.device)
            window.index_copy_(piece.dim, dropped, self.saved[index][position].index_select(
                piece.dim, dropped))
            rows.append(window.movedim(piece.dim, -1).reshape(-1, group.size).float().cpu())
        return torch.cat(rows)

    def importance(self, index: int) -> float:
        """Sum of ``|gamma|`` of the group's BatchNorm followers over its active channels, or
        (without one) the sum of the L2 norms of its active producer rows."""
        group, active = self.groups[index], self.keep[index]
        modules = dict(self.model.named_modules())
        gammas = []
        for piece in group.role("follower"):
            owner, _, attr = piece.tensor.rpartition(".")
            if attr == "weight" and isinstance(modules.get(owner),
                                               nn.modules.batchnorm._BatchNorm):
                gammas.append(self._window(piece).detach().abs().float().cpu())
        if gammas:
            return float(sum(g[active].sum() for g in gammas))
        squares = torch.zeros(group.size)
        for piece in group.producers:
            window = self._window(piece).detach().float().cpu()
            squares += window.movedim(piece.dim, 0).reshape(group.size, -1).pow(2).sum(1)
        return float(squares.sqrt()[active].sum())

    # -- prune, regrow, mask ----------------------------------------------------------------
    def prune_group(self, index: int, width: int) -> torch.Tensor:
        """Keep the ``width`` active channels of group ``index`` with the largest leverage
        scores; save and drop the others. Returns the dropped channels."""
        active = self.keep[index].nonzero().flatten()
        if width >= active.numel():
            return torch.zeros(0, dtype=torch.long)
        matrix = self.channel_matrix(index)[:, active]
        chosen = active[_top(leverage_scores(matrix, width), width)]
        dropped = active[~torch.isin(active, chosen)]
        self._save(index, dropped)
        self.keep[index][dropped] = False
        return dropped

    def regrow_group(self, index: int, count: int) -> torch.Tensor:
        """Bring back the ``count`` dropped channels of group ``index`` with the largest
        projection residual against the active channels, with their saved values."""
        dropped = (~self.keep[index]).nonzero().flatten()
        count = min(count, dropped.numel())
        if count <= 0:
            return torch.zeros(0, dtype=torch.long)
        matrix = self.channel_matrix(index)
        residuals = projection_residuals(matrix[:, dropped], matrix[:, self.keep[index]])
        chosen = dropped[_top(residuals, count)]
        self.keep[index][chosen] = True
        with torch.no_grad():
            for piece, saved in zip(self.groups[index].members, self.saved[index], strict=True):
                window = self._window(piece)
                where = chosen.to(window.device)
                window.index_copy_(piece.dim, where, saved.index_select(piece.dim, where))
            self._reset_optimizer_state(index, chosen)
        return chosen

    def _reset_optimizer_state(self, index: int, channels: torch.Tensor) -> None:
        """Regrown channels start with fresh optimizer state (momentum, Adam moments): what
        accumulated while they were dropped must not move their restored values."""
        if self.optimizer is None:
            return
        tensors = model_tensors(self.model)
        for piece in self.groups[index].members:
            param = tensors[piece.tensor]
            where = torch.zeros(param.shape, dtype=torch.bool, device=param.device)
            where.narrow(piece.dim, piece.start, piece.length).index_fill_(
                piece.dim, channels.to(param.device), True)
            reset_optimizer_state(self.optimizer, param, where)

    def _save(self, index: int, channels: torch.Tensor) -> None:
        with torch.no_grad():
            for piece, saved in zip(self.groups[index].members, self.saved[index], strict=True):
                where = channels.to(saved.device)
                saved.index_copy_(piece.dim, where,
                                  self._window(piece).index_select(piece.dim, where))

    def enforce(self) -> None:
        """Zero the dropped channels' consumer columns, producer rows and biases."""
        tensors = model_tensors(self.model)  # once: this runs after every optimizer step
        for group, keep in zip(self.groups, self.keep, strict=True):
            if keep.all():
                continue
            mask_channels(self.model, group, keep, tensors)
            with torch.no_grad():
                for piece in group.producers:
                    window = self._window(piece, tensors)
                    shape = [1] * window.dim()
                    shape[piece.dim] = piece.length
                    window.mul_(keep.reshape(shape).to(window.device, window.dtype))

    # -- the schedule -----------------------------------------------------------------------
    def regrow_fraction(self) -> float:
        if self.until <= 0:
            return 0.0
        return self.regrow * (1 + math.cos(math.pi * min(self.step / self.until, 1.0))) / 2

    def explore(self) -> None:
        """One exploration: prune, re-allocate the widths, regrow (module docstring)."""
        fraction = self.regrow_fraction()
        for index, width in enumerate(self.widths):
            self.prune_group(index, width - math.floor(fraction * width))
        if self.reallocate:
            sizes = [g.size for g in self.groups]
            importance = [self.importance(i) for i in range(len(self.groups))]
            self.widths = allocate(importance, sizes, round(self.budget * sum(sizes)),
                                   self.multiple_of)
        for index, width in enumerate(self.widths):
            active = int(self.keep[index].sum())
            if width > active:
                self.regrow_group(index, width - active)
            else:
                self.prune_group(index, width)
        self.enforce()

    def after_step(self, step: Step | None = None) -> None:
        """After an optimizer step (run by the handle, :func:`nmsparse.drive`); with no
        ``step``, a hand-written update loop's next step (its regrown channels keep their
        optimizer state)."""
        if step is not None:
            self.step, self.optimizer = step.index + 1, step.optimizer
        else:
            self.step += 1
        if self.step % self.every == 0 and self.step <= self.until:
            self.explore()
        else:
            self.enforce()

    def attach(self, optimizer: torch.optim.Optimizer):
        """Run CHEX at every ``optimizer.step()`` on a handle of its own, attached to
        ``optimizer``; returns that handle (``nmsparse.drive(model, chex)`` uses the global
        step hooks instead)."""
        from ..engine.make_sparse import drive

        return drive(self.model, self).attach(optimizer)

    def report(self, example) -> dict:
        """The exported slim model's size, for a training run's summary."""
        from ..summary import summary

        table = summary(self.export(), example)
        return {"budget": self.budget, "widths": list(self.widths),
                "params": table.total.params_dense, "macs": table.total.macs_dense,
                "summary": table.to_dict()}

    # -- results ----------------------------------------------------------------------------
    def keep_masks(self) -> list[torch.Tensor]:
        return [keep.clone() for keep in self.keep]

    def export(self) -> nn.Module:
        """A physically smaller copy of the (masked) model without the dropped channels."""
        self.enforce()
        return slim(self.model, self.groups, dict(enumerate(self.keep)))

    def state_dict(self) -> dict:
        return {"step": self.step, "widths": list(self.widths),
                "keep": [keep.clone() for keep in self.keep],
                "saved": [[t.clone() for t in group] for group in self.saved]}

    def load_state_dict(self, state: dict) -> None:
        keep = [torch.as_tensor(k, dtype=torch.bool) for k in state["keep"]]
        if [k.shape for k in keep] != [(g.size,) for g in self.groups]:
            raise ValueError("CHEX state does not match this model's channel groups")
        self.step, self.widths, self.keep = int(state["step"]), list(state["widths"]), keep
        if "saved" in state:
            self.saved = [[t.clone() for t in group] for group in state["saved"]]
        self.enforce()
