"""Physically remove channels: from a model whose pruned channels are masked to a smaller dense
``nn.Module`` that computes the same outputs (the export step of channel pruning, e.g. CHEX).

A channel of a group is *masked* when every consumer column reading it is zero
(:func:`mask_channels`): nothing downstream sees it. :func:`slim` then deletes it from every
member slice of the group (producer rows and biases, BatchNorm parameters and statistics,
depthwise filters, consumer columns) and fixes the modules' size attributes, so the slimmed
copy's outputs equal the masked model's up to float rounding.

Only groups where that holds can be slimmed (:func:`why_not_slimmable`): free, with a
producer, and with no use that depends on the number of channels (a LayerNorm's statistics,
a mean over the channels, attention).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from .groups import ChannelGroup, model_tensors


def why_not_slimmable(group: ChannelGroup) -> str | None:
    """Why removing channels of ``group`` would change the function, or ``None``."""
    if group.pinned:
        return f"pinned ({group.pinned[0]})"
    if group.notes:
        return f"its channels are also used as a whole ({group.notes[0]})"
    if not group.producers:
        return "it has no producer"
    return None


def mask_channels(model: nn.Module, group: ChannelGroup, keep: torch.Tensor,
                  tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Zero the consumer columns of the channels of ``group`` where ``keep`` is False
    (``tensors``: ``model_tensors(model)`` when the caller already has it)."""
    keep = torch.as_tensor(keep, dtype=torch.bool)
    tensors = model_tensors(model) if tensors is None else tensors
    with torch.no_grad():
        for piece in group.consumers:
            window = tensors[piece.tensor].narrow(piece.dim, piece.start, piece.length)
            shape = [1] * window.dim()
            shape[piece.dim] = piece.length
            window.mul_(keep.reshape(shape).to(window.dtype))


def _resize_attributes(module: nn.Module) -> None:
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = weight.shape
    elif isinstance(module, nn.modules.conv._ConvNd):
        if module.groups > 1:  # depthwise (the only grouped conv a free group passes)
            module.groups = module.in_channels = module.out_channels = weight.shape[0]
        else:
            module.out_channels, module.in_channels = weight.shape[:2]
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        module.num_features = (module.running_mean if weight is None else weight).shape[0]
    elif isinstance(module, nn.Embedding):
        module.num_embeddings, module.embedding_dim = weight.shape


def slim(model: nn.Module, groups: list[ChannelGroup], keep: Mapping[int, torch.Tensor]
         ) -> nn.Module:
    """A deep copy of ``model`` without the channels ``keep[i]`` marks False in
    ``groups[i]`` (a bool tensor of the group's size; groups not in ``keep`` stay whole)."""
    kept_positions: dict[tuple[str, int], list[tuple[int, torch.Tensor]]] = {}
    for index, mask in keep.items():
        group = groups[index]
        reason = why_not_slimmable(group)
        if reason:
            raise ValueError(f"cannot slim group {index} ({group.describe()}): {reason}")
        mask = torch.as_tensor(mask, dtype=torch.bool)
        if mask.shape != (group.size,) or not mask.any():
            raise ValueError(f"keep[{index}] must be a bool tensor of {group.size} entries "
                             "keeping at least one channel")
        for piece in group.members:
            kept_positions.setdefault((piece.tensor, piece.dim), []).append(
                (piece.start, mask))
    slimmed = copy.deepcopy(model)
    owners = {}
    for module_name, module in slimmed.named_modules():
        for name, _ in [*module.named_parameters(recurse=False),
                        *module.named_buffers(recurse=False)]:
            owners[f"{module_name}.{name}" if module_name else name] = (module, name)
    tensors = model_tensors(slimmed)
    resized, done = set(), set()
    for (tensor_name, dim), pieces in kept_positions.items():
        if (id(tensors[tensor_name]), dim) in done:  # a shared Parameter under two names
            continue
        done.add((id(tensors[tensor_name]), dim))
        module, name = owners[tensor_name]
        tensor = getattr(module, name)  # already smaller along another dim, maybe
        select = torch.ones(tensor.shape[dim], dtype=torch.bool)
        for start, mask in pieces:
            select[start:start + mask.numel()] &= mask
        smaller = tensor.detach().index_select(dim, select.nonzero().flatten()
                                               .to(tensor.device)).clone()
        if isinstance(tensor, nn.Parameter):
            new = nn.Parameter(smaller, requires_grad=tensor.requires_grad)
            for other, other_attr in owners.values():  # tied weights follow
                if getattr(other, other_attr) is tensor:
                    setattr(other, other_attr, new)
                    resized.add(id(other))
        else:
            module._buffers[name] = smaller
        resized.add(id(module))
    for module in slimmed.modules():
        if id(module) in resized:
            _resize_attributes(module)
    return slimmed


def kept_count(size: int, fraction: float, multiple_of: int = 1) -> int:
    """How many of ``size`` channels to keep for ``fraction``, rounded to a multiple of
    ``multiple_of`` (e.g. M, so that N:M still fits the slimmed layers), at least one
    multiple."""
    count = round(size * fraction / multiple_of) * multiple_of
    return max(multiple_of, min(size - size % multiple_of or size, count))
