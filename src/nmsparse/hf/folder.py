"""Hugging Face causal LM folders: recognise, check, load and write them.

A folder is a Hugging Face model folder when its ``config.json`` names a ``model_type``
(an nmsparse run folder's ``config.json`` does not). It is read with
``AutoModelForCausalLM.from_pretrained`` from the local files only (nothing is downloaded),
from safetensors only (no pickle), and never with ``trust_remote_code``: a config that asks
for code of its own (``auto_map``) is refused, as is a ``model_type`` that transformers does
not know as a causal language model.

A pruned folder (:func:`write_pruned`) is what ``save_pretrained`` writes (the pruned weights
with their zeros baked in, loadable by plain transformers; in shards of at most 500 MB, since
safetensors builds each file in memory), the tokenizer files of the source
folder, and nmsparse's own files: ``masks.safetensors`` (``<weight>_mask`` bool tensors, what
:func:`nmsparse.saved_masks` reads), ``prune.json`` (what was done) and, on request, the packed
file ``model.packed.safetensors``. Everything is first written into a hidden temporary folder
inside it and moved into place only when all of it succeeded (``nmsparse prune`` claims the
folder first, like an export folder, and removes it again if the write fails).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import _umask, atomic_open

CONFIG = "config.json"
REPORT = "prune.json"
MASKS = "masks.safetensors"
SHARD = "500MB"
PACKED = "model.packed.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
                   "tokenizer.model", "spiece.model", "chat_template.jinja",
                   "chat_template.json")
DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


def read_config(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The folder's ``config.json`` as a dict, or ``None`` if it is not a Hugging Face model
    folder (no such file, or one without ``model_type``)."""
    file = Path(path) / CONFIG
    if not Path(path).is_dir() or not file.is_file():
        return None
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return config if isinstance(config, dict) and "model_type" in config else None


def is_hf_folder(path: str | os.PathLike[str]) -> bool:
    return read_config(path) is not None


def check_folder(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The config of a causal LM folder nmsparse may load, or a one-line ``ValueError``."""
    config = read_config(path)
    if config is None:
        raise ValueError(f"{str(path)!r} is not a Hugging Face model folder (expected a "
                         f"{CONFIG} with a model_type, and safetensors weights)")
    if "auto_map" in config or config.get("trust_remote_code"):
        raise ValueError(f"{str(path)!r} asks for the model's own code (auto_map in its "
                         f"{CONFIG}); nmsparse never runs code a model folder ships: use a "
                         "model type transformers knows")
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config["model_type"]
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"{str(path)!r} holds a {model_type!r} model, which transformers "
                         "does not load as a causal language model (AutoModelForCausalLM)")
    if not any(Path(path).glob("*.safetensors")):
        raise ValueError(f"{str(path)!r} has no .safetensors weights (nmsparse reads "
                         "safetensors only, never pickled .bin files)")
    return config


def parse_dtype(name: str) -> Any:
    if name not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def load_causal_lm(path: str | os.PathLike[str], dtype: str = "auto",
                   device: torch.device | str = "cpu") -> nn.Module:
    """The model of a checked folder, in evaluation mode (see the module docstring)."""
    check_folder(path)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=parse_dtype(dtype), local_files_only=True, trust_remote_code=False,
        use_safetensors=True)
    return model.to(device).eval()


def output_head(model: nn.Module) -> str | None:
    """The module name of the language-model head (``lm_head``), or ``None``."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return next((name for name, module in model.named_modules() if module is head), None)


def _save_masks(masks: Mapping[str, torch.Tensor], target: Path) -> None:
    """``<weight>_mask`` bool tensors as one safetensors file, streamed one mask at a time
    (a 1B model's masks are a gigabyte: no second copy of them is built in memory)."""
    from ..engine.masks import MASK_SUFFIX

    header: dict[str, Any] = {"__metadata__": {"format": "nmsparse-masks"}}
    offset = 0
    for name, mask in masks.items():
        header[name + MASK_SUFFIX] = {"dtype": "BOOL", "shape": list(mask.shape),
                                      "data_offsets": [offset, offset + mask.numel()]}
        offset += mask.numel()
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with atomic_open(target, "wb") as file:
        file.write(len(text).to_bytes(8, "little"))
        file.write(text)
        for mask in masks.values():
            file.write(mask.detach().to("cpu", torch.bool).contiguous().numpy().tobytes())


def write_pruned(model: nn.Module, folder: str | os.PathLike[str], *,
                 source: str | os.PathLike[str], masks: Mapping[str, torch.Tensor],
                 report: Mapping[str, Any], packed: Callable[[Path], Any] | None = None,
                 release_masks: Callable[[], None] | None = None) -> list[Path]:
    """Write the pruned ``model`` into the existing ``folder`` (see the module docstring; the
    caller decides whether the folder may be written, as the command line's run-folder rules
    do); ``packed`` writes the packed file to the path it is given; ``release_masks``: called
    once the masks are on disk, to free them before the weights are written. All files are
    staged and moved in at the end: a failure leaves the folder as it was. Returns the files
    written."""
    folder = Path(folder)
    staging = None
    try:
        for stale in folder.glob(".pruned.*.tmp"):  # left by a killed writer
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=".pruned.", suffix=".tmp", dir=folder))
        _save_masks(masks, staging / MASKS)
        if release_masks is not None:
            release_masks()  # written: their memory is needed for the weights' shards
        # safetensors builds each file in memory: shards bound that to SHARD per file
        model.save_pretrained(staging, max_shard_size=SHARD)
        for name in TOKENIZER_FILES:
            if (Path(source) / name).is_file():
                shutil.copyfile(Path(source) / name, staging / name)
        if packed is not None:
            packed(staging / PACKED)
        with atomic_open(staging / REPORT, "w", encoding="utf-8") as file:
            file.write(json.dumps(report, indent=2) + "\n")
        written = []
        mode = 0o666 & ~_umask()  # save_pretrained may write 0600 files
        for entry in sorted(staging.iterdir()):
            os.chmod(entry, mode)
            os.replace(entry, folder / entry.name)
            written.append(folder / entry.name)
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    with contextlib.suppress(OSError):
        staging.rmdir()
    return written
