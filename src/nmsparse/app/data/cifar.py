"""``cifar10`` / ``cifar100``: the CIFAR "python version" batches as downloaded from
https://www.cs.toronto.edu/~kriz/cifar.html and extracted.

* CIFAR-10: ``cifar-10-batches-py/data_batch_1`` .. ``data_batch_5`` and ``test_batch``, each a
  pickled dict with ``b"data"`` (uint8, N x 3072, channel-major 3x32x32) and ``b"labels"``.
* CIFAR-100: ``cifar-100-python/train`` and ``test`` with ``b"data"`` and ``b"fine_labels"``
  (the 100 fine classes; names from ``meta`` when present).

``data_dir`` may be that folder or its parent (default ``/usr/share/datasets/cifar10`` or
``cifar100``, where the batches are not installed by default). The pickles are read with
:mod:`nmsparse.app.data.safe_pickle`, which rebuilds numpy arrays but refuses any other global, so
nothing a file names is ever executed; a corrupted file is a DataError naming it.

Images stay uint8 in memory (50000 x 3072 = 150 MB) and are normalised per batch with the
usual per-channel statistics of the training set (CIFAR-10 mean 0.4914/0.4822/0.4465, std
0.2470/0.2435/0.2616; CIFAR-100 mean 0.5071/0.4865/0.4409, std 0.2673/0.2564/0.2762).
Training augmentation (``augment=True``): the standard random 32x32 crop from the image
zero-padded by 4 pixels, then a horizontal flip with probability 1/2.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import safe_pickle
from ._base import DataBundle, DataError
from ._registry import LoadOptions, existing_dir, register
from .tensors import ImageDataset
from .transforms import CropFlip, Normalize

URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
PADDING = 4


@dataclass(frozen=True)
class CifarVariant:
    name: str
    title: str
    folder: str
    train_files: tuple[str, ...]
    test_file: str
    label_key: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    default_dir: Path


CIFAR10 = CifarVariant(
    "cifar10", "CIFAR-10", "cifar-10-batches-py",
    tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "labels", 10,
    (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), Path("/usr/share/datasets/cifar10"),
)
CIFAR100 = CifarVariant(
    "cifar100", "CIFAR-100", "cifar-100-python", ("train",), "test", "fine_labels", 100,
    (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), Path("/usr/share/datasets/cifar100"),
)
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)


def unpickle(path: Path) -> object:
    """Restricted unpickling of one file; every failure is a one-line DataError naming it."""
    try:
        return safe_pickle.load_path(path)
    except safe_pickle.ForbiddenGlobal as exc:
        raise DataError(
            f"{path}: refused to load: the pickle asks for {exc.module}.{exc.name}; only dicts, "
            "lists, bytes, numbers and numpy arrays are allowed in a dataset file"
        ) from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except Exception as exc:  # noqa: BLE001 - whatever a damaged pickle raises, it is damaged
        raise DataError(
            f"{path}: corrupted pickle, not a CIFAR batch ({type(exc).__name__}: {exc})"
        ) from None


def _entry(batch: dict, key: str) -> object:
    for k in (key.encode(), key):  # Python 2 pickles give bytes keys, re-pickled ones str keys
        if k in batch:
            return batch[k]
    return None


def read_batch(path: Path, variant: CifarVariant) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (N, 3, 32, 32), labels int64 (N,))`` from one pickled batch."""
    batch = unpickle(path)
    expected = f"a dict with b'data' (uint8 N x 3072) and b'{variant.label_key}'"
    if not isinstance(batch, dict):
        raise DataError(f"{path}: holds a {type(batch).__name__}; expected {expected}")
    data, labels = _entry(batch, "data"), _entry(batch, variant.label_key)
    if data is None or labels is None:
        keys = ", ".join(repr(k) for k in list(batch)[:8])
        raise DataError(f"{path}: has keys {keys}; expected {expected}")
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == 3 * 32 * 32):
        what = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: b'data' is {what}; expected a uint8 array N x 3072")
    try:
        labels = np.asarray(labels)
    except (ValueError, TypeError) as exc:
        raise DataError(f"{path}: b'{variant.label_key}' is not a list of integers") from exc
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != len(data):
        raise DataError(
            f"{path}: b'{variant.label_key}' must be {len(data)} integers (one per image), got "
            f"{labels.dtype} with shape {labels.shape}"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= variant.num_classes):
        raise DataError(
            f"{path}: labels range {labels.min()}..{labels.max()}; expected "
            f"0..{variant.num_classes - 1}"
        )
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def find_folder(root: Path, variant: CifarVariant) -> Path:
    files = (*variant.train_files, variant.test_file)
    expected = (
        f"the {variant.title} python batches ({', '.join(files)}) in it or in its "
        f"{variant.folder}/ folder"
    )
    hint = f"; download the python version from {URL}, extract it and pass data_dir"
    existing_dir(root, variant.name, expected, hint)
    for folder in (root, root / variant.folder):
        present = [f for f in files if (folder / f).is_file()]
        if len(present) == len(files):
            return folder
        if present:
            missing = [f for f in files if f not in present]
            raise DataError(
                f"{variant.name}: {folder} lacks {', '.join(missing)}; expected {expected}"
            )
    raise DataError(f"{variant.name}: no batches in {root}; expected {expected}{hint}")


def _class_names(folder: Path, variant: CifarVariant) -> tuple[str, ...] | None:
    if variant.num_classes == 10:
        return CIFAR10_CLASSES
    meta_path = folder / "meta"
    if not meta_path.is_file():
        return None
    try:  # names are a nicety: a damaged meta file only loses them
        names = _entry(unpickle(meta_path), "fine_label_names")  # type: ignore[arg-type]
    except (DataError, TypeError):
        return None
    if not isinstance(names, list) or len(names) != variant.num_classes:
        return None
    return tuple(n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names)


def load_cifar(opts: LoadOptions, variant: CifarVariant) -> DataBundle:
    folder = find_folder(opts.data_dir or variant.default_dir, variant)
    parts = [read_batch(folder / f, variant) for f in variant.train_files]
    train_x = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    train_y = np.concatenate([p[1] for p in parts])
    test_x, test_y = read_batch(folder / variant.test_file, variant)
    if len(train_x) == 0 or len(test_x) == 0:
        raise DataError(f"{variant.name}: {folder} holds an empty split; expected images in both")
    normalize = Normalize(variant.mean, variant.std)
    augment = CropFlip(padding=PADDING, flip=True) if opts.augment else None
    classes = _class_names(folder, variant)

    def tensor(a: np.ndarray) -> torch.Tensor:
        # unpickled arrays may be read-only views of the file's bytes; torch wants writable memory
        return torch.from_numpy(a if a.flags.writeable else a.copy())

    train = ImageDataset(tensor(train_x), tensor(train_y), normalize, augment, classes)
    test = ImageDataset(tensor(test_x), tensor(test_y), normalize, None, classes)
    return DataBundle(
        name=variant.name,
        task="classification",
        train=train,
        test=test,
        input_shape=(3, 32, 32),
        num_classes=variant.num_classes,
        description=(
            f"{variant.title}: {len(train)} train / {len(test)} test, 3x32x32, "
            f"{variant.num_classes} classes"
        ),
    )


@register(
    "cifar10",
    "CIFAR-10 python batches (data_dir = cifar-10-batches-py or its parent): 50000 train / "
    "10000 test, 3x32x32, 10 classes",
)
def load_cifar10(opts: LoadOptions) -> DataBundle:
    return load_cifar(opts, CIFAR10)


@register(
    "cifar100",
    "CIFAR-100 python files (data_dir = cifar-100-python or its parent): 50000 train / "
    "10000 test, 3x32x32, 100 fine classes",
)
def load_cifar100(opts: LoadOptions) -> DataBundle:
    return load_cifar(opts, CIFAR100)
