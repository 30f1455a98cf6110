"""Byte-level decoder-only transformers (GPT-2 layout): ``gpt_tiny`` and the ``gpt_1b`` preset.

Token + learned position embedding, ``n_layer`` pre-LayerNorm blocks (causal self-attention
with one ``nn.Linear(d, 3d)`` for q, k, v, ``scaled_dot_product_attention(is_causal=True)``
and an ``nn.Linear(d, d)`` output projection; an MLP ``Linear(d, 4d)`` -> GELU ->
``Linear(4d, d)``), a final LayerNorm and an ``lm_head = Linear(d, vocab, bias=False)``.
Every projection is an ``nn.Linear``, so ``nmsparse.sparsify`` makes all of them N:M.

The vocabulary size is ``num_classes`` (256 for bytes) and the maximum sequence length is
``input_shape[0]``: longer inputs raise ``ValueError``, shorter ones are fine. Inputs are
int64 ids shaped (batch, seq_len); outputs are logits (batch, seq_len, vocab).

Decoding: ``model.decoder(max_len)`` returns a :class:`StaticKVDecoder`, greedy decoding one
token per step with a key/value cache of fixed size (``decoder.generate(steps, token)``, or
``decoder.step()`` per token). Every tensor it touches keeps its shape and address, so a step
can be captured in a CUDA graph; it calls the model's own modules, so it decodes through
whatever its ``nn.Linear`` layers were swapped for (``nmsparse.kernels``).

Init (GPT-2): normal(0, 0.02) for linear and embedding weights, zero biases, and std
0.02 / sqrt(2 * n_layer) for the two projections that write into the residual stream, so its
variance does not grow with depth.

``gpt_1b`` needs about 4.8 GB of float32 weights: build it where it will run, e.g. inside
``with torch.device("cuda"):``, or on ``torch.device("meta")`` to inspect it for free.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _checks
from ._registry import register_model


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.n_head = n_head
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, d_model = x.shape
        # (batch, length, 3d) -> three (batch, heads, length, head_dim)
        q, k, v = (t.view(batch, length, self.n_head, d_model // self.n_head).transpose(1, 2)
                   for t in self.qkv(x).split(d_model, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(batch, length, d_model)
        return self.resid_dropout(self.proj(y))

    def forward_cached(self, x: Tensor, keys: Tensor, values: Tensor, pos: Tensor,
                       visible: Tensor) -> Tensor:
        """One new token per row, ``x`` (batch, 1, d): writes its key and value into the caches
        ``(batch, heads, max_len, head_dim)`` at position ``pos`` (a 1-element tensor) and
        attends to the positions where ``visible`` (broadcast to the scores) is True."""
        batch, _, d_model = x.shape
        q, k, v = (t.reshape(batch, 1, self.n_head, d_model // self.n_head).transpose(1, 2)
                   for t in self.qkv(x).split(d_model, dim=2))
        keys.index_copy_(2, pos, k)
        values.index_copy_(2, pos, v)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(batch, 1, d_model)))


class MLP(nn.Module):
    def __init__(self, d_model: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.act = nn.GELU()
        self.proj = nn.Linear(4 * d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.proj(self.act(self.fc(x))))


class Block(nn.Module):
    def __init__(self, d_model: int, n_head: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))

    def forward_cached(self, x: Tensor, keys: Tensor, values: Tensor, pos: Tensor,
                       visible: Tensor) -> Tensor:
        """:meth:`forward` for one new token with this block's key/value caches."""
        x = x + self.attn.forward_cached(self.ln1(x), keys, values, pos, visible)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size: int, max_seq_len: int, n_layer: int, n_head: int,
                 d_model: int, dropout: float = 0.0, tie_weights: bool = False) -> None:
        super().__init__()
        self.max_seq_len = max_seq_len
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(max_seq_len, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self._init_weights(n_layer)
        if tie_weights:
            # Off by default: nmsparse makes the lm_head (an nn.Linear) N:M sparse but not the
            # embedding, so with one shared Parameter it is ambiguous whether the input lookup
            # should read the masked or the dense weights, and the SR-STE decay on the pruned
            # entries would also pull the embedding rows toward zero.
            self.lm_head.weight = self.tok_emb.weight

    def _init_weights(self, n_layer: int) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp.proj):
                nn.init.normal_(proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    def forward(self, idx: Tensor) -> Tensor:
        if idx.dim() != 2:
            raise ValueError(f"GPT takes token ids shaped (batch, seq_len), got a tensor shaped "
                             f"{tuple(idx.shape)}")
        length = idx.shape[1]
        if length > self.max_seq_len:
            raise ValueError(f"sequence length {length} exceeds the model's maximum "
                             f"{self.max_seq_len} (input_shape[0] at creation)")
        positions = torch.arange(length, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(positions))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def decoder(self, max_len: int, batch: int = 1) -> StaticKVDecoder:
        """A greedy decoder with a static key/value cache of ``max_len`` positions."""
        return StaticKVDecoder(self, max_len, batch)


class StaticKVDecoder:
    """Greedy decoding of a :class:`GPT` with a static key/value cache.

    Each :meth:`step` feeds the current token of every row (``batch`` rows, one position
    shared by all) through every block: keys and values go into caches preallocated for
    ``max_len`` positions, and attention covers positions ``<= pos`` through a mask. So every
    tensor keeps its shape and address and one step can be captured in a CUDA graph; the
    argmax token and the position advance on the model's device without a host sync. The
    caches take the dtype and device of the token embedding. Call in eval mode, under
    ``torch.no_grad()``; the model's weights are used as they are at each step.
    """

    def __init__(self, model: GPT, max_len: int, batch: int = 1) -> None:
        if not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len must be a positive int, got {max_len!r}")
        if max_len > model.max_seq_len:
            raise ValueError(f"max_len {max_len} exceeds the model's maximum sequence length "
                             f"{model.max_seq_len}")
        if not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        self.model = model
        self.max_len = max_len
        self.batch = batch
        n_head = model.blocks[0].attn.n_head
        d_model = model.tok_emb.embedding_dim
        weight = model.tok_emb.weight
        shape = (len(model.blocks), batch, n_head, max_len, d_model // n_head)
        self.keys = torch.zeros(shape, device=weight.device, dtype=weight.dtype)
        self.values = torch.zeros_like(self.keys)
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=weight.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=weight.device)
        self.tokens = torch.zeros(batch, max_len, dtype=torch.long, device=weight.device)
        self.positions = torch.arange(max_len, device=weight.device)

    def reset(self, token: int | Tensor = 0) -> None:
        """Back to position 0 with ``token`` (an int, or one id per row) as the first input;
        in place, so a captured graph stays valid."""
        self.keys.zero_()
        self.values.zero_()
        self.tokens.zero_()
        self.pos.zero_()
        if isinstance(token, Tensor):
            self.token.copy_(token.reshape(self.batch, 1))
        else:
            self.token.fill_(token)

    def step(self) -> Tensor:
        """Feed the current tokens at the current position; returns the logits
        ``(batch, vocab)`` and makes their argmax the next tokens. At most ``max_len`` steps
        after a :meth:`reset`: the position is not checked on the host (that would sync)."""
        model = self.model
        x = model.tok_emb(self.token) + model.pos_emb(self.pos)  # (batch, 1, d)
        visible = (self.positions <= self.pos).view(1, 1, 1, self.max_len)
        for i, block in enumerate(model.blocks):
            x = block.forward_cached(x, self.keys[i], self.values[i], self.pos, visible)
        logits = model.lm_head(model.ln_f(x))[:, -1]
        next_token = logits.argmax(-1)
        self.tokens.index_copy_(1, self.pos, next_token.view(self.batch, 1))
        self.token.copy_(next_token.view(self.batch, 1))
        self.pos.add_(1)
        return logits

    def generate(self, steps: int, token: int | Tensor = 0) -> list[list[int]]:
        """Eager greedy decoding from ``token``: per row, the ``steps`` tokens produced."""
        if not isinstance(steps, int) or not 1 <= steps <= self.max_len:
            raise ValueError(f"steps must be an int in 1..{self.max_len} (the cache size), "
                             f"got {steps!r}")
        self.reset(token)
        with torch.no_grad():
            for _ in range(steps):
                self.step()
        return self.tokens[:, :steps].tolist()


def gpt_param_count(*, n_layer: int, d_model: int, vocab_size: int = 256,
                    max_seq_len: int = 1024, tie_weights: bool = False) -> int:
    """Parameters of :class:`GPT`, computed without building it.

    Per block: two LayerNorms (4d), qkv (3d^2 + 3d), attention output (d^2 + d), MLP
    (4d^2 + 4d and 4d^2 + d): 12d^2 + 13d. Plus token and position embeddings, the final
    LayerNorm and the bias-free head (shared with the token embedding when tied).
    """
    d = d_model
    blocks = n_layer * (12 * d * d + 13 * d)
    head = 0 if tie_weights else vocab_size * d
    return vocab_size * d + max_seq_len * d + blocks + 2 * d + head


def _build(name: str, input_shape: tuple[int, ...], num_classes: int, n_layer: int,
           n_head: int, d_model: int, dropout: float, tie_weights: bool) -> GPT:
    if len(input_shape) != 1:
        raise ValueError(f"{name} takes token sequences: input_shape must be (seq_len,), got "
                         f"{tuple(input_shape)}")
    n_layer = _checks.positive_int(name, "n_layer", n_layer)
    n_head = _checks.positive_int(name, "n_head", n_head)
    d_model = _checks.positive_int(name, "d_model", d_model)
    dropout = _checks.probability(name, "dropout", dropout)
    tie_weights = _checks.boolean(name, "tie_weights", tie_weights)
    if d_model % n_head:
        raise ValueError(f"{name}: d_model={d_model} is not divisible by n_head={n_head}")
    return GPT(num_classes, input_shape[0], n_layer, n_head, d_model, dropout, tie_weights)


@register_model("gpt_tiny", description="byte-level GPT, 4 layers, 4 heads, d_model 256 "
                "(3.3M params at seq_len 256)", tasks=("language_model",),
                smoke_options={"n_layer": 2, "n_head": 2, "d_model": 32})
def gpt_tiny(*, input_shape: tuple[int, ...], num_classes: int, n_layer: int = 4,
             n_head: int = 4, d_model: int = 256, dropout: float = 0.0,
             tie_weights: bool = False) -> GPT:
    return _build("gpt_tiny", input_shape, num_classes, n_layer, n_head, d_model, dropout,
                  tie_weights)


@register_model("gpt_1b", description="~1.2B params (d_model 2048, 24 layers, 16 heads) for "
                "GPU benchmarks", tasks=("language_model",), large=True)
def gpt_1b(*, input_shape: tuple[int, ...], num_classes: int, n_layer: int = 24,
           n_head: int = 16, d_model: int = 2048, dropout: float = 0.0,
           tie_weights: bool = False) -> GPT:
    return _build("gpt_1b", input_shape, num_classes, n_layer, n_head, d_model, dropout,
                  tie_weights)
