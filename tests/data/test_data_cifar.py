"""cifar10 / cifar100: tiny pickled batches in the standard layout, the restricted unpickler
(a malicious pickle is refused without running anything), and every error path."""

import os
import pickle

import numpy as np
import pytest
import torch
from data_fixtures import batch, write_cifar10, write_cifar100

from nmsparse.app.data import DataError, load_dataset, safe_pickle


class SystemCall:
    """Pickles as a call of os.system: what a malicious dataset file would contain."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_from_folder_or_parent(tmp_path, protocol):
    folder = write_cifar10(tmp_path, protocol=protocol, str_keys=protocol == 5)
    for where in (folder, tmp_path):
        data = load_dataset("cifar10", data_dir=str(where))
        assert (data.name, data.input_shape, data.num_classes) == ("cifar10", (3, 32, 32), 10)
        assert (len(data.train), len(data.test)) == (40, 6)
        assert data.description == "CIFAR-10: 40 train / 6 test, 3x32x32, 10 classes"
    first = batch(8, 0)
    np.testing.assert_array_equal(
        data.train.images[:8].reshape(8, -1).numpy(), first[b"data"])
    assert data.train.labels[:8].tolist() == first[b"labels"]
    x, y = data.test[0]
    expected = (data.test.images[0].float() / 255 - torch.tensor([0.4914, 0.4822, 0.4465])
                .view(3, 1, 1)) / torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)
    torch.testing.assert_close(x, expected)
    assert data.train.classes[0] == "airplane"


def test_cifar100_with_meta(tmp_path):
    write_cifar100(tmp_path)
    data = load_dataset("cifar100", data_dir=tmp_path)
    assert (len(data.train), len(data.test), data.num_classes) == (12, 12, 100)
    assert data.train.classes[3] == "class03"


def test_augmentation_shape_dtype_and_determinism(tmp_path):
    write_cifar10(tmp_path)
    data = load_dataset("cifar10", data_dir=tmp_path)
    idx = torch.arange(40)
    a = data.train.get_batch(idx, generator=torch.Generator().manual_seed(3))
    b = data.train.get_batch(idx, generator=torch.Generator().manual_seed(3))
    c = data.train.get_batch(idx, generator=torch.Generator().manual_seed(4))
    assert a[0].shape == (40, 3, 32, 32) and a[0].dtype == torch.float32
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    assert torch.equal(a[1], c[1])
    t = data.test.get_batch(torch.arange(6))[0]
    assert torch.equal(t, data.test.get_batch(torch.arange(6))[0])


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(DataError, match=r"cifar10: data directory .*absent does not exist; "
                       r"expected the CIFAR-10 python batches \(data_batch_1, .*test_batch\)"
                       r".*kriz/cifar"):
        load_dataset("cifar10", data_dir=tmp_path / "absent")
    with pytest.raises(DataError, match=r"cifar100: no batches in .*; expected the CIFAR-100 "
                       r"python batches \(train, test\) in it or in its cifar-100-python/ "
                       r"folder"):
        load_dataset("cifar100", data_dir=tmp_path)
    folder = write_cifar10(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match=r"lacks data_batch_3; expected"):
        load_dataset("cifar10", data_dir=tmp_path)


@pytest.mark.parametrize(
    "damage", [lambda b: b[: len(b) // 2], lambda b: b"\x80\x05garbage" + b[10:], lambda b: b""]
)
def test_corrupted_pickle(tmp_path, damage):
    folder = write_cifar10(tmp_path)
    path = folder / "test_batch"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DataError, match=r"test_batch: corrupted pickle, not a CIFAR batch"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_malicious_pickle_is_refused_without_running(tmp_path):
    folder = write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    content = batch(8, 0)
    content[b"batch_label"] = SystemCall(f"touch {marker}")
    (folder / "data_batch_2").write_bytes(pickle.dumps(content, protocol=2))
    with pytest.raises(DataError, match=r"data_batch_2: refused to load: the pickle asks for "
                       r"posix.system; only dicts, lists, bytes, numbers and numpy arrays"):
        load_dataset("cifar10", data_dir=tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("module, name", [("builtins", "eval"), ("numpy", "load"),
                                          ("subprocess", "Popen"), ("torch", "load")])
def test_safe_pickle_refuses_other_globals(module, name):
    payload = f"c{module}\n{name}\n(S'1'\ntR.".encode()  # protocol 0: call module.name('1')
    with pytest.raises(safe_pickle.ForbiddenGlobal, match=f"global {module}.{name} is not allowed"):
        safe_pickle.loads(payload)


def test_safe_pickle_round_trips_data():
    value = {"a": [1, 2.5, b"x", "y"], b"arr": np.arange(12, dtype=np.int16).reshape(3, 4),
             "scalar": np.float32(1.5), "t": (None, True)}
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        back = safe_pickle.loads(pickle.dumps(value, protocol=protocol), encoding="ASCII")
        np.testing.assert_array_equal(back[b"arr"], value[b"arr"])
        assert back["a"] == value["a"] and back["scalar"] == 1.5 and back["t"] == (None, True)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ([1, 2], r"holds a list; expected a dict with b'data' \(uint8 N x 3072\) and b'labels'"),
        ({b"data": np.zeros((2, 3072), np.uint8)}, r"has keys b'data'; expected a dict"),
        ({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]},
         r"b'data' is uint8 \(2, 100\); expected a uint8 array N x 3072"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]},
         r"b'labels' must be 2 integers \(one per image\)"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]},
         r"labels range 0..10; expected 0..9"),
    ],
)
def test_wrong_content(tmp_path, content, message):
    folder = write_cifar10(tmp_path)
    (folder / "test_batch").write_bytes(pickle.dumps(content, protocol=2))
    with pytest.raises(DataError, match=message):
        load_dataset("cifar10", data_dir=tmp_path)
