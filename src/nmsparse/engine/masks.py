"""Masks by magnitude, the functional API: ``nm_mask(weight, n, m)`` and friends.

Each group keeps its N largest ``|w|``; ties go to the lower index, so a mask is the same on
every device. The geometry of the groups lives in :mod:`nmsparse.patterns.grouping`, the pattern
object in :mod:`nmsparse.patterns`.
"""

from __future__ import annotations

import torch

from ..patterns import NM
from ..patterns.grouping import LAYOUTS, check_layout, grouping_error, kept_per_group

__all__ = ["LAYOUTS", "MASK_SUFFIX", "check_layout", "compute_mask", "kept_per_group", "nm_mask",
           "nonfinite_error", "saved_masks"]


def compute_mask(weight: torch.Tensor, pattern: NM, layout: str | None = None) -> torch.Tensor:
    """Magnitude mask of ``weight`` with no finiteness check (callers check once for many
    layers). ``layout`` overrides the pattern's grouping when given."""
    if layout is not None and layout != pattern.layout:
        pattern = NM(pattern.n, pattern.m, layout)
    return pattern.mask(weight.detach().abs())


def nonfinite_error(name: str | None) -> ValueError:
    where = f"layer {name!r}" if name else "the weight"
    return ValueError(f"{where} contains NaN or Inf, so no N:M mask can be computed "
                      "(a diverged run: check the learning rate or the AMP loss scaling)")


def nm_mask(weight: torch.Tensor, n: int, m: int, layout: str = "in") -> torch.Tensor:
    """Bool mask of ``weight``'s shape keeping the N largest ``|w|`` of every M-group.

    Raises ``ValueError`` for an invalid pattern, a grouped dimension not divisible by M,
    a weight that is not 2-D to 5-D or not floating point, or a NaN/Inf weight.
    """
    pattern = NM(n, m, layout)
    if not torch.is_floating_point(weight):
        raise ValueError(f"nm_mask needs a floating-point weight, got dtype {weight.dtype}")
    error = grouping_error(tuple(weight.shape), pattern.m, layout)
    if error:
        raise ValueError(error)
    if not bool(torch.isfinite(weight).all()):
        raise nonfinite_error(None)
    return compute_mask(weight, pattern)


MASK_SUFFIX = "_mask"


def saved_masks(source) -> dict[str, torch.Tensor]:
    """``{weight name: bool mask}`` from a state dict, a ``.safetensors`` / ``.pt`` file or a
    Hugging Face ``save_pretrained`` folder: every bool ``<weight>_mask`` entry, ready for
    ``sparsify(model, ..., masks=saved_masks(path))``. Masks of fixed-mask methods cannot be
    re-derived from the weights, so a reload needs them.
    """
    import os
    from pathlib import Path

    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
        if not files or not all(f.is_file() for f in files):
            raise ValueError(f"{str(path)!r} holds no .safetensors file to read masks from")
        state: dict = {}
        for file in files:
            state.update(_read_tensors(file))
    elif isinstance(source, dict) or hasattr(source, "items"):
        state = dict(source.items())
    else:
        raise ValueError(f"saved_masks takes a state dict or a path, got {type(source).__name__}")
    return {key[:-len(MASK_SUFFIX)]: value for key, value in state.items()
            if key.endswith(MASK_SUFFIX) and isinstance(value, torch.Tensor)
            and value.dtype == torch.bool}


def _read_tensors(file) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    if file.suffix in (".pt", ".pth", ".bin"):
        loaded = torch.load(file, map_location="cpu", weights_only=True)
        if isinstance(loaded, dict):
            return {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    raise ValueError(f"cannot read masks from {str(file)!r}: expected .safetensors, .pt, "
                     ".pth or .bin")
