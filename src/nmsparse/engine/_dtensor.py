"""Sharded dense weights (DTensors, as FSDP2's ``fully_shard`` makes them): the helpers a
sparse weight uses to keep its mask sharded exactly like its weight.

Contract:

* a sparse weight whose dense Parameter is a DTensor keeps its mask buffer as a DTensor with
  the same mesh and placements, so a shard of the mask sits next to the shard of the weight;
* mask updates, the SR-STE term and the re-zeroing of fixed masks run on the local shards
  with no communication. That is exact because every shard holds whole N:M groups:
  :func:`check_placements` refuses a placement that splits the grouped dimension (FSDP2
  shards dim 0; N:M groups run along dim 1, or within an output row for ``"flat"``);
* :func:`gather` all-gathers a mask for FSDP's forward, where the dense weight is the
  all-gathered plain tensor.

``torch.distributed`` is never imported here: no DTensor can exist before its module is
loaded, so ``import nmsparse`` stays light and plain tensors pay one type check.
"""

from __future__ import annotations

import sys
import weakref

import torch
from torch import nn

from ..patterns import NM, Pattern

PLAIN_TYPES = (torch.Tensor, nn.Parameter)  # checked first: the common case costs no call


def is_dtensor(tensor: object) -> bool:
    if type(tensor) in PLAIN_TYPES:
        return False
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a plain tensor sharing its storage and version
    counter), or ``tensor`` itself."""
    if not is_dtensor(tensor):
        return tensor
    with torch.no_grad():
        return tensor.to_local()


def version(tensor: torch.Tensor) -> int | tuple[int, int]:
    """What changes when ``tensor`` is modified in place. A DTensor has two counters: ops
    through the DTensor (an optimizer step) bump the wrapper's, edits of the local shard
    bump the shard's."""
    if type(tensor) in PLAIN_TYPES or not is_dtensor(tensor):
        return tensor._version
    return tensor._version, local(tensor)._version


def grouped_dims(pattern: Pattern, ndim: int) -> set[int] | None:
    """The dims a pattern's groups span (``None``: the pattern does not say)."""
    if isinstance(pattern, NM):
        return {1} if pattern.layout == "in" else set(range(1, ndim))
    return None


def check_placements(weight: torch.Tensor, pattern: Pattern, name: str) -> None:
    """Raise ``ValueError`` unless every shard of ``weight`` holds whole groups of
    ``pattern``: ``Replicate``, or ``Shard(d)`` on a dim the groups do not span."""
    grouped = grouped_dims(pattern, weight.dim())
    for placement in weight.placements:
        if placement.is_replicate():
            continue
        if not placement.is_shard():
            raise ValueError(f"{name}: a sharded weight placed as {placement} cannot be made "
                             "sparse; accepted: Shard(d) on a dim the pattern does not group "
                             "(FSDP2's Shard(0)) or Replicate")
        dim = placement.dim % weight.dim()
        if grouped is None:
            raise ValueError(f"{name}: pattern {pattern} does not say which dims its groups "
                             "span, so its weight cannot be sharded; sharded weights take N:M "
                             "patterns")
        if dim in grouped:
            raise ValueError(f"{name}: the weight is sharded along dim {dim}, which splits the "
                             f"groups of pattern {pattern} (they span dims {sorted(grouped)}); "
                             "shard dim 0 (FSDP2's default) or keep this layer dense")


def shard_like(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``tensor`` (of ``like``'s global shape) as a DTensor placed like the DTensor ``like``.

    A plain tensor must hold the full value on every rank: each rank keeps its own shard and
    nothing is communicated. A DTensor placed otherwise is redistributed (a collective)."""
    from torch.distributed.tensor import distribute_tensor

    if tuple(tensor.shape) != tuple(like.shape):
        raise ValueError(f"shape {tuple(tensor.shape)} differs from the sharded weight's "
                         f"{tuple(like.shape)}")
    if is_dtensor(tensor):
        if tensor.device_mesh == like.device_mesh and tensor.placements == like.placements:
            return tensor
        return tensor.redistribute(like.device_mesh, like.placements)
    return distribute_tensor(tensor.to(local(like).device), like.device_mesh, like.placements,
                             src_data_rank=None)


def local_like(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``tensor`` laid out like the DTensor ``like``: a DTensor's local
    shard (redistributed first if placed otherwise), a plain tensor of the local shape as is,
    or the local slice of a full plain tensor."""
    if not is_dtensor(tensor) and tensor.shape == local(like).shape:
        return tensor
    return local(shard_like(tensor, like))


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """The full value of a DTensor (a collective: every rank must call it), or ``tensor``."""
    if not is_dtensor(tensor):
        return tensor
    with torch.no_grad():
        return tensor.full_tensor()


def grad_key(grad: torch.Tensor) -> tuple:
    """Identifies one gradient value, for :func:`same_grad`: the tensor (by weak reference,
    as a freed gradient's id is soon reused) and its :func:`version`."""
    return weakref.ref(grad), version(grad)


def same_grad(key: tuple | None, grad: torch.Tensor) -> bool:
    return key is not None and key[0]() is grad and key[1] == version(grad)
