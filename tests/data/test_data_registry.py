"""load_dataset / list_datasets: names, option checks, the bundled digits set, light import."""

import dataclasses
import subprocess
import sys

import pytest
import torch

from nmsparse.app.data import DataBundle, DataError, list_datasets, load_dataset

pytest.importorskip("sklearn")


def test_list_datasets_names_and_one_line_descriptions():
    names = list_datasets()
    assert set(names) >= {"digits", "fashion-mnist", "cifar10", "cifar100", "imagefolder", "text"}
    assert all(isinstance(d, str) and d and "\n" not in d for d in names.values())


def test_import_is_light():
    code = (
        "import sys, nmsparse.app.data; "
        "print(sorted(m for m in ('sklearn', 'PIL') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_digits_bundle():
    data = load_dataset("digits")
    assert isinstance(data, DataBundle)
    assert (data.name, data.task, data.input_shape, data.num_classes) == (
        "digits", "classification", (64,), 10)
    assert (len(data.train), len(data.test)) == (1437, 360)
    assert "1437 train / 360 test" in data.description
    x, y = data.train[0]
    assert x.shape == (64,) and x.dtype == torch.float32 and y.dtype == torch.int64
    xs, ys = data.train.get_batch(torch.arange(len(data.train)))
    # standardised with the training split's statistics
    assert xs.mean(0).abs().max() < 1e-5
    assert ((xs.std(0, unbiased=False) - 1).abs() < 1e-4).sum() >= 60  # all but blank pixels
    # stratified: every class in both splits, in about the same proportion
    counts = torch.bincount(data.test.get_batch(torch.arange(360))[1], minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    assert torch.bincount(ys, minlength=10).min() >= 135


def test_digits_split_is_fixed():
    a, b = load_dataset("digits", seed=0), load_dataset("digits", seed=5, augment=False)
    ia, ib = torch.arange(len(a.test)), torch.arange(len(b.test))
    assert torch.equal(a.test.get_batch(ia)[0], b.test.get_batch(ib)[0])
    assert torch.equal(a.train.get_batch(ia)[1], b.train.get_batch(ib)[1])


def test_names_are_normalised():
    assert load_dataset(" Digits ").name == "digits"
    with pytest.raises(DataError, match="unknown dataset 'mnist'; available: cifar10, cifar100"):
        load_dataset("mnist")
    with pytest.raises(DataError, match="dataset name must be a string"):
        load_dataset(3)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seq_len": 0}, "seq_len must be a positive integer, got 0"),
        ({"seq_len": True}, "seq_len must be a positive integer"),
        ({"seq_len": 12.5}, "seq_len must be a positive integer"),
        ({"augment": "yes"}, "augment must be True or False"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"data_dir": "/tmp"}, "digits takes no data_dir: it reads no files"),
        ({"text_file": "/tmp/x.txt"}, "text_file is only for the text dataset; digits"),
    ],
)
def test_bad_options(kwargs, message):
    with pytest.raises(DataError, match=message):
        load_dataset("digits", **kwargs)


def test_option_for_the_wrong_dataset():
    with pytest.raises(DataError, match="text takes no data_dir: it reads its corpus from text"):
        load_dataset("text", data_dir="/tmp")
    with pytest.raises(DataError, match="text_file is only for the text dataset; cifar10"):
        load_dataset("cifar10", text_file="/tmp/x.txt")
    with pytest.raises(DataError, match="data_dir must be a non-empty path"):
        load_dataset("cifar10", data_dir="")


def test_data_error_is_a_value_error_and_bundle_is_frozen():
    assert issubclass(DataError, ValueError)
    data = load_dataset("digits")
    with pytest.raises(dataclasses.FrozenInstanceError):
        data.name = "x"  # type: ignore[misc]
