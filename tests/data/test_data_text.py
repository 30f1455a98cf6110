"""text: byte-level corpus from a file, a folder or the stdlib; windows, split, jitter, errors."""

import sysconfig
from pathlib import Path

import pytest
import torch

from nmsparse.app.data import DataError, load_dataset


def corpus_folder(root: Path) -> bytes:
    files = {
        "b.txt": b"bravo " * 100,
        "a/z.md": b"# zulu\n" * 50,
        "a/y.py": b"print('yankee')\n" * 40,
        "c.csv": b"ignored,by,extension\n" * 10,
        ".hidden/x.txt": b"hidden folder\n" * 10,
        "__pycache__/m.py": b"cache\n" * 10,
    }
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    # sorted by relative path: a/y.py, a/z.md, b.txt
    return files["a/y.py"] + files["a/z.md"] + files["b.txt"]


def all_windows(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    return dataset.get_batch(torch.arange(len(dataset)))


def test_folder_corpus_split_and_windows(tmp_path):
    expected = corpus_folder(tmp_path)
    data = load_dataset("text", text_file=str(tmp_path), seq_len=16, augment=False)
    assert (data.name, data.task, data.input_shape, data.num_classes) == (
        "text", "language_model", (16,), 256)
    n = len(expected)
    n_test = n // 10
    assert data.train.data.numel() == n - n_test and data.test.data.numel() == n_test
    assert bytes(data.train.data.tolist()) + bytes(data.test.data.tolist()) == expected
    assert len(data.train) == (n - n_test - 1) // 16 and len(data.test) == (n_test - 1) // 16
    assert f"{tmp_path} (3 files), {n} bytes" in data.description
    x, y = all_windows(data.test)
    assert x.dtype == torch.int64 and y.dtype == torch.int64 and x.shape == (len(data.test), 16)
    tail = expected[n - n_test:]
    for i in range(len(data.test)):  # non-overlapping windows, y = x shifted by one byte
        assert bytes(x[i].tolist()) == tail[i * 16 : i * 16 + 16]
        assert bytes(y[i].tolist()) == tail[i * 16 + 1 : i * 16 + 17]
    xi, yi = data.test[2]
    assert torch.equal(xi, x[2]) and torch.equal(yi, y[2])


def test_single_file_any_extension(tmp_path):
    path = tmp_path / "corpus.log"
    path.write_bytes(bytes(range(256)) * 4)
    data = load_dataset("text", text_file=path, seq_len=8)
    assert data.train.data.numel() + data.test.data.numel() == 1024


def test_train_jitter_is_random_but_consistent(tmp_path):
    corpus_folder(tmp_path)
    data = load_dataset("text", text_file=tmp_path, seq_len=16)
    idx = torch.arange(len(data.train))
    x1, y1 = data.train.get_batch(idx, generator=torch.Generator().manual_seed(0))
    x2, _ = data.train.get_batch(idx, generator=torch.Generator().manual_seed(0))
    x3, _ = data.train.get_batch(idx, generator=torch.Generator().manual_seed(1))
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # still a next-byte target
    text = bytes(data.train.data.tolist())
    for row in x1:  # every jittered window is a real span of the training bytes
        assert bytes(row.tolist()) in text
    x4, _ = data.test.get_batch(torch.arange(len(data.test)), generator=torch.Generator())
    assert torch.equal(x4, all_windows(data.test)[0])  # test never jitters


def test_default_corpus_is_the_stdlib(tmp_path):
    data = load_dataset("text", seq_len=64)
    assert sysconfig.get_paths()["stdlib"] in data.description
    total = data.train.data.numel() + data.test.data.numel()
    assert total == 8 * 2**20  # capped
    x, y = data.train[0]
    assert x.shape == (64,) and torch.equal(x[1:], y[:-1])


def test_errors(tmp_path):
    with pytest.raises(DataError, match=r"text_file .*missing.txt does not exist; expected a text "
                       r"file or a folder"):
        load_dataset("text", text_file=tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=r"the corpus .*empty.txt is empty; expected some text"):
        load_dataset("text", text_file=empty)
    small = tmp_path / "small.txt"
    small.write_bytes(b"x" * 100)
    with pytest.raises(DataError, match=r"has 100 bytes, too few for seq_len 128: .* at least 1290 "
                       r"bytes are needed"):
        load_dataset("text", text_file=small)
    assert len(load_dataset("text", text_file=small, seq_len=9).test) == 1
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"no \*.txt, \*.py or \*.md files under .*folder"):
        load_dataset("text", text_file=folder)
