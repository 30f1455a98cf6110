"""PNG plots of a run, drawn from its logs: loss and accuracy curves, SAD per layer over
training, and the final per-layer density.

A curve of a single logged point is drawn as a marker (a line needs two); the start of ASP's
fixed-mask retraining is marked on every plot over steps. Each PNG is rendered in memory and
written atomically, so a link planted in the run folder is replaced, never followed.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from ...atomic import atomic_open


class PlotsUnavailable(RuntimeError):
    """matplotlib is not installed: the run is fine, it just has no PNGs."""


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise PlotsUnavailable("matplotlib is not installed (a dependency of nmsparse: "
                               "pip install matplotlib)") from None

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    return plt


def plot_run(run_dir: Path, records: list[dict[str, Any]], sad_history: dict[str, list],
             densities: dict[str, float], sad_interval: int = 1) -> list[Path]:
    """Write the run's PNGs into ``run_dir`` and return their paths."""
    plt = _pyplot()
    written = []
    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]

    def save(fig, name: str) -> None:
        fig.tight_layout()
        image = io.BytesIO()
        fig.savefig(image, format="png", dpi=110)
        plt.close(fig)
        with atomic_open(run_dir / name, "wb") as file:
            file.write(image.getvalue())
        written.append(run_dir / name)

    # where each later phase starts: the last step of the phase before (ASP: the prune)
    boundaries = [(earlier["step"], later["phase"])
                  for earlier, later in zip(epochs, epochs[1:], strict=False)
                  if later.get("phase") != earlier.get("phase")]

    def mark_phases(*axes) -> None:
        for step, phase in boundaries:
            for ax in axes:
                ax.axvline(step, color="grey", ls="--", lw=0.8)
            axes[0].annotate(f" {phase}", (step, 1), xycoords=("data", "axes fraction"),
                             va="top", fontsize=7, color="grey")

    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    loss_ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.8,
                 marker="." if len(steps) < 3 else None, label="train (step)")
    loss_ax.plot([r["step"] for r in epochs], [r["test_loss"] for r in epochs], "o-",
                 label="test (epoch)")
    loss_ax.set(xlabel="step", ylabel="loss", title="Loss")
    loss_ax.legend()
    acc_ax.plot([r["step"] for r in epochs], [r["train_acc"] for r in epochs], "o-",
                label="train")
    acc_ax.plot([r["step"] for r in epochs], [r["test_acc"] for r in epochs], "o-",
                label="test")
    acc_ax.set(xlabel="step", ylabel="accuracy", title="Accuracy")
    acc_ax.legend()
    mark_phases(loss_ax, acc_ax)
    save(fig, "curves.png")

    if sad_history.get("step"):
        layers = [k.split("/", 1)[1] for k in sad_history if k.startswith("sad_prev/")]
        fig, (prev_ax, init_ax) = plt.subplots(1, 2, figsize=(10, 4))
        marker = "o" if len(sad_history["step"]) < 3 else None  # one point: no line to draw
        for layer in layers:
            prev_ax.plot(sad_history["step"], sad_history[f"sad_prev/{layer}"], lw=0.8,
                         marker=marker, label=layer)
            init_ax.plot(sad_history["step"], sad_history[f"sad_init/{layer}"], lw=0.8,
                         marker=marker, label=layer)
        mark_phases(prev_ax, init_ax)
        prev_ax.set(xlabel="step", ylabel="flipped mask entries",
                    title=f"SAD over the last {sad_interval} step(s)")
        init_ax.set(xlabel="step", ylabel="flipped mask entries", title="SAD vs initial mask")
        if len(layers) <= 12:
            init_ax.legend(fontsize=7)
        prev_ax.set_yscale("symlog")
        save(fig, "sad.png")

    if densities:
        fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(densities)), 4))
        ax.bar(range(len(densities)), list(densities.values()))
        ax.set_xticks(range(len(densities)), list(densities), rotation=90, fontsize=7)
        ax.set(ylabel="kept fraction", ylim=(0, 1.05), title="Per-layer density")
        save(fig, "density.png")
    return written
