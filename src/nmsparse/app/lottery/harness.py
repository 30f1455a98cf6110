"""The lottery-ticket harness: one setting (final pattern, learning rate, epochs), one seed,
every arm trained from the same initialisation on the same data order.

Arms (:data:`ARMS`), all with the same training budget per training run:

* ``dense`` - the unpruned network;
* ``imp_rewind`` - iterative magnitude pruning: train, prune to the next pattern of
  :func:`imp_patterns` (among the weights still kept), rewind the kept weights to the saved
  weights, train again; ``rounds`` rounds end at the final pattern (the "ticket"). The saved
  weights are the initialisation (``rewind_steps=0``, Frankle & Carbin 2019, the default) or
  those after ``rewind_steps`` steps of the dense run (rewinding, Frankle et al. 2020,
  "Linear Mode Connectivity and the Lottery Ticket Hypothesis"); the optimizer starts afresh
  either way, as in both papers;
* ``oneshot_rewind`` - the same in one round: prune the trained dense network to the final
  pattern at once and rewind;
* ``random_reinit`` - the ticket's final mask with a fresh random initialisation;
* ``random_mask`` - a random mask of the final pattern with the saved initialisation;
* ``prune_finetune`` - the trained dense network pruned to the final pattern at once and
  trained further from its trained weights (no rewinding).

Pruned weights are held at exactly 0 with the ``fixed`` method; masks of every arm follow the
pattern (unstructured per layer, or N:M). Plain SGD with momentum at a constant learning rate,
single data order per seed, so the arms differ only in what they test.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ... import finalize, sparsify
from ...patterns import NM, Pattern, Unstructured, parse_pattern

ARMS = ("dense", "imp_rewind", "oneshot_rewind", "random_reinit", "random_mask",
        "prune_finetune")


@dataclass(frozen=True)
class TicketSetting:
    """One setting of the sanity check."""

    pattern: str  # the final pattern: "unstructured:0.1", "2:8", ...
    lr: float
    epochs: int
    rounds: int = 3
    batch_size: int = 128
    momentum: float = 0.9
    rewind_steps: int = 0  # 0: rewind to the initialisation; k: to the dense run's step k

    def __post_init__(self) -> None:
        final = parse_pattern(self.pattern)
        if not isinstance(final, (NM, Unstructured)):
            raise ValueError(f"lottery tickets take an unstructured or N:M pattern, got "
                             f"{self.pattern!r}")
        if not (self.lr > 0 and self.epochs >= 1 and self.rounds >= 1 and self.batch_size >= 1
                and 0 <= self.momentum < 1 and isinstance(self.rewind_steps, int)
                and self.rewind_steps >= 0):
            raise ValueError(f"invalid setting {self!r}: need lr > 0, epochs >= 1, rounds >= 1, "
                             "batch_size >= 1, 0 <= momentum < 1, rewind_steps an integer >= 0")


def imp_patterns(pattern: str | Pattern, rounds: int) -> list[Pattern]:
    """The pattern after each IMP round: the same fraction pruned per round, ending at
    ``pattern``. Unstructured ``D``: ``D ** (r / rounds)``; N:M: ``round(M * (N/M) ** (r /
    rounds))`` of every M, made strictly decreasing (so fewer rounds when M is small)."""
    final = parse_pattern(pattern)
    if isinstance(final, Unstructured):
        return [type(final)(final.keep ** (r / rounds)) for r in range(1, rounds)] + [final]
    if not isinstance(final, NM):
        raise ValueError(f"IMP takes an unstructured or N:M pattern, got {final}")
    counts = []
    for r in range(1, rounds + 1):
        n = max(final.n, round(final.m * (final.n / final.m) ** (r / rounds)))
        if n < final.m and (not counts or n < counts[-1]):
            counts.append(n)
    if counts[-1] != final.n:
        counts.append(final.n)
    return [NM(n, final.m, final.layout) for n in counts]


def train(model: nn.Module, batches: list, setting: TicketSetting,
          save_at: int | None = None) -> dict | None:
    """``setting.epochs`` passes over ``batches`` with SGD + momentum (hooks run the method);
    returns a copy of the weights after ``save_at`` steps (0: before the first) if asked."""
    optimizer = torch.optim.SGD(model.parameters(), lr=setting.lr, momentum=setting.momentum)
    model.train()
    saved = copy.deepcopy(model.state_dict()) if save_at == 0 else None
    steps = 0
    for _ in range(setting.epochs):
        for x, y in batches:
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            steps += 1
            if steps == save_at:
                saved = copy.deepcopy(model.state_dict())
    if save_at is not None and saved is None:
        raise ValueError(f"rewind_steps {save_at} is past the dense run's {steps} steps")
    return saved


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
                  for i in range(0, len(x), batch))
    return correct / len(x)


def _magnitude_masks(model: nn.Module, pattern: Pattern,
                     previous: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """Masks of ``pattern`` by ``|w|`` of the eligible weights (only among ``previous``)."""
    probe = copy.deepcopy(model)
    handle = sparsify(probe, pattern, "fixed")
    masks = {}
    for w, name in ((w, w.name) for w in handle):
        scores = w.dense.detach().abs()
        if previous is not None:  # pruned weights score below every kept one
            scores = torch.where(previous[name], scores + 1, torch.zeros_like(scores))
        masks[name] = pattern.mask(scores)
    return masks


def random_masks(model: nn.Module, pattern: Pattern, seed: int) -> dict[str, torch.Tensor]:
    """Masks of ``pattern`` from uniform random scores (seeded) for the eligible weights."""
    generator = torch.Generator().manual_seed(seed)
    probe = copy.deepcopy(model)
    handle = sparsify(probe, pattern, "fixed")
    return {w.name: pattern.mask(torch.rand(w.dense.shape, generator=generator)) for w in handle}


def _train_masked(make_model: Callable[[], nn.Module], state: dict, pattern: Pattern,
                  masks: dict, batches: list, setting: TicketSetting) -> nn.Module:
    """A model loaded with ``state``, pruned to ``masks`` (held), trained; finalized."""
    model = make_model()
    model.load_state_dict(state)
    sparsify(model, pattern, "fixed", masks=masks)
    train(model, batches, setting)
    return finalize(model)


def run_setting(make_model: Callable[[], nn.Module], data: dict[str, torch.Tensor],
                setting: TicketSetting, seed: int) -> dict[str, float]:
    """Test accuracy of every arm for one seed. ``data``: ``x_train, y_train, x_test,
    y_test``; ``make_model()`` builds a fresh model from the current torch seed."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data["x_train"]), generator=generator)
    batches = [(data["x_train"][idx], data["y_train"][idx])
               for idx in order.split(setting.batch_size)]
    init_model = make_model()
    patterns = imp_patterns(setting.pattern, setting.rounds)
    final = patterns[-1]
    results = {}

    def score(model):
        return accuracy(model, data["x_test"], data["y_test"])

    dense = copy.deepcopy(init_model)
    rewind = train(dense, batches, setting, save_at=setting.rewind_steps)
    results["dense"] = score(dense)

    oneshot = _magnitude_masks(dense, final, None)
    results["oneshot_rewind"] = score(_train_masked(make_model, rewind, final, oneshot, batches,
                                                    setting))
    results["prune_finetune"] = score(_train_masked(make_model, dense.state_dict(), final,
                                                    oneshot, batches, setting))
    trained, masks = dense, None
    for pattern in patterns:
        masks = _magnitude_masks(trained, pattern, masks)
        trained = _train_masked(make_model, rewind, pattern, masks, batches, setting)
    results["imp_rewind"] = score(trained)

    torch.manual_seed(seed + 10_000)  # a different initialisation, same mask
    reinit = make_model().state_dict()
    results["random_reinit"] = score(_train_masked(make_model, reinit, final, masks, batches,
                                                   setting))
    results["random_mask"] = score(_train_masked(make_model, rewind, final,
                                                 random_masks(init_model, final, seed),
                                                 batches, setting))
    assert set(results) == set(ARMS)
    return {arm: results[arm] for arm in ARMS}


def kept_fraction(masks: dict[str, torch.Tensor]) -> float:
    total = sum(m.numel() for m in masks.values())
    return sum(int(m.sum()) for m in masks.values()) / total if total else math.nan
