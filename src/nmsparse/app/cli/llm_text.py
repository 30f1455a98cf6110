"""Text for a Hugging Face causal LM: the corpus, its split, the tokenizer, calibration.

* **Corpus**: ``--text-file`` read as ``nmsparse train --data text`` reads it (one file, or the
  ``*.txt`` / ``*.py`` / ``*.md`` files of a folder, concatenated in sorted order).
* **Split**: as in ``--data text``, the last 10 % of the bytes is held out (moved forward to
  the next character boundary): calibration draws from the first 90 %, evaluation reads the
  last 10 % (or all of a file given for evaluation only, with ``--all-text``).
* **Tokenizer**: the folder's own (``AutoTokenizer``, local files only, no remote code), or,
  for a folder without tokenizer files, the byte-level fallback :class:`ByteTokenizer`
  (token id = byte value, so the model's vocabulary must hold at least 256 ids; what the
  project's byte-level models and a Llama config with ``vocab_size >= 256`` trained on bytes
  use). Text is encoded without special tokens.
* **Calibration**: ``count`` windows of ``seq_len`` tokens at offsets drawn uniformly with a
  fixed seed (``torch.Generator().manual_seed(seed)``), in batches.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

TEST_FRACTION = 10  # the last 1/10 of the bytes, as in nmsparse.app.data.text


def read_text(path: str | os.PathLike[str]) -> bytes:
    """The corpus at ``path`` (a file or a folder of text files); ``ValueError`` if empty."""
    from ..data.text import _source

    corpus, source = _source(Path(path))
    if not corpus:
        raise ValueError(f"the text {source} is empty")
    return corpus


def split(corpus: bytes) -> tuple[bytes, bytes]:
    """``(first 90 %, last 10 %)`` of the bytes, cut at a UTF-8 character boundary."""
    cut = len(corpus) - len(corpus) // TEST_FRACTION
    while cut < len(corpus) and 0x80 <= corpus[cut] < 0xC0:  # inside a multi-byte character
        cut += 1
    return corpus[:cut], corpus[cut:]


class ByteTokenizer:
    """Token id = byte value (0..255): the fallback for a folder without a tokenizer."""

    name = "bytes (fallback: the folder has no tokenizer)"

    def encode(self, data: bytes) -> torch.Tensor:
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def byte_count(self, ids) -> int:
        return len(ids)


class FolderTokenizer:
    """The folder's own tokenizer."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.name = type(tokenizer).__name__

    def encode(self, data: bytes) -> torch.Tensor:
        text = data.decode("utf-8", errors="replace")
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)

    def byte_count(self, ids) -> int:
        return len(self.decode(ids).encode("utf-8"))


def has_tokenizer(path: str | os.PathLike[str]) -> bool:
    return any((Path(path) / name).is_file() for name in ("tokenizer.json",
                                                          "tokenizer_config.json"))


def load_tokenizer(path: str | os.PathLike[str], vocab_size: int):
    """The folder's tokenizer, or :class:`ByteTokenizer` when it has none."""
    if not has_tokenizer(path):
        if vocab_size < 256:
            raise ValueError(f"{str(path)!r} has no tokenizer and its vocabulary ({vocab_size} "
                             "ids) is too small for the byte-level fallback (256 ids)")
        return ByteTokenizer()
    config_file = Path(path) / "tokenizer_config.json"
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError):
            config = {}
        if isinstance(config, dict) and "auto_map" in config:
            raise ValueError(f"{str(path)!r} ships a tokenizer with its own code (auto_map in "
                             "tokenizer_config.json); nmsparse never runs code a model folder "
                             "ships")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True,
                                              trust_remote_code=False)
    return FolderTokenizer(tokenizer)


def calibration_batches(ids: torch.Tensor, count: int, seq_len: int, batch_size: int,
                        seed: int) -> list[torch.Tensor]:
    """``count`` windows of ``seq_len`` tokens of ``ids`` at seeded random offsets, in
    batches of ``batch_size``."""
    if count < 1 or seq_len < 2 or batch_size < 1:
        raise ValueError(f"--calibration and --calibration-batch-size must be >= 1 and "
                         f"--seq-len >= 2, got {count}, {batch_size} and {seq_len}")
    if len(ids) < seq_len:
        raise ValueError(f"the calibration text (the first 90 % of --text-file) holds {len(ids)} "
                         f"tokens, fewer than one window of --seq-len {seq_len}: give more text "
                         "or a smaller --seq-len")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len + 1, (count,), generator=generator)
    windows = torch.stack([ids[int(s):int(s) + seq_len] for s in starts])
    return list(windows.split(batch_size))

