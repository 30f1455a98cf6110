"""``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images, no download).

Split: ``sklearn.model_selection.train_test_split(test_size=0.2, random_state=0, stratify=y)``,
fixed whatever the seed so that results compare across runs: 1437 train / 360 test.
Features: the 64 pixel values (0..16) scaled to [0, 1], then standardised per feature with the
training split's mean and std (a feature constant on the training split, e.g. an always-blank
corner pixel, is only centred). No augmentation: the samples are treated as tabular vectors.
"""

from __future__ import annotations

import torch

from ._base import DataBundle, DataError
from ._registry import LoadOptions, register
from .tensors import FeatureDataset

SPLIT_SEED = 0
TEST_FRACTION = 0.2


@register(
    "digits",
    "scikit-learn 8x8 digits (bundled, no download): 1437 train / 360 test, 64 features, 10 "
    "classes",
    takes=(),
)
def load_digits(opts: LoadOptions) -> DataBundle:
    try:  # a base dependency, imported only when asked for (a broken install still gets a hint)
        from sklearn.datasets import load_digits as sk_load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise DataError(
            "digits needs scikit-learn, which is not installed; install it with "
            "pip install scikit-learn (a dependency of nmsparse: pip install nmsparse installs it)"
        ) from exc

    x, y = sk_load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x / 16.0, y, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=y
    )
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std[std < 1e-8] = 1.0  # constant features: centre only, do not divide by ~0

    def dataset(features, labels) -> FeatureDataset:
        return FeatureDataset(
            torch.from_numpy((features - mean) / std).to(torch.float32),
            torch.from_numpy(labels).to(torch.long),
            classes=[str(d) for d in range(10)],
        )

    train, test = dataset(x_train, y_train), dataset(x_test, y_test)
    return DataBundle(
        name="digits",
        task="classification",
        train=train,
        test=test,
        input_shape=(64,),
        num_classes=10,
        description=(
            f"digits (scikit-learn 8x8): {len(train)} train / {len(test)} test, 64 features, "
            "10 classes"
        ),
    )
