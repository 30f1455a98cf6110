"""How a :class:`~nmsparse.engine.sparse_weight.SparseWeight` lives under FSDP2's
``fully_shard``: the sharded dense Parameter is a DTensor between forward passes and FSDP swaps
in the all-gathered plain weight for forward and backward. The mask buffer is sharded like the
weight (shards hold whole groups, :mod:`nmsparse.engine._dtensor`), and in FSDP's forward the
masked weight is built afresh from the gathered mask, never cached.

``ShardedStorage`` is the storage half of ``SparseWeight`` (the state machine is the other):
the attributes it reads (``module``, ``param_name``, ``mask``, ``method``...) are the sparse
weight's own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ._dtensor import PLAIN_TYPES, check_placements, gather, is_dtensor, local, shard_like, version

# On a sparse module: {param name: SparseWeight}; on a sparse weight: its SparseWeight.
STATE_ATTRIBUTE = "_nmsparse"


class ShardedStorage:
    """The FSDP2 side of a sparse weight (see the module docstring)."""

    def _shard(self) -> nn.Parameter | None:
        """FSDP's sharded dense Parameter (a DTensor), or ``None`` for a plain weight.

        A newly sharded Parameter (``fully_shard`` after ``sparsify``, FSDP re-creating it) is
        adopted here: its placements are checked, the mask is sharded like it, and it is
        tagged so that the step hooks find it in the optimizer."""
        dense = self.module._parameters[self.param_name]
        if dense is self._sharded or type(dense) in PLAIN_TYPES or not is_dtensor(dense):
            return self._sharded  # plain, or FSDP's forward (the all-gathered plain weight)
        check_placements(dense, self.pattern, self.name)
        mask = self.mask
        if not is_dtensor(mask) or mask.device_mesh != dense.device_mesh \
                or mask.placements != dense.placements:
            self.module._buffers[self.mask_name] = shard_like(mask, dense)
        setattr(dense, STATE_ATTRIBUTE, self)
        self._sharded, self._built_from = dense, None
        self.masked = None  # built per forward from the gathered mask, never kept
        if self._forward_guard is None:  # after FSDP's own hooks, which gather the weight
            self._forward_guard = self.module.register_forward_pre_hook(
                self._refuse_sharded_forward)
        return dense

    def _refuse_sharded_forward(self, module: nn.Module, args: tuple) -> None:
        """Outside FSDP's forward this attribute hands out the dense shard (FSDP needs it):
        a forward that still sees a DTensor (tensor parallelism, with or without FSDP) would
        compute with the dense weight, so stop it."""
        if is_dtensor(self.dense):
            raise RuntimeError(f"{self.name}: the sharded weight reached forward as a DTensor; "
                               "nmsparse supports sharded weights under FSDP2's fully_shard, "
                               "which gathers them before forward (not tensor parallelism)")

    def remove_hooks(self) -> None:
        """Remove the forward hook a sharded weight installed (called by ``finalize``)."""
        if self._forward_guard is not None:
            self._forward_guard.remove()
            self._forward_guard = None

    @contextlib.contextmanager
    def _shard_installed(self, shard: nn.Parameter) -> Iterator[None]:
        """Let the method see the shard as ``dense`` during FSDP's forward, then put FSDP's
        all-gathered weight back."""
        params = self.module._parameters
        current = params[self.param_name]
        if current is shard:
            yield
            return
        params[self.param_name] = shard
        try:
            yield
        finally:
            params[self.param_name] = current

    def _shard_fingerprint(self, shard: nn.Parameter) -> tuple:
        mask = self.mask
        weight_shard, mask_shard = local(shard), local(mask)
        return (version(shard), weight_shard.data_ptr(), weight_shard.dtype,
                weight_shard.device, version(mask), mask_shard.data_ptr(), mask_shard.device)

    def _sharded_forward_weight(self, shard: nn.Parameter) -> torch.Tensor:
        compiling = torch.compiler.is_compiling()
        dense = self.dense
        if dense is shard:
            # Between forward passes FSDP reads its sharded Parameter back through this
            # attribute (lazy init, load_state_dict): it must get the Parameter itself.
            if not compiling:
                self.ensure_fresh()
            return shard
        if not compiling:
            self.ensure_fresh()  # a shard edited since its last refresh is redone first
        with torch.no_grad():
            mask = gather(self.mask)  # all ranks run the same forward: one all-gather each
            masked = torch.where(mask, dense, torch.zeros((), dtype=dense.dtype,
                                                          device=dense.device))
        return self.method.masked_weight(_View(self, dense, mask, masked))


class _View:
    """A sparse weight as a method sees it through other tensors: in FSDP's forward the
    all-gathered dense weight, the gathered mask and their product; at ``sparsify`` time the
    local shard. Anything else is the sparse weight's own."""

    def __init__(self, weight: Any, dense: torch.Tensor, mask: torch.Tensor | None,
                 masked: torch.Tensor | None) -> None:
        self._weight, self.dense, self.mask, self.masked = weight, dense, mask, masked

    def __getattr__(self, name: str) -> Any:
        return getattr(self._weight, name)


