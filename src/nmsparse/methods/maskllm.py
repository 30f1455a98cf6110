"""MaskLLM (Fang et al., NeurIPS 2024, "MaskLLM: Learnable Semi-Structured Sparsity for Large
Language Models"): learn which of the C(M, N) candidate masks each group of M weights keeps.

Every group of M weights has one logit ``pi_c`` per candidate mask ``S_c`` (the C(M, N) ways
to keep N of M: 6 for 2:4, 70 for 4:8). In training mode forward uses
``W * sum_c y_c S_c`` with the Gumbel-softmax weights
``y = softmax((kappa * pi + g) / tau)``, ``g`` Gumbel noise drawn afresh for every optimizer
step (one mask sample per step: every micro-batch of an accumulated step, a layer called twice
and a recomputed forward under activation checkpointing see the same one); the temperature
``tau`` falls linearly from ``temperature_start`` to ``temperature_end`` and the logit scale
``kappa`` grows linearly from ``scale_start`` to ``scale_end`` over ``steps`` optimizer steps
(then both stay at their end values). Defaults are the paper's: tau 4 -> 0.05, kappa
1e2 -> 5e2, 2000 steps. In evaluation mode, at ``finalize`` and in
``w.mask`` (so in ``handle.masks()``) the mask is the hard one: each group's highest-logit
candidate (ties to the first in lexicographic order). The mask buffer is brought up to date
after every optimizer step.

**Who trains the logits.** The method does, inside your optimizer's ``step()``: the logits are
method state (``w.state["maskllm_logits"]``, saved by ``handle.state_dict()`` with the Adam
moments and step counts, so a resume is bit-identical), updated with Adam (``lr``, cosine
decay to ``lr / 10`` over ``steps``; betas 0.9 / 0.95 and eps 1e-5 as in the paper's runs)
on their gradient once it is final (accumulated micro-batches, DDP-averaged). Your optimizer
and training loop stay as they are: any ``torch.optim`` optimizer over the model's parameters
drives the step (HF Trainer, Lightning and ``nmsparse train`` included); a loop that updates
by hand calls ``handle.before_step()`` / ``handle.after_step()``. The model's parameters,
``state_dict()`` keys and ``finalize``d modules are those of the plain model.

**Weights.** Frozen by default (``train_weights=False``): forward reads the dense weight
without autograd, so it gets no gradient and an optimizer leaves it alone (it keeps
``requires_grad``, so that the optimizer still holds it and its step drives the method; under
DDP pass ``find_unused_parameters=True``). ``train_weights=True`` trains them too, with the
gradient of ``W * soft mask``.

**Prior.** A mask given to ``sparsify(..., masks=)`` (e.g. ``prune(..., then="maskllm")`` hands
over SparseGPT's) raises the candidates that agree with it: ``pi_c += prior_strength * std(pi)
* (|S_c & prior| - N^2 / M)`` (the overlap minus its mean over the candidates; N/2 for 2:4).
Without one the logits start as ``init_std`` times Gaussian noise (seeded by ``seed`` and the
weight's name). The start mask is then the argmax, which agrees with the prior in most but
not necessarily all groups.

**Regulariser.** ``weight_reg`` > 0 adds the gradient of ``-weight_reg * ||W * soft mask||^2``
(the paper's sparse weight regularisation, which keeps the kept weights large) to the soft
mask's gradient in every training forward, its weight fading linearly to 0 over ``steps``.

**Memory.** C(M, N) / M logits per weight (1.5 for 2:4, 8.75 for 4:8) plus two Adam moments
each; stored in the weight's dtype when that is bfloat16 or float16 (``logit_dtype="auto"``),
else float32. Patterns with more than 1000 candidates per group are refused.

**Noise.** ``gumbel_noise(seed, step, name, shape)`` is the noise of weight ``name`` during
optimizer step ``step``: reproducible, so a test can redo a step by hand.

A patent application covering MaskLLM's schedules and prior initialisation has been published
by the authors' employer; see the README.
"""

from __future__ import annotations

import functools
import itertools
import math
import zlib
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..patterns import NM
from ..patterns.grouping import from_groups, to_groups
from ._nm import unsharded_nm_geometry
from ._progress import check_choice, check_count, check_number, steps_taken, training
from .base import Method, Step, kept_gradient_only

MAX_CANDIDATES = 1000
LOGITS, EXP_AVG, EXP_AVG_SQ = "maskllm_logits", "maskllm_exp_avg", "maskllm_exp_avg_sq"
UPDATES, STARTED = "maskllm_updates", "maskllm_started"
BETAS, EPS = (0.9, 0.95), 1e-5
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_PRIME = 1_000_003


@functools.lru_cache(maxsize=64)
def candidates(n: int, m: int, device: str = "cpu") -> torch.Tensor:
    """The C(m, n) masks keeping n of m, as a float ``(C, m)`` tensor in lexicographic order
    of the kept positions (``[1,1,0,0], [1,0,1,0], ...`` for 2:4). Cached: do not modify."""
    rows = [[1.0 if i in kept else 0.0 for i in range(m)]
            for kept in itertools.combinations(range(m), n)]
    return torch.tensor(rows, device=device)


def gumbel_noise(seed: int, step: int, name: str, shape: tuple[int, ...],
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Float32 Gumbel(0, 1) noise ``-log(-log(U))`` of weight ``name`` during optimizer step
    ``step`` (see the module docstring), from a generator seeded by the three."""
    key = seed
    for part in (step, zlib.crc32(name.encode())):
        key = (key * _PRIME + part) % (1 << 63)
    generator = torch.Generator(device=device).manual_seed(key)
    uniform = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    tiny = torch.finfo(torch.float32).tiny
    return -torch.log(-torch.log(uniform.clamp(tiny, 1.0 - 2 ** -24)))


def linear(start: float, end: float, step: int, steps: int) -> float:
    """``start`` moved linearly to ``end`` over ``steps`` steps, then held."""
    return start + (end - start) * min(step, steps) / steps


@dataclass(frozen=True)
class MaskLLM(Method):
    """Gumbel-softmax over the C(M, N) candidate masks of every group (see the module
    docstring): logits trained inside the optimizer step, weights frozen by default."""

    name: ClassVar[str] = "maskllm"
    patterns: ClassVar[tuple] = (NM,)
    gradient: ClassVar[str] = "none"  # frozen weights by default (train_weights=True: "all")
    temperature_start: float = 4.0
    temperature_end: float = 0.05
    scale_start: float = 1e2
    scale_end: float = 5e2
    steps: int = 2000
    lr: float = 5e-4
    prior_strength: float = 3.0
    weight_reg: float = 1e-5
    init_std: float = 1e-2
    train_weights: bool = False
    seed: int = 0
    logit_dtype: str = "auto"

    def __post_init__(self) -> None:
        for option in ("temperature_start", "temperature_end", "scale_start", "scale_end"):
            if check_number(option, getattr(self, option), 0.0) == 0.0:
                raise ValueError(f"{option} must be > 0, got {getattr(self, option)!r}")
        object.__setattr__(self, "steps", check_count("steps", self.steps, 1))
        check_number("lr", self.lr, 0.0)
        check_number("prior_strength", self.prior_strength, 0.0)
        check_number("weight_reg", self.weight_reg, 0.0)
        check_number("init_std", self.init_std, 0.0)
        check_count("seed", self.seed, 0)
        if not isinstance(self.train_weights, bool):
            raise ValueError(f"train_weights must be true or false, got {self.train_weights!r}")
        check_choice("logit_dtype", self.logit_dtype, ("auto", *DTYPES))

    # -- schedules -----------------------------------------------------------------------------
    def temperature(self, step: int) -> float:
        return linear(self.temperature_start, self.temperature_end, step, self.steps)

    def scale(self, step: int) -> float:
        return linear(self.scale_start, self.scale_end, step, self.steps)

    def regularisation(self, step: int) -> float:
        """The weight of the kept-weight regulariser, fading linearly to 0."""
        return linear(self.weight_reg, 0.0, step, self.steps)

    def learning_rate(self, step: int) -> float:
        """Cosine decay from ``lr`` to ``lr / 10`` over ``steps``."""
        progress = min(step, self.steps) / self.steps
        return self.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))

    # -- the logits ----------------------------------------------------------------------------
    def _geometry(self, w) -> tuple[int, int, str, torch.Tensor]:
        n, m, layout = unsharded_nm_geometry(w, self.name)
        count = math.comb(m, n)
        if count > MAX_CANDIDATES:
            raise ValueError(
                f"{w.name}: maskllm keeps a logit per candidate mask, C({m},{n}) = {count} per "
                f"group ({count / m:.0f} per weight); refused above {MAX_CANDIDATES} (memory "
                "and the per-group softmax grow with C(M,N)): use e.g. 2:4 (6) or 4:8 (70)")
        return n, m, layout, candidates(n, m, str(w.dense.device))

    def _dtype(self, w) -> torch.dtype:
        if self.logit_dtype != "auto":
            return DTYPES[self.logit_dtype]
        dtype = w.dense.dtype
        return dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32

    def logits(self, w) -> torch.Tensor:
        """The weight's logits ``(..., groups, C)`` (a leaf that autograd fills), created on
        first use and moved to the weight's device after a load."""
        n, m, layout, table = self._geometry(w)
        logits = w.state.get(LOGITS)
        if logits is None:
            shape = to_groups(w.dense.detach(), m, layout).shape[:-1] + (table.shape[0],)
            generator = torch.Generator().manual_seed(
                (self.seed * _PRIME + zlib.crc32(w.name.encode())) % (1 << 63))
            logits = torch.randn(shape, generator=generator) * self.init_std
        if logits.device != w.dense.device or logits.dtype != self._dtype(w) \
                or not logits.requires_grad:
            logits = logits.detach().to(w.dense.device, self._dtype(w)).requires_grad_()
            w.state[LOGITS] = logits
        return logits

    def hard_mask(self, w) -> torch.Tensor:
        """Bool, weight-shaped: each group's highest-logit candidate."""
        n, m, layout, table = self._geometry(w)
        chosen = table[self.logits(w).detach().argmax(-1)]
        return from_groups(chosen, w.dense.shape, layout).bool()

    def soft_mask(self, w, noise: torch.Tensor, step: int) -> torch.Tensor:
        """``sum_c y_c S_c`` (weight-shaped, in the weight's dtype) for the given noise."""
        n, m, layout, table = self._geometry(w)
        logits = self.logits(w).float()
        weights = torch.softmax((self.scale(step) * logits + noise) / self.temperature(step), -1)
        return from_groups(weights @ table, w.dense.shape, layout).to(w.dense.dtype)

    def _apply_prior(self, w, prior: torch.Tensor) -> None:
        n, m, layout, table = self._geometry(w)
        logits = self.logits(w)
        overlap = to_groups(prior.to(table.dtype), m, layout) @ table.t()
        with torch.no_grad():
            spread = logits.float().std() if logits.numel() > 1 else logits.new_zeros(())
            boost = self.prior_strength * spread * (overlap - n * n / m)
            logits.add_(boost.to(logits.dtype))

    # -- the method hooks ------------------------------------------------------------------------
    def score(self, w) -> torch.Tensor:
        return self.hard_mask(w).float()  # the pattern's top N of it is the chosen candidate

    def refresh(self, w) -> torch.Tensor:
        if not w.state.get(STARTED):  # the first refresh, inside sparsify
            w.state[STARTED] = True
            given = w.mask.detach().clone()
            if not torch.equal(given, self.hard_mask(w)):  # sparsify(masks=...): the prior
                self._apply_prior(w, given)
        return w.recompute_mask(self.score(w))

    def masked_weight(self, w) -> torch.Tensor:
        if not training(w):
            return kept_gradient_only(w)  # W * hard mask
        step = steps_taken(w)
        logits = self.logits(w)
        noise = gumbel_noise(self.seed, step, w.name, tuple(logits.shape), w.dense.device)
        soft = self.soft_mask(w, noise, step)
        dense = w.dense if self.train_weights else w.dense.detach()
        strength = self.regularisation(step)
        if strength > 0 and soft.requires_grad:
            # d(-strength * ||W * soft||^2) / d soft, added to the loss's gradient
            pull = -2 * strength * dense.detach().square()
            soft.register_hook(lambda grad: grad + pull * soft.detach())
        return dense * soft

    def before_step(self, weights, step: Step) -> None:
        for w in weights:
            logits = w.state.get(LOGITS)
            if logits is None or logits.grad is None:
                continue
            grad = logits.grad
            if torch.distributed.is_available() and torch.distributed.is_initialized() \
                    and torch.distributed.get_world_size() > 1:
                torch.distributed.all_reduce(grad)
                grad.div_(torch.distributed.get_world_size())
            self._adam(w, logits, grad, step.index)
            logits.grad = None

    def _adam(self, w, logits: torch.Tensor, grad: torch.Tensor, index: int) -> None:
        """One bias-corrected Adam step on the logits (its state in ``w.state``)."""
        count = w.state.get(UPDATES, 0) + 1
        w.state[UPDATES] = count
        exp_avg, exp_avg_sq = (_moment(w, key, logits) for key in (EXP_AVG, EXP_AVG_SQ))
        beta1, beta2 = BETAS
        with torch.no_grad():
            exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denominator = (exp_avg_sq / (1 - beta2 ** count)).sqrt_().add_(EPS)
            step_size = self.learning_rate(index) / (1 - beta1 ** count)
            logits.addcdiv_(exp_avg, denominator, value=-step_size)

    def after_step(self, weights, step: Step) -> None:
        for w in weights:
            w.refresh()  # the mask buffer follows the updated logits


def _moment(w, key: str, logits: torch.Tensor) -> torch.Tensor:
    """An Adam moment of ``w``'s logits, zero at first, on the logits' device after a load."""
    moment = w.state.get(key)
    if moment is None or moment.device != logits.device or moment.dtype != logits.dtype:
        moment = (torch.zeros_like(logits.detach()) if moment is None
                  else moment.to(logits.device, logits.dtype))
        w.state[key] = moment
    return moment
