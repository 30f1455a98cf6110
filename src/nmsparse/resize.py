"""``resize_token_embeddings``: Hugging Face's vocabulary resize for a model whose LM head
(or the embedding tied to it) is sparse.

``model.resize_token_embeddings`` builds a new embedding and a new head module, so a sparse
head would silently become a plain dense ``nn.Linear`` (and a sparse head tied to the
embedding breaks transformers' re-tying). This wrapper lets go of the sparse head without
changing its dense weight, runs the resize, and makes the new head sparse again in the same
handle: the rows that existed keep their mask exactly (a fixed or ASP mask survives), new
rows get the method's initial mask, rows cut off are dropped. Only N:M patterns qualify:
their groups lie inside a row, so the kept rows' masks stay valid whatever the row count.
The method's per-weight state starts afresh on the new weight (its shape changed).
Create the optimizer after resizing: the head is a new Parameter.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .engine.handle import LayerReport
from .engine.selection import parameter_holders
from .engine.sparse_module import (
    attach,
    attach_tied,
    detach,
    detach_tied,
    sparse_states,
    tied_states,
)
from .engine.sparse_weight import SparseWeight
from .patterns import NM


def _embedding_weights(model: nn.Module) -> list[SparseWeight]:
    """The sparse weights the input embedding or the output head holds or reads."""
    found: dict[int, SparseWeight] = {}
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None:
            for w in (*sparse_states(module).values(), *tied_states(module).values()):
                found[id(w)] = w
    return list(found.values())


def _release(model: nn.Module, weights: list[SparseWeight]) -> None:
    """Make the layers plain again without touching their dense weights."""
    for w in weights:
        detach(w.module, [w.param_name], bake=False)
    for module in model.modules():
        if tied_states(module):
            detach_tied(module, weights)


def _remake(model: nn.Module, saved: list[tuple[SparseWeight, str, torch.Tensor]]) -> None:
    """Make the (possibly new) module at each saved name sparse again in the same handle."""
    holders = parameter_holders(model)
    for old, module_name, old_mask in saved:
        module = model.get_submodule(module_name)
        w = SparseWeight(module, old.param_name, old.name, old.pattern, old.method, old.handle)
        if tuple(w.dense.shape) == tuple(old_mask.shape):
            mask, w.state = old_mask, old.state
        else:
            mask = w.initial_mask().clone()
            rows = min(mask.shape[0], old_mask.shape[0])
            mask[:rows] = old_mask[:rows].to(mask.device)
        w.validate_mask(mask, "the resized mask")
        attach(module, w, mask.contiguous())
        w.refresh()
        for _, reader, param in holders.get(id(w.dense), ()):
            if (reader, param) != (module, w.param_name):
                attach_tied(reader, param, w)
        handle = old.handle
        if handle is not None:
            handle.weights[w.name] = w
            handle.layers = [
                LayerReport(r.name, r.kind, tuple(w.dense.shape), r.pattern, r.reason, r.method)
                if r.name == w.name else r for r in handle.layers]


def resize_token_embeddings(model: nn.Module, new_num_tokens: int | None = None,
                            pad_to_multiple_of: int | None = None, **kwargs: Any) -> Any:
    """``model.resize_token_embeddings(...)`` (same arguments, same result) that keeps a
    sparse LM head sparse; a model whose head and embedding are dense is simply resized."""
    if not callable(getattr(model, "resize_token_embeddings", None)):
        raise ValueError(f"resize_token_embeddings needs a Hugging Face PreTrainedModel, got "
                         f"{type(model).__name__}")
    weights = _embedding_weights(model)
    for w in weights:
        if not isinstance(w.pattern, NM):
            raise ValueError(f"cannot resize sparse weight {w.name!r} with pattern {w.pattern}: "
                             "only N:M patterns keep their masks across a resize (groups lie "
                             "inside a row); call nmsparse.finalize(model) before resizing")
        if w._shard() is not None:
            raise ValueError(f"cannot resize sharded sparse weight {w.name!r}: resize before "
                             "fully_shard")
    if not weights:
        return model.resize_token_embeddings(new_num_tokens, pad_to_multiple_of, **kwargs)
    names = {id(module): name for name, module in model.named_modules()}
    saved = [(w, names[id(w.module)], w.mask.detach().clone()) for w in weights]
    _release(model, weights)
    try:
        result = model.resize_token_embeddings(new_num_tokens, pad_to_multiple_of, **kwargs)
    except BaseException:
        _remake(model, saved)  # whatever modules are there now get their layers back
        raise
    _remake(model, saved)
    return result
