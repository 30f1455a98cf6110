"""fashion-mnist: IDX parsing (plain and gzipped), file lookup, every error path, augmentation,
and the real files when this machine has them."""

from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import idx_bytes, write_fashion

from nmsparse.app.data import DataError, load_dataset
from nmsparse.app.data.idx import parse_idx

REAL_DIR = Path("/usr/share/datasets/fashion-mnist")
@pytest.mark.parametrize("gz", [True, False, "mixed"])
def test_loads_tiny_idx_files(tmp_path, gz):
    write_fashion(tmp_path, gz=gz)
    data = load_dataset("fashion-mnist", data_dir=str(tmp_path))
    assert (data.name, data.task, data.input_shape, data.num_classes) == (
        "fashion-mnist", "classification", (1, 28, 28), 10)
    assert (len(data.train), len(data.test)) == (24, 10)
    assert data.description == "Fashion-MNIST: 24 train / 10 test, 1x28x28, 10 classes"
    x, y = data.test[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y.item() == 3
    raw = data.test.images[3].float() / 255
    torch.testing.assert_close(x, (raw - 0.2860) / 0.3530)


def test_torchvision_layout_is_found(tmp_path):
    write_fashion(tmp_path / "FashionMNIST" / "raw")
    assert len(load_dataset("fashion-mnist", data_dir=tmp_path).train) == 24


def test_augmentation_keeps_shape_and_test_is_deterministic(tmp_path):
    write_fashion(tmp_path)
    data = load_dataset("fashion-mnist", data_dir=str(tmp_path))
    idx = torch.arange(24)
    g = torch.Generator().manual_seed(1)
    x, y = data.train.get_batch(idx, generator=g)
    assert x.shape == (24, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    plain = data.train.normalize(data.train.images)
    assert not torch.equal(x, plain)  # some crop moved or flipped an image
    x2, _ = data.train.get_batch(idx, generator=torch.Generator().manual_seed(1))
    assert torch.equal(x, x2)  # same generator seed, same augmentation
    t1, t2 = data.test.get_batch(torch.arange(10)), data.test.get_batch(torch.arange(10))
    assert torch.equal(t1[0], t2[0])
    assert torch.equal(torch.stack([data.test[i][0] for i in range(10)]), t1[0])
    single, label = data.train[5]
    assert single.shape == (1, 28, 28) and label.shape == ()


def test_augment_false_leaves_train_plain(tmp_path):
    write_fashion(tmp_path)
    data = load_dataset("fashion-mnist", data_dir=str(tmp_path), augment=False)
    x, _ = data.train.get_batch(torch.arange(24), generator=torch.Generator().manual_seed(1))
    assert torch.equal(x, data.train.normalize(data.train.images))


def test_missing_directory(tmp_path):
    with pytest.raises(DataError, match=r"data directory .*nowhere does not exist; expected a "
                       r"folder holding train-images-idx3-ubyte.*apt-get install "
                       r"dataset-fashion-mnist"):
        load_dataset("fashion-mnist", data_dir=str(tmp_path / "nowhere"))


def test_no_files(tmp_path):
    with pytest.raises(DataError, match=r"no IDX files in .*; expected train-images-idx3-ubyte, "
                       r"train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte "
                       r"\(gzipped or not\).*apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", data_dir=str(tmp_path))


def test_missing_one_file(tmp_path):
    files = write_fashion(tmp_path)
    files["test_labels"].unlink()
    with pytest.raises(DataError, match=r"lacks t10k-labels-idx1-ubyte; expected all of"):
        load_dataset("fashion-mnist", data_dir=str(tmp_path))


def test_truncated_file(tmp_path):
    files = write_fashion(tmp_path, gz=False)
    path = files["train_images"]
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: truncated IDX file: \d+ bytes, "
                       r"expected \d+ for shape 24x28x28 of uint8"):
        load_dataset("fashion-mnist", data_dir=str(tmp_path))


def test_truncated_gzip(tmp_path):
    files = write_fashion(tmp_path, gz=True)
    path = files["test_images"]
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz: corrupted or truncated gzip"):
        load_dataset("fashion-mnist", data_dir=str(tmp_path))


def test_bad_magic(tmp_path):
    files = write_fashion(tmp_path, gz=False)
    path = files["train_labels"]
    path.write_bytes(b"\x12\x34" + path.read_bytes()[2:])
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte: not an IDX file: magic number "
                       r"0x12340801; expected 0x0000"):
        load_dataset("fashion-mnist", data_dir=str(tmp_path))


def test_wrong_kind_of_idx(tmp_path):
    files = write_fashion(tmp_path, gz=False)
    files["train_labels"].write_bytes(idx_bytes(np.zeros((24, 2), np.uint8)))
    with pytest.raises(DataError, match=r"expected uint8 labels of shape \(N,\), got uint8 with "
                       r"shape \(24, 2\)"):
        load_dataset("fashion-mnist", data_dir=str(tmp_path))


def test_count_mismatch_and_label_range(tmp_path):
    files = write_fashion(tmp_path, gz=False)
    files["test_labels"].write_bytes(idx_bytes(np.zeros(9, np.uint8)))
    with pytest.raises(DataError, match="holds 10 images but t10k-labels-idx1-ubyte holds 9"):
        load_dataset("fashion-mnist", data_dir=str(tmp_path))
    files["test_labels"].write_bytes(idx_bytes(np.full(10, 12, np.uint8)))
    with pytest.raises(DataError, match=r"label 12 out of range; expected 0..9"):
        load_dataset("fashion-mnist", data_dir=str(tmp_path))


def test_parse_idx_errors_and_types():
    with pytest.raises(DataError, match="shorter than its 4-byte magic"):
        parse_idx(b"\x00\x00")
    with pytest.raises(DataError, match="shorter than its 12-byte header"):
        parse_idx(b"\x00\x00\x08\x02\x00\x00")
    with pytest.raises(DataError, match=r"corrupted \(trailing bytes\) IDX file"):
        parse_idx(idx_bytes(np.zeros(3, np.uint8)) + b"x")
    ints = np.arange(6, dtype=">i4").reshape(2, 3)
    np.testing.assert_array_equal(parse_idx(idx_bytes(ints, 0x0C)), ints)


@pytest.mark.skipif(not REAL_DIR.is_dir(), reason="no Fashion-MNIST files on this machine")
def test_real_files():
    data = load_dataset("fashion-mnist")
    assert (len(data.train), len(data.test)) == (60000, 10000)
    assert data.input_shape == (1, 28, 28) and data.num_classes == 10
    assert data.train.images.dtype == torch.uint8
    x, y = data.train.get_batch(torch.arange(256))
    assert x.shape == (256, 1, 28, 28) and y.shape == (256,)
    assert torch.bincount(data.test.labels, minlength=10).tolist() == [1000] * 10
