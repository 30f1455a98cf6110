"""``imagefolder``: your own small image classification set, one folder per class.

Layout: ``data_dir/train/<class>/**/<image>`` and ``data_dir/test/<class>/**/<image>``
(``val/`` is accepted in place of ``test/``). Images: ``.png .jpg .jpeg .bmp .gif .webp .tif
.tiff .ppm .pgm`` (case-insensitive), decoded with Pillow, converted to RGB. Classes are the
sorted sub-folder names (hidden ones skipped), and train and test must have the same classes.

Every image is brought to a fixed 3x32x32: its shorter side is resized to 32 (bilinear,
antialiased), then the centre 32x32 is cropped, so aspect ratios are kept and differing sizes
are fine. All images are decoded once at load time (a few threads; JPEGs are decoded at reduced
size when they are much larger) and kept as uint8, so this suits small sets, not ImageNet.
Normalisation uses the per-channel mean and std of the training images; training augmentation
is CIFAR's (random crop from a 4-pixel zero padding, horizontal flip).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ._base import DataBundle, DataError
from ._registry import LoadOptions, existing_dir, register
from .tensors import ImageDataset
from .transforms import CropFlip, Normalize

IMAGE_SIZE = 32
PADDING = IMAGE_SIZE // 8
EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff",
                        ".ppm", ".pgm"})
LAYOUT = "train/<class>/<image> and test/<class>/<image> (or val/ for test)"


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def list_split(folder: Path) -> dict[str, list[Path]]:
    """``{class: sorted image paths}`` for one split folder."""
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and _visible(p))
    if not classes:
        raise DataError(f"imagefolder: no class folders in {folder}; expected {LAYOUT}")
    split: dict[str, list[Path]] = {}
    for name in classes:
        images = sorted(
            p for p in (folder / name).rglob("*")
            if p.suffix.lower() in EXTENSIONS and p.is_file() and _visible(p)
        )
        if not images:
            raise DataError(
                f"imagefolder: class folder {folder / name} holds no images; expected files "
                f"ending in {', '.join(sorted(EXTENSIONS))}"
            )
        split[name] = images
    return split


def decode(path: Path, size: int = IMAGE_SIZE) -> np.ndarray:
    """One image as uint8 ``(3, size, size)``: shorter side resized to ``size``, centre crop."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.draft("RGB", (size, size))  # JPEG: let the decoder downscale (a big speed-up)
            image = image.convert("RGB")
            w, h = image.size
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            image = image.resize((nw, nh), Image.Resampling.BILINEAR)
            left, top = (nw - size) // 2, (nh - size) // 2
            image = image.crop((left, top, left + size, top + size))
            array = np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"imagefolder: cannot decode image {path} ({exc})") from None
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def _decode_all(paths: list[Path]) -> torch.Tensor:
    # Pillow releases the GIL while decoding and resizing, so a few threads help.
    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        arrays = list(pool.map(decode, paths))
    return torch.from_numpy(np.stack(arrays))


def _tensors(split: dict[str, list[Path]]) -> tuple[torch.Tensor, torch.Tensor]:
    paths = [p for images in split.values() for p in images]
    labels = [i for i, images in enumerate(split.values()) for _ in images]
    return _decode_all(paths), torch.tensor(labels, dtype=torch.long)


def channel_stats(images: torch.Tensor, chunk: int = 1024) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images in [0, 1] units, in chunks (float64 sums) so
    that a larger folder does not need an 8x float copy of itself."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for start in range(0, len(images), chunk):
        block = images[start : start + chunk].to(torch.float64).div_(255.0)
        total += block.sum(dim=(0, 2, 3))
        squares += block.square().sum(dim=(0, 2, 3))
    count = images.numel() // images.shape[1]
    mean = total / count
    var = (squares / count - mean.square()).clamp_(min=0.0)
    std = var.sqrt()
    std[std < 1e-6] = 1.0  # a constant channel (blank images): centre only, do not divide by 0
    return mean.tolist(), std.tolist()


@register(
    "imagefolder",
    "your images in data_dir/{train,test|val}/<class>/*.png|jpg, resized and centre-cropped to "
    "3x32x32",
)
def load_imagefolder(opts: LoadOptions) -> DataBundle:
    if opts.data_dir is None:
        raise DataError(f"imagefolder needs data_dir: a folder holding {LAYOUT}")
    root = existing_dir(opts.data_dir, "imagefolder", f"a folder holding {LAYOUT}")
    train_dir = root / "train"
    test_dir = next((root / s for s in ("test", "val") if (root / s).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        missing = " and ".join(
            name for name, ok in (("train/", train_dir.is_dir()), ("test/ (or val/)", test_dir))
            if not ok
        )
        raise DataError(f"imagefolder: {root} has no {missing}; expected {LAYOUT}")
    train_split, test_split = list_split(train_dir), list_split(test_dir)
    if list(train_split) != list(test_split):
        only_train = sorted(set(train_split) - set(test_split))
        only_test = sorted(set(test_split) - set(train_split))
        raise DataError(
            f"imagefolder: train and {test_dir.name} have different classes (only in train: "
            f"{only_train or 'none'}; only in {test_dir.name}: {only_test or 'none'}); both "
            "need the same class folders"
        )
    try:
        import PIL  # noqa: F401  (imported here, not at module import: Pillow is optional)
    except ImportError as exc:
        raise DataError(
            "imagefolder needs Pillow to decode images, which is not installed; "
            "pip install 'nmsparse[images]' (or pip install pillow)"
        ) from exc
    train_x, train_y = _tensors(train_split)
    test_x, test_y = _tensors(test_split)
    mean, std = channel_stats(train_x)
    classes = tuple(train_split)
    normalize = Normalize(mean, std)
    augment = CropFlip(padding=PADDING, flip=True) if opts.augment else None
    train = ImageDataset(train_x, train_y, normalize, augment, classes)
    test = ImageDataset(test_x, test_y, normalize, None, classes)
    shown = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
    return DataBundle(
        name="imagefolder",
        task="classification",
        train=train,
        test=test,
        input_shape=(3, IMAGE_SIZE, IMAGE_SIZE),
        num_classes=len(classes),
        description=(
            f"imagefolder {root}: {len(train)} train / {len(test)} {test_dir.name}, "
            f"3x{IMAGE_SIZE}x{IMAGE_SIZE}, {len(classes)} classes ({shown})"
        ),
    )
