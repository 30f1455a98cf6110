"""Writers of tiny data sets in their standard on-disk formats (IDX, CIFAR pickles, image
folders), shared by the data tests and the CLI tests."""

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np

CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def batch(n: int, seed: int, num_classes: int = 10, label_key: str = "labels",
          str_keys: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    content = {
        "batch_label": b"testing batch",
        label_key: [int(v) for v in rng.integers(0, num_classes, n)],
        "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        "filenames": [b"x.png"] * n,
    }
    return content if str_keys else {k.encode(): v for k, v in content.items()}


def write_cifar10(root: Path, protocol: int = 2, str_keys: bool = False) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i, name in enumerate(CIFAR10_FILES):
        content = batch(8 if name != "test_batch" else 6, i, str_keys=str_keys)
        (folder / name).write_bytes(pickle.dumps(content, protocol=protocol))
    return folder


def write_cifar100(root: Path) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for i, name in enumerate(["train", "test"]):
        content = batch(12, i, num_classes=100, label_key="fine_labels")
        content[b"coarse_labels"] = [0] * 12
        (folder / name).write_bytes(pickle.dumps(content, protocol=2))
    names = [f"class{i:02d}".encode() for i in range(100)]
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": names}, protocol=2))
    return folder


NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def write(path: Path, payload: bytes, gz: bool) -> Path:
    if gz:
        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload)
    path.write_bytes(payload)
    return path


def write_fashion(folder: Path, n_train=24, n_test=10, gz=True, size=28) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, size, size), dtype=np.uint8),
        "train_labels": (np.arange(n_train) % 10).astype(np.uint8),
        "test_images": rng.integers(0, 256, (n_test, size, size), dtype=np.uint8),
        "test_labels": (np.arange(n_test) % 10).astype(np.uint8),
    }
    return {  # gz="mixed": every other file gzipped
        key: write(folder / NAMES[key], idx_bytes(arrays[key]),
                   gz if isinstance(gz, bool) else bool(i % 2))
        for i, key in enumerate(NAMES)
    }




def write_image(path: Path, colour, size=(40, 30), mode="RGB", fmt=None) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, colour)
    image.convert(mode).save(path, format=fmt)


COLOURS = {"cat": (200, 30, 30), "dog": (30, 200, 30), "emu": (30, 30, 200)}


def write_folder(root: Path, test_name="test", per_class=3) -> Path:
    for split, count in (("train", per_class), (test_name, 2)):
        for c, (name, colour) in enumerate(COLOURS.items()):
            for i in range(count):
                ext = (".png", ".jpg", ".PNG")[(i + c) % 3]
                size = ((40, 30), (32, 32), (64, 96))[i % 3]
                write_image(root / split / name / f"img{i}{ext}", colour, size,
                            fmt="JPEG" if ext == ".jpg" else "PNG")
    return root
