"""Checkpoints: written atomically, read with ``weights_only=True`` (no code runs from a file).

A checkpoint holds only tensors and plain containers: model and optimizer state, the
scheduler/scaler state, counters, RNG state, the SAD history, the resolved configuration and
what the model was built for (input shape, classes, task), so a run can be summarised and
exported without its data set. Every way a file can fail to be a checkpoint (missing, empty,
truncated, another program's file, a pickle with arbitrary objects) is a one-line
:class:`CheckpointError`.
"""

from __future__ import annotations

import io
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from ...atomic import atomic_open
from .run_dir import LATEST

BEST = "best.pt"
FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint or run folder that cannot be used."""


def to_bytes(payload: dict[str, Any]) -> bytes:
    """The checkpoint file's bytes. Serialised in memory: torch reports a failed write (a
    full disk) as a RuntimeError from deep inside its zip writer; a plain file write gives the
    real OSError."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **payload}, buffer)
    return buffer.getvalue()


def save(path: Path, payload: dict[str, Any]) -> None:
    data = to_bytes(payload)
    with atomic_open(path, "wb") as file:
        file.write(data)


def _why_unreadable(path: Path, error: BaseException) -> str:
    # What the file is comes first: torch blames "weights only" for any bytes it cannot read.
    if path.stat().st_size == 0:
        return "the file is empty (0 bytes; an interrupted copy?)"
    with open(path, "rb") as file:
        head = file.read(4)
    if head.startswith(b"PK") and not zipfile.is_zipfile(path):
        return "the file is truncated or damaged"
    if head.lstrip()[:1] in (b"{", b"["):
        return "it is a JSON or text file, not a PyTorch checkpoint"
    if not head.startswith(b"PK") and not head.startswith(b"\x80"):
        return ("it is not a PyTorch checkpoint (neither the zip archive torch.save writes "
                "nor a pickle)")
    if isinstance(error, pickle.UnpicklingError) and "weights only" in str(error).lower():
        # torch's message advises weights_only=False: exactly what must never be done here
        return ("it holds Python objects other than tensors and plain containers, which "
                "nmsparse never loads (loading them could run code from the file)")
    return "the file is damaged or not a PyTorch checkpoint"


def resolve(path: str | Path) -> Path:
    """The checkpoint file ``path`` names: itself, or ``latest.pt`` of a run folder."""
    path = Path(path)
    if path.is_dir():
        file = path / LATEST
        if file.is_symlink():
            raise CheckpointError(f"{str(file)!r} is a symbolic link; nmsparse does not follow "
                                  "links inside a run folder")
        if not file.is_file():
            raise CheckpointError(f"{str(path)!r} holds no run (no {LATEST}); expected a "
                                  "folder written by 'nmsparse train'")
        return file
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is not a file")
    return path


def load(path: str | Path) -> dict[str, Any]:
    path = resolve(path)
    try:
        with warnings.catch_warnings():  # torch's notes on foreign pickles: the error says it
            warnings.simplefilter("ignore", UserWarning)
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except Exception as error:  # torch raises several types for a damaged file
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read: "
                              f"{_why_unreadable(path, error)}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not an nmsparse checkpoint "
                              f"(format {FORMAT})")
    missing = [key for key in ("config", "model", "epoch", "phase") if key not in payload]
    if missing or not isinstance(payload["config"], dict):
        raise CheckpointError(f"{str(path)!r} is not a complete nmsparse checkpoint "
                              f"(missing {', '.join(missing) or 'a valid config'})")
    return payload


def load_weights(model: torch.nn.Module, state: Any, source: str) -> None:
    """``model.load_state_dict(state)``; saved weights that do not fit the model (other
    shapes, other names) are a one-line :class:`CheckpointError` naming ``source``."""
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError, KeyError) as error:
        raise CheckpointError(f"{source}: the saved weights do not fit the model its "
                              "configuration builds: "
                              f"{' '.join(str(error).split())[:300]}") from None


def describes_data(payload: dict[str, Any]) -> bool:
    """Whether a checkpoint records input shape, classes and task (written since 0.1)."""
    info = payload.get("data_info")
    return isinstance(info, dict) and {"input_shape", "num_classes", "task"} <= set(info)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

