"""Running calibration data through a model one transformer block at a time.

Sequential pruning (as in SparseGPT and Wanda) needs each block's input as produced by the
already pruned blocks before it, but holding every block's activations would cost memory
proportional to depth. :class:`BlockRunner` keeps one hidden-state tensor per calibration
batch: it runs the model up to the first block once (a forward pre-hook records the first
block's arguments and stops the forward), then each block in turn on those cached states,
replacing them by the block's outputs. Memory stays at one block's input for the whole
calibration set, whatever the depth (``peak_cached_bytes`` measures it).

The blocks are found by :func:`find_blocks`: the ``nn.ModuleList`` of identical modules that
holds the most parameters, among those whose members contain a prunable layer (the project's
GPT ``blocks``, Llama's ``model.layers``, GPT-2's ``transformer.h``). The chain is verified on
the first calibration batch: every block must be called once, in order, on the previous
block's output. If no such list exists or the check fails, the caller falls back to one
whole-model pass (see :mod:`nmsparse.oneshot.prune`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

Batch = Any


class _Stop(Exception):
    """Raised by the capture hook to end a forward pass at the first block."""


def call_model(model: nn.Module, batch: Batch, device: torch.device) -> Any:
    """Run ``model`` on a calibration batch: a tensor is the input, a mapping gives keyword
    arguments (``input_ids=...``), a tuple or list is ``(inputs, targets, ...)`` as data
    loaders yield it and its first element is the input."""
    if isinstance(batch, torch.Tensor):
        return model(batch.to(device))
    if isinstance(batch, Mapping):
        return model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v
                        for k, v in batch.items()})
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return model(batch[0].to(device))
    raise ValueError(f"a calibration batch must be a tensor of inputs, a mapping of keyword "
                     f"arguments, or an (inputs, targets) pair; got {type(batch).__name__}")


def _hidden(output: Any) -> torch.Tensor:
    """A block's output hidden states (Hugging Face blocks may return a tuple)."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise ValueError(f"a transformer block returned {type(output).__name__}; expected the "
                         "hidden states (a tensor, or a tuple starting with one)")
    return output


def find_blocks(model: nn.Module, has_target: Callable[[nn.Module], bool]
                ) -> tuple[str, nn.ModuleList] | None:
    """``(name, blocks)`` of the model's repeated blocks, or ``None`` if it has none."""
    best, best_size = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(block) for block in module}) != 1 \
                or not all(has_target(block) for block in module):
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = (name, module), size
    return best


def is_chain(model: nn.Module, blocks: Sequence[nn.Module], batch: Batch,
             device: torch.device) -> bool:
    """Whether one forward of ``batch`` calls every block once, in order, each on the
    previous block's output (compared by storage, so nothing is kept)."""
    calls: list[tuple[int, int, int]] = []
    handles = []

    def before(index):
        def hook(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()), None)
            calls.append((index, x.data_ptr() if isinstance(x, torch.Tensor) else -1, -1))
        return hook

    def after(index):
        def hook(module, args, kwargs, output):
            i, pointer, _ = calls[-1]
            calls[-1] = (i, pointer, _hidden(output).data_ptr())
        return hook

    try:
        for index, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(before(index), with_kwargs=True))
            handles.append(block.register_forward_hook(after(index), with_kwargs=True))
        call_model(model, batch, device)
    finally:
        for handle in handles:
            handle.remove()
    if [i for i, _, _ in calls] != list(range(len(blocks))):
        return False
    return all(calls[i + 1][1] == calls[i][2] for i in range(len(calls) - 1))


class BlockRunner:
    """The cached inputs of the current block, one entry per calibration batch."""

    def __init__(self) -> None:
        self.hidden: list[torch.Tensor] = []
        self.extras: list[tuple[tuple, dict]] = []  # other args and kwargs, the same per block
        self.peak_cached_bytes = 0

    def _note(self, extra: int = 0) -> None:
        total = sum(t.numel() * t.element_size() for t in self.hidden) + extra
        self.peak_cached_bytes = max(self.peak_cached_bytes, total)

    def capture(self, model: nn.Module, first: nn.Module, batches: Sequence[Batch],
                device: torch.device) -> None:
        """Run the model up to ``first`` (the first block) on every batch."""
        def hook(module, args, kwargs):
            if args:
                hidden, rest = args[0], args[1:]
            else:  # hidden states passed by keyword
                key = next(iter(kwargs))
                hidden, rest = kwargs.pop(key), ()
                kwargs = {"__hidden_key__": key, **kwargs}
            self.hidden.append(hidden.detach())
            self.extras.append((rest, dict(kwargs)))
            self._note()
            raise _Stop

        handle = first.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            for batch in batches:
                with contextlib.suppress(_Stop):
                    call_model(model, batch, device)
        finally:
            handle.remove()
        if len(self.hidden) != len(batches):
            raise ValueError("the first transformer block was not reached by every "
                             "calibration batch")

    def run(self, block: nn.Module, *, replace: bool) -> None:
        """Run ``block`` on every cached input; with ``replace`` its outputs become the
        cached inputs of the next block."""
        for index, (hidden, (rest, kwargs)) in enumerate(zip(self.hidden, self.extras,
                                                             strict=True)):
            kwargs = dict(kwargs)
            key = kwargs.pop("__hidden_key__", None)
            output = (block(*rest, **{key: hidden}, **kwargs) if key is not None
                      else block(hidden, *rest, **kwargs))
            output = _hidden(output).detach()
            if replace:
                self._note(output.numel() * output.element_size())
                self.hidden[index] = output

    def clear(self) -> None:
        self.hidden.clear()
        self.extras.clear()
