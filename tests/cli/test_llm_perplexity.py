"""Perplexity and bits per byte in fixed windows, on a model whose answer is known."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from nmsparse.app.cli.llm_text import ByteTokenizer, calibration_batches, split
from nmsparse.hf.perplexity import perplexity, window_starts


class Uniform(nn.Module):
    """Equal logits over ``vocab`` ids: every token costs ln(vocab) nats; records its inputs."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.scale = nn.Parameter(torch.ones(()))
        self.seen = []

    def forward(self, input_ids, use_cache=False):
        self.seen.append(input_ids.clone())
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab) * self.scale)


class Step(nn.Module):
    """Predicts the next id is this one + 1 or + 2, each with probability 1/2."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, use_cache=False):
        logits = torch.full((*input_ids.shape, self.vocab), -math.inf)
        for step in (1, 2):
            logits.scatter_(2, ((input_ids + step) % self.vocab).unsqueeze(2), 0.0)
        return SimpleNamespace(logits=logits)


def test_uniform_model_has_perplexity_vocab_and_eight_bits_per_byte():
    ids = torch.arange(100) % 256
    result = perplexity(Uniform(256), ids, window=10, stride=10,
                        byte_count=ByteTokenizer().byte_count)
    assert result.windows == 10 and result.tokens == 10 * 9  # each window's first is context
    assert result.perplexity == pytest.approx(256)
    assert result.bits_per_byte == pytest.approx(8.0)


def test_overlapping_windows_score_every_token_once():
    ids = torch.arange(50)
    model = Uniform(64)
    result = perplexity(model, ids, window=20, stride=5, byte_count=len, batch_size=3)
    assert window_starts(50, 20, 5) == [0, 5, 10, 15, 20, 25, 30]
    assert result.tokens == 19 + 6 * 5 == 49  # tokens 1..49, each once
    assert result.bytes == 49
    assert [tuple(x.shape) for x in model.seen] == [(3, 20), (3, 20), (1, 20)]


def test_losses_are_read_at_the_scored_positions():
    # Step costs ln 2 where the next id is 1 or 2 above the current one, infinity elsewhere
    # (also for a target read one position off): this sequence has perplexity exactly 2.
    ids = torch.tensor([0, 1, 3, 4, 5, 7, 9, 10, 12, 13, 14, 16, 18, 19, 20, 22])
    result = perplexity(Step(32), ids, window=6, stride=3, byte_count=len)
    assert result.perplexity == pytest.approx(2.0)
    assert result.bits_per_byte == pytest.approx(1.0)


def test_text_shorter_than_a_window_is_refused():
    with pytest.raises(ValueError, match="holds 5 tokens, fewer than one window of 8"):
        perplexity(Uniform(8), torch.arange(5), window=8, stride=8, byte_count=len)
    with pytest.raises(ValueError, match="stride"):
        window_starts(100, 8, 9)


def test_split_keeps_the_last_tenth_whole_characters():
    corpus = ("a" * 89 + "é" * 6).encode()  # 101 bytes; the cut falls inside a character
    train, test = split(corpus)
    assert train + test == corpus and len(test) in (9, 10)
    test.decode("utf-8")  # no broken character


def test_calibration_windows_are_seeded():
    ids = torch.arange(1000)
    first = calibration_batches(ids, 5, 16, 2, seed=7)
    again = calibration_batches(ids, 5, 16, 2, seed=7)
    other = calibration_batches(ids, 5, 16, 2, seed=8)
    assert [tuple(b.shape) for b in first] == [(2, 16), (2, 16), (1, 16)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    for batch in first:  # consecutive tokens of the text
        assert torch.all(batch[:, 1:] - batch[:, :-1] == 1)
