"""imagefolder: tiny Pillow-written folders (mixed sizes and formats), resize + centre crop,
class handling and every error path."""


import numpy as np
import pytest
import torch
from data_fixtures import COLOURS, write_folder, write_image

from nmsparse.app.data import DataError, load_dataset

Image = pytest.importorskip("PIL.Image")

def test_loads_and_resizes(tmp_path):
    write_folder(tmp_path)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    deep = tmp_path / "train" / "dog" / "sub" / "deep.bmp"
    write_image(deep, COLOURS["dog"], (10, 50), fmt="BMP")
    data = load_dataset("imagefolder", data_dir=str(tmp_path))
    assert (data.name, data.task, data.input_shape, data.num_classes) == (
        "imagefolder", "classification", (3, 32, 32), 3)
    assert (len(data.train), len(data.test)) == (10, 6)
    assert data.train.classes == ("cat", "dog", "emu")
    assert "10 train / 6 test, 3x32x32, 3 classes (cat, dog, emu)" in data.description
    assert data.train.labels.tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    # a flat colour survives resize and crop (JPEG: within compression error)
    for images, labels in ((data.train.images, data.train.labels),
                           (data.test.images, data.test.labels)):
        assert images.shape[1:] == (3, 32, 32) and images.dtype == torch.uint8
        for image, label in zip(images, labels, strict=True):
            colour = torch.tensor(list(COLOURS.values())[label], dtype=torch.float32)
            assert (image.float().mean((1, 2)) - colour).abs().max() < 4
    x, y = data.train.get_batch(torch.arange(10), generator=torch.Generator().manual_seed(0))
    assert x.shape == (10, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    t = data.test.get_batch(torch.arange(6))[0]
    assert torch.equal(t, data.test.get_batch(torch.arange(6))[0])


def test_resize_shorter_side_then_centre_crop(tmp_path):
    # a 64x32 image: left half black, middle 32 columns white, right quarter black
    array = np.zeros((32, 64, 3), np.uint8)
    array[:, 16:48] = 255
    for split in ("train", "val"):
        path = tmp_path / split / "a" / "x.png"
        path.parent.mkdir(parents=True)
        Image.fromarray(array).save(path)
    data = load_dataset("imagefolder", data_dir=tmp_path, augment=False)
    assert "1 train / 1 val" in data.description
    assert bool((data.test.images == 255).all())  # only the white middle is kept


def test_grayscale_and_rgba_become_rgb(tmp_path):
    for split in ("train", "test"):
        write_image(tmp_path / split / "a" / "g.png", (90, 90, 90), mode="L")
        write_image(tmp_path / split / "b" / "r.png", (10, 20, 30), mode="RGBA")
    data = load_dataset("imagefolder", data_dir=tmp_path)
    assert data.train.images.shape == (2, 3, 32, 32)


def test_errors(tmp_path):
    with pytest.raises(DataError, match=r"imagefolder needs data_dir: a folder holding "
                       r"train/<class>/<image> and test/<class>/<image> \(or val/ for test\)"):
        load_dataset("imagefolder")
    with pytest.raises(DataError, match=r"data directory .*none does not exist"):
        load_dataset("imagefolder", data_dir=tmp_path / "none")
    with pytest.raises(DataError, match=r"has no train/ and test/ \(or val/\); expected train/"):
        load_dataset("imagefolder", data_dir=tmp_path)
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    with pytest.raises(DataError, match=r"no class folders in .*train; expected train/<class>"):
        load_dataset("imagefolder", data_dir=tmp_path)


def test_empty_class_folder(tmp_path):
    write_folder(tmp_path)
    (tmp_path / "test" / "fox").mkdir()
    (tmp_path / "train" / "fox").mkdir()
    (tmp_path / "train" / "fox" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=r"class folder .*train/fox holds no images; expected files "
                       r"ending in .bmp, .gif"):
        load_dataset("imagefolder", data_dir=tmp_path)


def test_mismatched_classes(tmp_path):
    write_folder(tmp_path)
    write_image(tmp_path / "test" / "fox" / "a.png", (1, 2, 3))
    with pytest.raises(DataError, match=r"train and test have different classes \(only in train: "
                       r"none; only in test: \['fox'\]\); both need the same class folders"):
        load_dataset("imagefolder", data_dir=tmp_path)


def test_corrupt_image(tmp_path):
    write_folder(tmp_path)
    (tmp_path / "train" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DataError, match=r"cannot decode image .*broken.png"):
        load_dataset("imagefolder", data_dir=tmp_path)
