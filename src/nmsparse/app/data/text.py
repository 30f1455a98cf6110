"""``text``: byte-level language modelling (vocabulary = the 256 byte values, no tokenizer).

Corpus: ``text_file``, either one file (any name) or a folder whose ``*.txt``, ``*.py`` and
``*.md`` files are read recursively in sorted order of their relative paths (hidden folders,
``__pycache__``, ``site-packages`` and ``dist-packages`` skipped), concatenated as they are.
Without ``text_file``: this Python's own standard library sources
(``sysconfig.get_paths()["stdlib"]``, ``*.py``, same order and skips, so no installed
package creeps in), capped at the first 8 MiB so that loading takes well under a second; that
corpus differs between Python versions, and the description says which was used.

Split: the last 10 % of the bytes is the test set, the first 90 % the training set. A sample is
``x = bytes[o : o + seq_len]``, ``y = bytes[o + 1 : o + seq_len + 1]`` (int64). Each split has
``(bytes - 1) // seq_len`` samples, at offsets ``i * seq_len``; training augmentation jitters
each start by a random 0..seq_len-1 bytes (see
:class:`~nmsparse.app.data.tensors.ByteSequenceDataset`), the test windows are fixed and
non-overlapping.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import torch

from ._base import DataBundle, DataError
from ._registry import LoadOptions, register
from .tensors import ByteSequenceDataset

SUFFIXES = frozenset({".txt", ".py", ".md"})
SKIP_DIRS = frozenset({"__pycache__", "site-packages", "dist-packages"})
STDLIB_CAP = 8 * 2**20
TEST_FRACTION = 10  # the last 1/10 of the bytes


def collect_files(root: Path, suffixes: frozenset[str] = SUFFIXES) -> list[Path]:
    """Files under ``root`` with one of ``suffixes``, sorted by their path relative to it."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in SKIP_DIRS]
        found.extend(
            Path(dirpath, f) for f in filenames
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in suffixes
        )
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def read_corpus(paths: list[Path], cap: int | None = None) -> tuple[bytes, int]:
    """Concatenated contents (the first ``cap`` bytes when capped) and how many files it used."""
    chunks: list[bytes] = []
    size = used = 0
    for path in paths:
        if cap is not None and size >= cap:
            break
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DataError(f"text: cannot read {path}: {exc.strerror or exc}") from exc
        if cap is not None:
            data = data[: cap - size]
        chunks.append(data)
        size += len(data)
        used += 1
    return b"".join(chunks), used


def _source(text_file: Path | None) -> tuple[bytes, str]:
    if text_file is None:
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        corpus, used = read_corpus(collect_files(stdlib, frozenset({".py"})), STDLIB_CAP)
        return corpus, f"Python stdlib sources in {stdlib} ({used} files, first 8 MiB)"
    if text_file.is_file():
        corpus, _ = read_corpus([text_file])
        return corpus, str(text_file)
    if text_file.is_dir():
        paths = collect_files(text_file)
        if not paths:
            raise DataError(
                f"text: no *.txt, *.py or *.md files under {text_file}; expected a text file or a "
                "folder holding some"
            )
        corpus, used = read_corpus(paths)
        return corpus, f"{text_file} ({used} files)"
    if text_file.exists():  # a device (/dev/zero), a pipe or a socket: never read
        raise DataError(f"text: text_file {text_file} is not a regular file or a folder (a "
                        "device, pipe or socket); expected a text file or a folder of *.txt, "
                        "*.py or *.md files")
    raise DataError(
        f"text: text_file {text_file} does not exist; expected a text file or a folder of "
        "*.txt, *.py or *.md files"
    )


@register(
    "text",
    "byte-level language modelling on text_file (a file or folder of *.txt/*.py/*.md; default: "
    "the first 8 MiB of Python's stdlib sources), vocab 256",
    takes=("text_file",),
)
def load_text(opts: LoadOptions) -> DataBundle:
    corpus, source = _source(opts.text_file)
    seq_len = opts.seq_len
    if not corpus:
        raise DataError(f"text: the corpus {source} is empty; expected some text")
    n_test = len(corpus) // TEST_FRACTION
    if n_test < seq_len + 1:
        raise DataError(
            f"text: the corpus {source} has {len(corpus)} bytes, too few for seq_len {seq_len}: "
            f"its last 10 % (the test split) must hold one window of seq_len + 1 bytes, so at "
            f"least {TEST_FRACTION * (seq_len + 1)} bytes are needed (or a smaller seq_len)"
        )
    data = torch.frombuffer(bytearray(corpus), dtype=torch.uint8)  # bytearray: writable memory
    n_train = len(corpus) - n_test
    train = ByteSequenceDataset(data[:n_train], seq_len, jitter=opts.augment)
    test = ByteSequenceDataset(data[n_train:], seq_len, jitter=False)
    return DataBundle(
        name="text",
        task="language_model",
        train=train,
        test=test,
        input_shape=(seq_len,),
        num_classes=256,
        description=(
            f"text: {source}, {len(corpus)} bytes: {n_train} train / {n_test} test bytes = "
            f"{len(train)} / {len(test)} windows of {seq_len}, vocab 256"
        ),
    )
