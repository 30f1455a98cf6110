"""PNG plots of a run, drawn from its logs: loss and accuracy curves, SAD per layer over
training, and the final per-layer density."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

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
        fig.savefig(run_dir / name, dpi=110)
        plt.close(fig)
        written.append(run_dir / name)

    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    loss_ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.8,
                 label="train (step)")
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
    save(fig, "curves.png")

    if sad_history.get("step"):
        layers = [k.split("/", 1)[1] for k in sad_history if k.startswith("sad_prev/")]
        fig, (prev_ax, init_ax) = plt.subplots(1, 2, figsize=(10, 4))
        for layer in layers:
            prev_ax.plot(sad_history["step"], sad_history[f"sad_prev/{layer}"], lw=0.8,
                         label=layer)
            init_ax.plot(sad_history["step"], sad_history[f"sad_init/{layer}"], lw=0.8,
                         label=layer)
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
