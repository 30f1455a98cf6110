"""Coupled channels: which slices of which tensors must be permuted (or pruned) together.

A :class:`ChannelGroup` is a run of ``size`` channels that several tensors of a model index
in the same order: the producers that write them (a Linear/conv weight's rows, its bias, an
embedding's columns), the layers that follow them one to one (BatchNorm / LayerNorm
parameters and statistics, a depthwise conv's filters, a parameter added to them) and the
consumers that read them (a Linear/conv weight's input columns). Applying the same
permutation to every member slice leaves the network's function unchanged; a group is
``pinned`` (with the reasons) when some use of its channels is not known to allow that (the
model's input or output, a split into attention heads, a grouped conv, an unknown op).

Groups come from :func:`nmsparse.channels.channel_graph` (traced), or can be written by hand
(the manual override where tracing does not fit a model).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

ROLES = ("producer", "follower", "consumer")


@dataclass(frozen=True)
class Slice:
    """Channels ``start .. start+length`` of dimension ``dim`` of the model tensor ``tensor``
    (a qualified parameter or buffer name)."""

    tensor: str
    dim: int
    start: int
    length: int
    role: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown slice role {self.role!r}; accepted: {', '.join(ROLES)}")


@dataclass
class ChannelGroup:
    """``size`` coupled channels and every tensor slice indexed by them."""

    size: int
    members: list[Slice] = field(default_factory=list)
    pinned: list[str] = field(default_factory=list)  # why these channels may not move
    notes: list[str] = field(default_factory=list)  # uses that allow moving, not removing

    @property
    def free(self) -> bool:
        return not self.pinned

    def role(self, role: str) -> list[Slice]:
        return [s for s in self.members if s.role == role]

    @property
    def producers(self) -> list[Slice]:
        return self.role("producer")

    @property
    def consumers(self) -> list[Slice]:
        return self.role("consumer")

    def describe(self) -> str:
        names = lambda role: ", ".join(sorted({s.tensor for s in self.role(role)}))  # noqa: E731
        state = "free" if self.free else "pinned: " + "; ".join(dict.fromkeys(self.pinned))
        return (f"{self.size} channels ({state}) produced by [{names('producer')}] "
                f"read by [{names('consumer')}] followed by [{names('follower')}]")


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``model`` by qualified name (shared ones under each)."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    return tensors


def check_groups(model: nn.Module, groups: Iterable[ChannelGroup]) -> None:
    """Raise ``ValueError`` if a slice names a tensor ``model`` lacks or lies outside it."""
    tensors = model_tensors(model)
    for group in groups:
        for piece in group.members:
            tensor = tensors.get(piece.tensor)
            if tensor is None:
                raise ValueError(f"channel group names {piece.tensor!r}, which is not a "
                                 "parameter or buffer of the model")
            if not 0 <= piece.dim < tensor.dim() or piece.start < 0 \
                    or piece.length != group.size \
                    or piece.start + piece.length > tensor.shape[piece.dim]:
                raise ValueError(f"slice {piece} does not fit {piece.tensor} of shape "
                                 f"{tuple(tensor.shape)} in a group of {group.size} channels")


def permute_group(model: nn.Module, group: ChannelGroup, order: torch.Tensor) -> None:
    """Reorder the channels of ``group`` in every member: channel ``i`` of the result is
    channel ``order[i]`` before. The model computes the same function when the group is
    complete and free."""
    if group.pinned:
        raise ValueError(f"cannot permute a pinned channel group ({group.describe()})")
    order = torch.as_tensor(order, dtype=torch.long)
    if sorted(order.tolist()) != list(range(group.size)):
        raise ValueError(f"order must be a permutation of 0..{group.size - 1}")
    tensors = model_tensors(model)
    done: set[tuple[int, int, int]] = set()  # a shared Parameter is moved once per slice
    with torch.no_grad():
        for piece in group.members:
            tensor = tensors[piece.tensor]
            key = (id(tensor), piece.dim, piece.start)
            if key in done:
                continue
            done.add(key)
            window = tensor.narrow(piece.dim, piece.start, piece.length)
            window.copy_(window.index_select(piece.dim, order.to(tensor.device)))
