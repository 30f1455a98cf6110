"""The pieces of SPViT token pruning (Kong et al., ECCV 2022): a multi-head token selector and
the package token.

Token layout everywhere here: ``(batch, tokens, dim)`` with the class token first, then the
*candidates* (patch tokens that may still be pruned), then, once a selector has run, one
*package token* last. The class and package tokens are never scored or pruned.

* :class:`TokenSelector` scores each candidate per attention head (the head's slice of the
  token, normalised, through a small shared MLP that also sees the average of the still-kept
  candidates of that head) into keep/prune logits, and fuses the heads with a softmax
  weighting computed from the same features. Index 0 of the last dim is "keep".
* :func:`merge_package` folds tokens into the package token: the package is the average of
  every token folded in so far, each weighted by its weight (the selector's keep probability),
  so ``package = sum(w_i x_i) / sum(w_i)``; ``mass`` carries ``sum(w_i)`` from stage to stage.
* :func:`prune_hard` is the inference step: keep the ``keep`` highest-scoring candidates (in
  their original order) and fold the others into the package token, so the sequence really
  shrinks (and ``nmsparse.summary`` counts the shorter sequence).
* :func:`prune_soft` is the training step: a Gumbel-softmax hard decision with a
  straight-through gradient; nothing is removed, pruned tokens get ``alive = 0`` and later
  attention ignores them as keys (:func:`keep_mask_bias`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

MASS_EPS = 1e-6  # a package with no weight yet stays the zero vector instead of NaN
LOG_EPS = 1e-6   # log(alive + eps): a pruned key gets about -13.8 added to its logits


class TokenSelector(nn.Module):
    """Per-head keep/prune logits of candidate tokens, fused over heads.

    ``forward(candidates (B, n, dim), alive (B, n))`` returns logits ``(B, n, 2)``; ``alive``
    weights the tokens that enter the global (average) feature, so already pruned tokens do
    not steer the decision on the rest.
    """

    def __init__(self, dim: int, heads: int, hidden: int | None = None) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"TokenSelector: dim={dim} is not divisible by heads={heads}")
        head_dim = dim // heads
        hidden = hidden or max(4, head_dim // 2)
        self.heads = heads
        self.norm = nn.LayerNorm(head_dim)
        self.local = nn.Linear(head_dim, hidden)
        self.score = nn.Linear(2 * hidden, 2)       # keep / prune logits of one head
        self.head_weight = nn.Linear(2 * hidden, 1)  # how much this head counts in the fusion

    def forward(self, candidates: Tensor, alive: Tensor) -> Tensor:
        batch, count, dim = candidates.shape
        per_head = candidates.reshape(batch, count, self.heads, dim // self.heads)
        local = nn.functional.gelu(self.local(self.norm(per_head)))  # (B, n, H, hidden)
        weight = alive[:, :, None, None]
        pooled = (local * weight).sum(1, keepdim=True) / weight.sum(1, keepdim=True).clamp_min(
            MASS_EPS)
        features = torch.cat([local, pooled.expand_as(local)], dim=-1)
        head_logits = self.score(features)                                   # (B, n, H, 2)
        fusion = torch.softmax(self.head_weight(features).squeeze(-1), dim=-1)  # (B, n, H)
        return (head_logits * fusion[..., None]).sum(2)


def merge_package(tokens: Tensor, weights: Tensor, package: Tensor | None = None,
                  mass: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Fold ``tokens (B, n, D)`` with ``weights (B, n) >= 0`` into the package token.

    Returns ``(package (B, 1, D), mass (B,))``: the weighted average of the tokens and of the
    previous package (counted with its ``mass``). With zero total weight the package is 0.
    """
    summed = (weights[..., None] * tokens).sum(1)
    total = weights.sum(1)
    if package is not None:
        summed = summed + mass[:, None] * package[:, 0]
        total = total + mass
    return (summed / total.clamp_min(MASS_EPS)[:, None])[:, None], total


def split(x: Tensor, has_package: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(class token, candidates, package or None)`` of a sequence in the layout above."""
    end = x.shape[1] - 1 if has_package else x.shape[1]
    return x[:, :1], x[:, 1:end], x[:, end:] if has_package else None


def prune_hard(x: Tensor, keep_scores: Tensor, keep: int, has_package: bool,
               mass: Tensor | None) -> tuple[Tensor, Tensor]:
    """Keep the ``keep`` best candidates by ``keep_scores (B, n)``; fold the rest into the
    package. Returns the new sequence ``(B, 1 + keep + 1, D)`` and the package mass."""
    cls, candidates, package = split(x, has_package)
    if not 1 <= keep <= candidates.shape[1]:
        raise ValueError(f"prune_hard: keep={keep} must be between 1 and the number of "
                         f"candidates, {candidates.shape[1]}")
    index = keep_scores.topk(keep, dim=1).indices.sort(dim=1).values
    kept = candidates.gather(1, index[..., None].expand(-1, -1, candidates.shape[2]))
    pruned = torch.ones_like(keep_scores).scatter(1, index, 0.0)
    package, mass = merge_package(candidates, pruned * keep_scores, package, mass)
    return torch.cat([cls, kept, package], dim=1), mass


def prune_soft(x: Tensor, alive: Tensor, logits: Tensor, tau: float, has_package: bool,
               mass: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Training step: sample keep decisions with Gumbel-softmax (hard, straight-through).

    ``alive (B, T)`` is 1 for tokens still kept (class and package tokens always 1), 0 for
    pruned ones. Returns the sequence with the updated package token appended or replaced,
    its ``alive`` and the package mass.
    """
    cls, candidates, package = split(x, has_package)
    was_alive = alive[:, 1:1 + candidates.shape[1]]
    decision = nn.functional.gumbel_softmax(logits, tau=tau, hard=True)[..., 0]
    keep_scores = torch.softmax(logits, dim=-1)[..., 0]
    package, mass = merge_package(candidates, was_alive * (1 - decision) * keep_scores,
                                  package, mass)
    ones = alive.new_ones(alive.shape[0], 1)
    new_alive = torch.cat([ones, was_alive * decision, ones], dim=1)
    return torch.cat([cls, candidates, package], dim=1), new_alive, mass


def keep_mask_bias(alive: Tensor, heads: int) -> Tensor:
    """Float attention mask ``(B * heads, T, T)`` adding ``log(alive_j + eps)`` to the logits
    of key ``j``, so pruned keys get (almost) no attention while the gradient still reaches
    the straight-through decision; every token always sees itself, so no row is empty."""
    batch, length = alive.shape
    bias = torch.log(alive + LOG_EPS)[:, None, :].expand(batch, length, length)
    eye = torch.eye(length, dtype=torch.bool, device=alive.device)
    bias = torch.where(eye, torch.zeros((), dtype=bias.dtype, device=bias.device), bias)
    return bias.repeat_interleave(heads, dim=0)
