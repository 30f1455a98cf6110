"""What :func:`~nmsparse.kernels.accelerate` (or :func:`~nmsparse.kernels.plan`) did with
every ``nn.Linear`` of a model: converted with its backend, or why it stayed dense."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..tables import format_table


@dataclass
class LayerResult:
    """One ``nn.Linear`` of the model: converted (with its backend) or why it stayed dense."""

    name: str
    shape: tuple[int, int]  # (out, in)
    dtype: torch.dtype
    status: str = "skipped"  # "converted", "eligible" (plan only) or "skipped"
    backend: str = ""
    reason: str = ""
    padded: tuple[int, int] | None = None
    timings_us: dict[str, float] = field(default_factory=dict)

    @property
    def converted(self) -> bool:
        return self.status == "converted"

    def note(self) -> str:
        parts = [self.reason] if self.reason else []
        if self.padded and self.padded != self.shape:
            parts.append(f"padded to {self.padded[0]}x{self.padded[1]}")
        if self.timings_us:
            parts.append("timed " + ", ".join(f"{b} {t:.1f} us"
                                              for b, t in self.timings_us.items()))
        return "; ".join(parts)


@dataclass
class AccelerateReport:
    """What :func:`accelerate` (or :func:`plan`) did with every ``nn.Linear`` of the model."""

    backend: str
    layers: list[LayerResult] = field(default_factory=list)
    device: str = ""
    notes: list[str] = field(default_factory=list)  # e.g. a backend that cannot run here

    @property
    def converted(self) -> list[LayerResult]:
        return [layer for layer in self.layers if layer.converted]

    @property
    def skipped(self) -> list[LayerResult]:
        return [layer for layer in self.layers if layer.status == "skipped"]

    def table(self) -> str:
        rows = [[layer.name, "x".join(map(str, layer.shape)),
                 str(layer.dtype).removeprefix("torch."), layer.status,
                 layer.backend or "-", layer.note()] for layer in self.layers]
        return format_table(["layer", "shape", "dtype", "status", "backend", "note"], rows)

    def __str__(self) -> str:
        done = len(self.converted)
        eligible = sum(layer.status == "eligible" for layer in self.layers)
        what = (f"{done} of {len(self.layers)} Linear layer(s) converted to 2:4 "
                f"semi-structured" if not eligible else
                f"{eligible} of {len(self.layers)} Linear layer(s) eligible for 2:4 "
                "semi-structured (plan only, nothing converted)")
        where = f" on {self.device}" if self.device else ""
        notes = "".join(f"\nnote: {note}" for note in self.notes)
        return f"accelerate: {what}, backend={self.backend}{where}{notes}\n{self.table()}"
