"""``fashion-mnist``: Zalando's Fashion-MNIST from the four standard IDX files.

Files: ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
``t10k-labels-idx1-ubyte``, each plain or gzipped (``.gz``), looked for in ``data_dir`` (default
``/usr/share/datasets/fashion-mnist``, where Debian's ``dataset-fashion-mnist`` package puts
them) and in its ``FashionMNIST/raw`` and ``fashion-mnist`` sub-folders (torchvision's layout).

Images stay uint8 in memory (60000 x 28 x 28 = 47 MB) and are normalised per batch with the
usual mean 0.2860 / std 0.3530. Training augmentation (``augment=True``): a random 28x28 crop
from the image zero-padded by 2 pixels, and a horizontal flip with probability 1/2. Flipping is
label-preserving here (shirts, shoes and bags mirrored are still shirts, shoes and bags; unlike
digits, nothing depends on handedness), and a 2-pixel shift rather than CIFAR's 4 keeps the
centred, tightly framed items inside the frame.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ._base import DataBundle, DataError
from ._registry import LoadOptions, existing_dir, register
from .idx import read_idx
from .tensors import ImageDataset
from .transforms import CropFlip, Normalize

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
SUBDIRS = ("", "FashionMNIST/raw", "fashion-mnist")
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
MEAN, STD = (0.2860,), (0.3530,)
PADDING = 2
CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
HINT = (
    " (gzipped or not); on Debian/Ubuntu `apt-get install dataset-fashion-mnist` installs them "
    f"in {DEFAULT_DIR}, or download them from https://github.com/zalandoresearch/fashion-mnist "
    "and pass data_dir"
)


def find_files(root: Path) -> dict[str, Path]:
    """The four files, from the first of ``root``'s candidate folders that holds all four."""
    expected = ", ".join(FILES.values())
    existing_dir(root, "fashion-mnist", f"a folder holding {expected}", HINT)
    searched = []
    for sub in SUBDIRS:
        folder = root / sub if sub else root
        if not folder.is_dir():
            continue
        searched.append(str(folder))
        found = {}
        for key, name in FILES.items():
            for candidate in (folder / name, folder / f"{name}.gz"):
                if candidate.is_file():
                    found[key] = candidate
                    break
        if len(found) == len(FILES):
            return found
        if found:  # a partial set: report what is missing from this folder, not a vaguer error
            missing = [FILES[k] for k in FILES if k not in found]
            raise DataError(
                f"fashion-mnist: {folder} lacks {', '.join(missing)}; expected all of "
                f"{expected}{HINT}"
            )
    raise DataError(
        f"fashion-mnist: no IDX files in {' or '.join(searched)}; expected {expected}{HINT}"
    )


def _load_split(images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != "uint8" or images.ndim != 3:
        raise DataError(
            f"{images_path}: expected uint8 images N x H x W, got {images.dtype} with shape "
            f"{images.shape}"
        )
    if labels.dtype != "uint8" or labels.ndim != 1:
        raise DataError(
            f"{labels_path}: expected uint8 labels of shape (N,), got {labels.dtype} with shape "
            f"{labels.shape}"
        )
    if len(images) != len(labels):
        raise DataError(
            f"fashion-mnist: {images_path.name} holds {len(images)} images but "
            f"{labels_path.name} holds {len(labels)} labels; the counts must match"
        )
    if len(labels) == 0:
        raise DataError(f"{images_path}: holds no images; expected at least one")
    if int(labels.max()) >= len(CLASSES):
        raise DataError(
            f"{labels_path}: label {int(labels.max())} out of range; expected 0..{len(CLASSES) - 1}"
        )
    # copy: np.frombuffer arrays are read-only views of the decompressed bytes
    return (
        torch.from_numpy(images.copy()).unsqueeze(1),
        torch.from_numpy(labels.astype("int64")),
    )


@register(
    "fashion-mnist",
    "Fashion-MNIST from IDX files (default /usr/share/datasets/fashion-mnist): 60000 train / "
    "10000 test, 1x28x28, 10 classes",
)
def load_fashion_mnist(opts: LoadOptions) -> DataBundle:
    files = find_files(opts.data_dir or DEFAULT_DIR)
    train_x, train_y = _load_split(files["train_images"], files["train_labels"])
    test_x, test_y = _load_split(files["test_images"], files["test_labels"])
    if train_x.shape[1:] != test_x.shape[1:]:
        raise DataError(
            f"fashion-mnist: train images are {tuple(train_x.shape[2:])} but test images are "
            f"{tuple(test_x.shape[2:])}; both splits must have the same image size"
        )
    normalize = Normalize(MEAN, STD)
    augment = CropFlip(padding=PADDING, flip=True) if opts.augment else None
    train = ImageDataset(train_x, train_y, normalize, augment, classes=CLASSES)
    test = ImageDataset(test_x, test_y, normalize, None, classes=CLASSES)
    shape = tuple(train_x.shape[1:])
    return DataBundle(
        name="fashion-mnist",
        task="classification",
        train=train,
        test=test,
        input_shape=shape,
        num_classes=len(CLASSES),
        description=(
            f"Fashion-MNIST: {len(train)} train / {len(test)} test, {'x'.join(map(str, shape))}, "
            f"{len(CLASSES)} classes"
        ),
    )
