"""Datasets for training and evaluating N:M sparse networks, loaded by name.

    from nmsparse.app.data import load_dataset, make_loader
    data = load_dataset("fashion-mnist")          # a DataBundle: train, test, shapes, classes
    loader = make_loader(data.train, 128, shuffle=True, seed=0)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for x, y in loader: ...

Built in (see :func:`list_datasets`): ``digits`` (scikit-learn's bundled 8x8 digits),
``fashion-mnist`` (IDX files), ``cifar10`` / ``cifar100`` (the python pickle batches, read
without executing anything), ``imagefolder`` (your own images, one folder per class) and
``text`` (byte-level language modelling). Nothing is ever downloaded: each loader reads files
already on the machine and says in a one-line :class:`DataError` what is missing and where to
get it. Importing this package is light: scikit-learn and Pillow load only when a dataset needs
them.

Every dataset here yields ``(x, y)`` tensors, keeps its data in memory and also offers
``get_batch(indices, generator=None) -> (x, y)``, which builds (and augments) a whole batch
in a few vectorised tensor ops; :func:`make_loader` uses it, and derives each batch's
augmentation RNG from (seed, epoch, batch), so a resumed run sees exactly the same batches.
"""

from __future__ import annotations

from . import cifar, digits, fashion_mnist, imagefolder, text  # noqa: F401  (register)
from ._base import DataBundle, DataError
from ._registry import REGISTRY, LoadOptions, as_path, canonical_name, register
from .loader import BatchLoader, make_loader

__all__ = [
    "BatchLoader", "DataBundle", "DataError", "LoadOptions", "list_datasets", "load_dataset",
    "make_loader", "register",
]


def list_datasets() -> dict[str, str]:
    """``{name: one-line description}`` of every registered dataset, sorted by name."""
    return {name: REGISTRY.get(name).description for name in REGISTRY.names()}


def load_dataset(
    name: str,
    *,
    data_dir: str | None = None,
    text_file: str | None = None,
    seq_len: int = 128,
    augment: bool = True,
    seed: int = 0,
) -> DataBundle:
    """Load dataset ``name`` (case and ``_``/``-`` insensitive) into a :class:`DataBundle`.

    ``data_dir``: where the files are (fashion-mnist, cifar10, cifar100, imagefolder; each has
    its default or says that it needs one). ``text_file``: the corpus of ``text``. ``seq_len``:
    the window length of ``text`` (ignored by the others). ``augment``: apply the training
    augmentation to ``train`` (``test`` never augments). ``seed``: accepted for datasets that
    draw randomness at load time; no built-in one does (their splits are fixed so that results
    compare across seeds), augmentation randomness comes from the loader.

    Raises :class:`DataError` (a ``ValueError``) with a one-line message for any bad input.
    """
    key = canonical_name(name)
    spec = REGISTRY.get(key)
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise DataError(f"seq_len must be a positive integer, got {seq_len!r}")
    if not isinstance(augment, bool):
        raise DataError(f"augment must be True or False, got {augment!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DataError(f"seed must be an integer, got {seed!r}")
    if data_dir is not None and "data_dir" not in spec.takes:
        where = "its corpus from text_file" if key == "text" else "no files (it is bundled)"
        raise DataError(f"{key} takes no data_dir: it reads {where}; leave data_dir unset")
    if text_file is not None and "text_file" not in spec.takes:
        raise DataError(f"text_file is only for the text dataset; {key} takes no text_file")
    options = LoadOptions(
        data_dir=as_path(data_dir, "data_dir"),
        text_file=as_path(text_file, "text_file"),
        seq_len=seq_len,
        augment=augment,
        seed=seed,
    )
    return spec.load(options)
