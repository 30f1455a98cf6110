"""SPViT token pruning (Kong et al., "SPViT: Enabling Faster Vision Transformers via Soft Token
Pruning", ECCV 2022) for any ViT that exposes its token sequence, and ``spvit_tiny``.

:class:`TokenPruningViT` wraps a *backbone* with three members: ``tokens(images)`` giving the
sequence ``(batch, 1 + patches, dim)`` with the class token first, ``blocks`` (an indexable
sequence of modules mapping a sequence to one of the same shape, of any length) and
``classify(sequence)`` giving logits from the class token. The project's ``vit_tiny``
(:class:`~nmsparse.app.models.vit.VisionTransformer`) has them.

Before each block listed in ``prune_at`` a :class:`~.token_selector.TokenSelector` decides
which patch tokens to keep; pruned ones are folded into one package token by their keep
scores (see :mod:`.token_selector`). Stage ``s`` keeps ``keep_counts[s]`` patch tokens:
``round(keep_ratio * previous count)``, at least 1 (``keep_ratio`` may be one float for
every stage or one per stage). So with 64 patches, ``prune_at=(2, 4)`` and 0.5, blocks 0-1
see 1 + 64 tokens, blocks 2-3 see 1 + 32 + 1 and blocks 4+ see 1 + 16 + 1.

* Inference (eval mode): the ``keep_counts`` best-scoring tokens stay, the sequence really
  shrinks, so any block works and ``nmsparse.summary`` counts the MACs of the pruned model.
* Training: Gumbel-softmax keep decisions (hard forward, soft gradient) per token; nothing is
  removed, pruned tokens are masked out as attention keys. This needs pre-LN blocks with
  ``norm1``, ``attn`` (``nn.MultiheadAttention``, ``batch_first``), ``norm2`` and ``mlp``
  (``vit_tiny``'s layout); other blocks raise a clear error in training mode.
* The computation-aware ratio loss: per stage the squared gap between each image's
  kept-token fraction and the stage's target ``keep_counts[s] / patches``, weighted by the
  share of the blocks' MACs that stage governs (counted once by ``nmsparse.summary`` on the
  unpruned blocks), times ``ratio_weight``. Its gradient is attached to the training
  forward's output (:mod:`._auxiliary`), so any loop that backpropagates through the output
  trains with it; :meth:`TokenPruningViT.ratio_loss` (also ``auxiliary_loss``, which
  ``nmsparse train`` adds to the loss it reports) gives its value.

N:M weights compose: ``nmsparse.sparsify`` on the wrapper sparsifies the backbone's and the
selectors' layers like any others.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ...summary import summary
from . import _checks
from ._auxiliary import with_auxiliary
from ._registry import register_model
from .token_selector import TokenSelector, keep_mask_bias, prune_hard, prune_soft, split
from .vit import vit_tiny


def keep_counts_for(patches: int, stages: int, keep_ratio: float | Sequence[float]) -> list[int]:
    """Patch tokens kept after each stage: ``round(ratio * previous)``, at least 1."""
    ratios = [keep_ratio] * stages if isinstance(keep_ratio, (int, float)) else list(keep_ratio)
    if len(ratios) != stages or not all(0 < float(r) <= 1 for r in ratios):
        raise ValueError(f"keep_ratio must be one number in (0, 1] or {stages} of them (one per "
                         f"pruning stage), got {keep_ratio!r}")
    counts, count = [], patches
    for ratio in ratios:
        count = max(1, round(float(ratio) * count))
        counts.append(count)
    return counts


def masked_block(block: nn.Module, x: Tensor, alive: Tensor) -> Tensor:
    """A pre-LN block (``norm1, attn, norm2, mlp``) whose attention ignores pruned keys."""
    attn = getattr(block, "attn", None)
    if not (isinstance(attn, nn.MultiheadAttention) and attn.batch_first
            and all(hasattr(block, name) for name in ("norm1", "norm2", "mlp"))):
        raise ValueError(f"token pruning in training mode needs pre-LN blocks with norm1, attn "
                         f"(nn.MultiheadAttention, batch_first=True), norm2 and mlp; got "
                         f"{type(block).__name__} (inference works with any block)")
    h = block.norm1(x)
    mask = keep_mask_bias(alive, attn.num_heads).to(h.dtype)
    x = x + attn(h, h, h, attn_mask=mask, need_weights=False)[0]
    return x + block.mlp(block.norm2(x))


class TokenPruningViT(nn.Module):
    """SPViT around ``backbone``; see the module docstring."""

    def __init__(self, backbone: nn.Module, *, dim: int, heads: int, patches: int,
                 prune_at: Sequence[int], keep_ratio: float | Sequence[float] = 0.7,
                 ratio_weight: float = 2.0, tau: float = 1.0,
                 selector_hidden: int | None = None) -> None:
        super().__init__()
        for member in ("tokens", "blocks", "classify"):
            if not hasattr(backbone, member):
                raise ValueError(f"TokenPruningViT: the backbone {type(backbone).__name__} has "
                                 f"no {member!r}; it needs tokens(images), blocks and "
                                 "classify(sequence)")
        depth = len(backbone.blocks)
        stages = sorted(set(int(i) for i in prune_at))
        if not stages or stages[0] < 1 or stages[-1] >= depth or len(stages) != len(prune_at):
            raise ValueError(f"prune_at must be distinct block indices in 1..{depth - 1} "
                             f"(the first block always sees every token), got {prune_at!r}")
        if tau <= 0 or ratio_weight < 0:
            raise ValueError(f"tau must be > 0 and ratio_weight >= 0, got tau={tau}, "
                             f"ratio_weight={ratio_weight}")
        self.backbone = backbone
        self.prune_at = tuple(stages)
        self.patches = patches
        self.keep_counts = keep_counts_for(patches, len(stages), keep_ratio)
        self.ratio_weight = float(ratio_weight)
        self.tau = float(tau)
        self.selectors = nn.ModuleList(TokenSelector(dim, heads, selector_hidden)
                                       for _ in stages)
        self.register_buffer("stage_weights", self._stage_weights(dim), persistent=False)
        self.register_buffer("stage_targets", torch.tensor(
            [k / patches for k in self.keep_counts]), persistent=False)
        self._kept: Tensor | None = None

    def _stage_weights(self, dim: int) -> Tensor:
        """Share of the (unpruned) blocks' MACs after each selector, by nmsparse.summary."""
        probe = torch.zeros(1, 1 + self.patches, dim)
        param = next(self.backbone.parameters(), None)
        if param is not None:
            probe = probe.to(param.device)
        macs = [summary(block, probe).total.macs_dense for block in self.backbone.blocks]
        ends = [*self.prune_at[1:], len(macs)]
        shares = torch.tensor([float(sum(macs[a:b])) for a, b in zip(self.prune_at, ends,
                                                                       strict=True)])
        return shares / shares.sum()

    def forward(self, images: Tensor) -> Tensor:
        x = self.backbone.tokens(images)
        alive: Tensor | None = None
        mass: Tensor | None = None
        kept: list[Tensor] = []
        for index, block in enumerate(self.backbone.blocks):
            if index in self.prune_at:
                stage = self.prune_at.index(index)
                x, alive, mass = self._prune(stage, x, alive, mass, has_package=stage > 0)
                if alive is not None:
                    kept.append(alive[:, 1:-1].sum(1) / self.patches)
            x = masked_block(block, x, alive) if alive is not None else block(x)
        logits = self.backbone.classify(x)
        if not kept:
            self._kept = None
            return logits
        fractions = torch.stack(kept, dim=1)
        self._kept = fractions.detach()
        return with_auxiliary(logits, self._ratio_loss(fractions))

    def _prune(self, stage: int, x: Tensor, alive: Tensor | None, mass: Tensor | None,
               has_package: bool) -> tuple[Tensor, Tensor | None, Tensor]:
        _, candidates, _ = split(x, has_package)
        selector = self.selectors[stage]
        if not self.training:
            ones = candidates.new_ones(candidates.shape[:2])
            scores = torch.softmax(selector(candidates, ones), dim=-1)[..., 0]
            x, mass = prune_hard(x, scores, self.keep_counts[stage], has_package, mass)
            return x, None, mass
        if alive is None:
            alive = x.new_ones(x.shape[:2])
        logits = selector(candidates, alive[:, 1:1 + candidates.shape[1]])
        return prune_soft(x, alive, logits, self.tau, has_package, mass)

    def kept_fractions(self) -> Tensor | None:
        """``(batch, stages)`` kept patch-token fractions of the last training forward."""
        return self._kept

    def _ratio_loss(self, kept: Tensor) -> Tensor:
        gaps = (kept - self.stage_targets).pow(2).mean(0)
        return self.ratio_weight * (self.stage_weights * gaps).sum()

    def ratio_loss(self) -> Tensor:
        """The computation-aware ratio loss of the last training forward (0 otherwise), a
        value without gradient: its gradient already flows through the forward's output."""
        if self._kept is None:
            return self.stage_targets.new_zeros(())
        return self._ratio_loss(self._kept)

    def auxiliary_loss(self) -> Tensor:
        return self.ratio_loss()


@register_model("spvit_tiny", description="vit_tiny with SPViT token pruning (selectors "
                "before blocks prune_at, package token, keep_ratio per stage)",
                tasks=("classification",),
                smoke_options={"dim": 32, "depth": 3, "heads": 2, "prune_at": (1, 2)})
def spvit_tiny(*, input_shape: tuple[int, ...], num_classes: int, patch_size: int | None = None,
               dim: int = 192, depth: int = 6, heads: int = 3, mlp_ratio: float = 4.0,
               prune_at: Sequence[int] = (2, 4), keep_ratio: float | Sequence[float] = 0.7,
               ratio_weight: float = 2.0, tau: float = 1.0) -> TokenPruningViT:
    name = "spvit_tiny"
    backbone = vit_tiny(input_shape=input_shape, num_classes=num_classes, patch_size=patch_size,
                        dim=dim, depth=depth, heads=heads, mlp_ratio=mlp_ratio)
    prune_at = _checks.int_sequence(name, "prune_at", prune_at)
    ratio_weight = _checks.positive_float(name, "ratio_weight", ratio_weight)
    tau = _checks.positive_float(name, "tau", tau)
    try:
        return TokenPruningViT(backbone, dim=dim, heads=heads,
                               patches=backbone.pos_embed.shape[1] - 1, prune_at=prune_at,
                               keep_ratio=keep_ratio, ratio_weight=ratio_weight, tau=tau)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from error
