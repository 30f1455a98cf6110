"""Perplexity and bits per byte of a causal LM on a token sequence, in fixed windows.

Windows of ``window`` tokens start at ``0, stride, 2 * stride, ...`` while they fit in the
text (a shorter tail is not read, so every window sees the same amount of context). The first
window scores its tokens 2..window (each predicted from all tokens before it in the window);
every later window scores only the tokens no earlier window scored, its last ``stride`` ones,
with ``window - stride`` tokens of context before them (``stride == window``: disjoint
windows, the fastest, whose first token is context only; a smaller stride gives each scored
token more context). Then

* perplexity = ``exp(mean negative log-likelihood per scored token)`` (natural log),
* bits per byte = ``sum of the negative log-likelihoods / ln 2 / bytes of the scored tokens``
  (UTF-8 bytes of each window's scored run decoded), comparable between tokenizers.

Log-probabilities are taken in float32 whatever the model's dtype.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Perplexity:
    perplexity: float
    bits_per_byte: float
    tokens: int  # scored
    bytes: int  # of the scored text
    window: int
    stride: int
    windows: int

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (f"perplexity {self.perplexity:.4f}, {self.bits_per_byte:.4f} bits per byte "
                f"({self.tokens} tokens, {self.windows} windows of {self.window}, stride "
                f"{self.stride})")


def window_starts(length: int, window: int, stride: int) -> list[int]:
    if window < 2 or not 1 <= stride <= window:
        raise ValueError(f"--window must be >= 2 and 1 <= --stride <= --window, got window "
                         f"{window} and stride {stride}")
    if length < window:
        raise ValueError(f"the evaluation text holds {length} tokens, fewer than one window of "
                         f"{window}: give more text or a smaller --window")
    return list(range(0, length - window + 1, stride))


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, window: int, stride: int, *,
               byte_count, batch_size: int = 4) -> Perplexity:
    """Score the 1-D token ``ids`` (see the module docstring); ``byte_count(ids)`` gives the
    UTF-8 bytes of a token run."""
    starts = window_starts(len(ids), window, stride)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, scored, text_bytes = 0.0, 0, 0
    try:
        for first in range(0, len(starts), batch_size):
            chunk = starts[first:first + batch_size]
            inputs = torch.stack([ids[s:s + window] for s in chunk]).to(device)
            logits = model(input_ids=inputs, use_cache=False).logits[:, :-1].float()
            losses = F.cross_entropy(logits.transpose(1, 2), inputs[:, 1:], reduction="none")
            for row, start in enumerate(chunk):
                skip = 0 if start == 0 else max(0, window - stride - 1)  # scored before
                total += float(losses[row, skip:].sum())
                scored += window - 1 - skip
                text_bytes += byte_count(ids[start + 1 + skip:start + window])
    finally:
        model.train(was_training)
    return Perplexity(math.exp(total / scored), total / math.log(2) / max(text_bytes, 1),
                      scored, text_bytes, window, stride, len(starts))
