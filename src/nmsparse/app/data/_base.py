"""The two types every dataset shares: the error it raises and the bundle it returns.

Kept in a module of their own (no heavy imports) so that dataset files, the registry and the
loader can all import them without cycles.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class DataError(ValueError):
    """A bad input: a missing or corrupted file, an unknown name, an out-of-range option.

    The message is one line saying what is wrong and what is accepted or expected, so that a
    command-line tool can print it as it is.
    """

    def __init__(self, message: object = "") -> None:
        # one line even when it quotes a multi-line error from a library
        super().__init__(" ".join(str(message).split()))


@dataclass(frozen=True)
class DataBundle:
    """A dataset ready to train on: both splits, their shapes and a one-line description.

    ``train`` applies its augmentation inside (when loaded with ``augment=True``); ``test``
    never augments, so evaluating it twice gives the same tensors. Both yield ``(x, y)`` tensors
    and offer ``get_batch(indices, generator=None)``, a vectorised fast path that
    :func:`nmsparse.app.data.make_loader` uses.
    """

    name: str
    task: str  # "classification" or "language_model"
    train: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    input_shape: tuple[int, ...]
    num_classes: int
    description: str

    def __str__(self) -> str:
        return self.description
