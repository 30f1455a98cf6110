"""Checkpoints: written atomically, read with ``weights_only=True`` (no code runs from a file).

A checkpoint holds only tensors and plain containers: model and optimizer state, the
scheduler/scaler state, counters, RNG state, the SAD history and the resolved configuration.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .._atomic import atomic_open

LATEST, BEST = "latest.pt", "best.pt"
FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint or run folder that cannot be used."""


def save(path: Path, payload: dict[str, Any]) -> None:
    with atomic_open(path, "wb") as file:
        torch.save({"format": FORMAT, **payload}, file)


def load(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / LATEST
        if not path.is_file():
            raise CheckpointError(f"{str(path.parent)!r} holds no run (no {LATEST}); "
                                  "expected a folder written by 'nmsparse train --out'")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a damaged file
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read: "
                              f"{str(error).splitlines()[0]}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not an nmsparse checkpoint "
                              f"(format {FORMAT})")
    return payload


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
