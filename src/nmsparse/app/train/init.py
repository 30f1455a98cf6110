"""``nmsparse train --init PATH``: start a new run from another run's weights (and masks).

``PATH`` is a run folder or checkpoint: a trained run, or one written by ``nmsparse prune``.
Its weights are loaded into the freshly built model before sparsify, with any masks baked
in; the masks themselves are returned so sparsify starts from exactly them
(``sparsify(masks=...)``): a one-shot pruned model keeps its mask under ``--method fixed``
and SR-STE starts from it under ``--method srste``. A fresh optimizer and schedule start.

What the model *is* comes from the init checkpoint unless given: the :data:`INHERITED`
settings of its configuration are defaults that command-line flags override (and that
override a recipe file).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ... import MASK_SUFFIX, saved_masks
from . import checkpoint
from .config import legacy_decay

INHERITED = ("model", "model_options", "data", "data_dir", "text_file", "seq_len", "pattern",
             "method", "method_options", "layout", "exclude", "include")


def inherited_settings(path: str | Path) -> dict[str, Any]:
    """The settings of the init checkpoint's run that a new run takes by default."""
    config = legacy_decay(checkpoint.load(path).get("config", {}))
    return {name: config[name] for name in INHERITED if name in config}


def split_masks(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor],
                                                         dict[str, torch.Tensor]]:
    """``(weights with masks baked in, {weight name: mask})`` of a sparse state dict."""
    masks = {name: mask for name, mask in saved_masks(state).items() if name in state}
    mask_keys = {name + MASK_SUFFIX for name in masks}
    weights = {key: (value * masks[key] if key in masks else value)
               for key, value in state.items() if key not in mask_keys}
    return weights, masks


def load_init(model: nn.Module, path: str | Path) -> dict[str, torch.Tensor]:
    """Load the init checkpoint's weights into ``model`` (dense); returns its masks."""
    weights, masks = split_masks(checkpoint.load(path)["model"])
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        what = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}")
        raise checkpoint.CheckpointError(f"--init {str(path)!r} does not fit the model: "
                                         f"{what} (give the same --model and options)")
    return masks
