"""The study's figures, from run records alone: accuracy and SAD curves with seed bands, the
SAD-vs-accuracy scatter, and the final per-layer density. Each function returns the paths
it wrote (empty when the records hold nothing to draw); ``prefix`` names the files."""

from __future__ import annotations

from pathlib import Path

from .records import RunRecord, decay_groups, main_groups

ORDER = {p: i for i, p in enumerate(("dense", "2:4", "4:8", "1:4", "2:8", "1:8", "1:16"))}
COLORS = {"dense": "black", "ste": "tab:red", "srste": "tab:blue", "asp": "tab:green",
          "asp-1x": "tab:olive"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(row: str) -> str:
    return {"srste": "SR-STE", "ste": "STE", "asp": "ASP (2x)", "asp-1x": "ASP (1x)"}.get(
        row, row)


def _band(ax, runs: list[RunRecord], series, label: str, color: str | None) -> None:
    """Mean over seeds with a min-max band; series(run) -> (xs, ys), aligned by x."""
    table: dict[float, list[float]] = {}
    for run in runs:
        for x, y in zip(*series(run), strict=True):
            table.setdefault(x, []).append(y)
    xs = sorted(x for x in table if len(table[x]) == len(runs))  # steps every seed logged
    if not xs:
        return
    mean = [sum(table[x]) / len(table[x]) for x in xs]
    line, = ax.plot(xs, mean, lw=1.3, color=color, label=f"{label} (n={len(runs)})")
    if len(runs) > 1:
        ax.fill_between(xs, [min(table[x]) for x in xs], [max(table[x]) for x in xs],
                        color=line.get_color(), alpha=0.2, lw=0)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _plt().close(fig)
    return path


def _sad_series(key: str):
    return lambda r: ([row["step"] for row in r.sad], [row[key] for row in r.sad])


def plot_sad(records: list[RunRecord], images: Path, prefix: str = "study") -> list[Path]:
    """SAD per logged interval and vs the initial mask, per pattern, every row whose mask
    moves, mean over seeds with the min-max band."""
    plt = _plt()
    main = main_groups(records)
    patterns = sorted({p for (m, p) in main if m in ("ste", "srste")},
                      key=lambda p: ORDER.get(p, 99))
    if not patterns:
        return []
    fig, axes = plt.subplots(2, len(patterns), figsize=(3.3 * len(patterns), 5.6),
                             squeeze=False)
    for col, pattern in enumerate(patterns):
        for row in ("ste", "srste"):
            rs = [r for r in main.get((row, pattern), []) if r.sad]
            if rs:
                _band(axes[0][col], rs, _sad_series("sad_prev_frac"), _label(row), COLORS[row])
                _band(axes[1][col], rs, _sad_series("sad_init_frac"), _label(row), COLORS[row])
        axes[0][col].set(title=f"{pattern}: flips per interval", yscale="log")
        axes[1][col].set(title=f"{pattern}: differs from initial mask", xlabel="step")
        axes[0][col].legend(fontsize=7)
    axes[0][0].set_ylabel("fraction of weights")
    axes[1][0].set_ylabel("fraction of weights")
    return [_save(fig, images / f"{prefix}-sad.png")]


def plot_sad_decay(records: list[RunRecord], images: Path, prefix: str = "study") -> list[Path]:
    """SAD per interval across the SR-STE decay sweep (seed bands)."""
    sweep = decay_groups(records)
    if not sweep:
        return []
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    cmap = plt.get_cmap("viridis")
    for i, decay in enumerate(sorted(sweep)):
        rs = [r for r in sweep[decay] if r.sad]
        _band(ax, rs, _sad_series("sad_prev_frac"), f"decay {decay:g}",
              cmap(i / max(1, len(sweep) - 1)))
    pattern = next(iter(sweep.values()))[0].pattern
    ax.set(title=f"SR-STE {pattern}: SAD per logged interval by decay", xlabel="step",
           ylabel="fraction of weights flipped", yscale="log")
    ax.legend(fontsize=7)
    return [_save(fig, images / f"{prefix}-sad-decay.png")]


def plot_sad_scatter(records: list[RunRecord], images: Path,
                     prefix: str = "study") -> list[Path]:
    """Final accuracy against SAD summed over training of the main table's STE and SR-STE
    runs, one panel per pattern."""
    moving = [r for (row, _), rs in main_groups(records).items() if row in ("ste", "srste")
              for r in rs if r.sad]
    patterns = sorted({r.pattern for r in moving}, key=lambda p: ORDER.get(p, 99))
    if not patterns:
        return []
    plt = _plt()
    fig, axes = plt.subplots(1, len(patterns), figsize=(3.3 * len(patterns), 3.3),
                             squeeze=False)
    for ax, pattern in zip(axes[0], patterns, strict=False):
        for method in ("ste", "srste"):
            rs = [r for r in moving if r.pattern == pattern and r.method == method]
            ax.scatter([r.sad_total for r in rs], [r.score for r in rs], s=14,
                       color=COLORS[method], label=_label(method))
        ax.set(title=pattern, xlabel="SAD summed over training")
        ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("test top-1 %")
    return [_save(fig, images / f"{prefix}-sad-accuracy.png")]


def plot_curves(records: list[RunRecord], images: Path, prefix: str = "study") -> list[Path]:
    """Test accuracy per epoch of the main table's rows, mean over seeds with the band."""
    main = main_groups(records)
    if not main:
        return []
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.set_prop_cycle(color=[plt.get_cmap("tab20")(i) for i in range(20)])
    for (row, pattern), rs in sorted(main.items(), key=lambda kv: (ORDER.get(kv[0][1], 99),
                                                                   kv[0][0])):
        def series(r: RunRecord):
            epochs = [m for m in r.metrics if m.get("kind") == "epoch"]
            return [m["epoch"] for m in epochs], [100 * m["test_acc"] for m in epochs]

        _band(ax, rs, series, f"{_label(row)} {pattern}", None)
    ax.set(xlabel="epoch (ASP: dense phase, then retrain)", ylabel="test top-1 %",
           title="Test accuracy during training")
    ax.legend(fontsize=6, ncol=2)
    return [_save(fig, images / f"{prefix}-curves.png")]


def plot_density(records: list[RunRecord], images: Path, prefix: str = "study") -> list[Path]:
    """Final per-layer density (kept / dense weights) of the main table's sparse rows."""
    main = main_groups(records)
    keys = [k for k in sorted(main) if k[0] != "dense"]
    if not keys:
        return []
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 3.6))
    width = 0.8 / len(keys)
    names: list[str] = []
    for i, key in enumerate(keys):
        rows = [row for row in main[key][0].summary["summary"]["rows"] if row["macs_dense"]]
        names = [row["name"] for row in rows]
        ax.bar([j + i * width for j in range(len(rows))], [row["density"] for row in rows],
               width, label=f"{_label(key[0])} {key[1]}")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, rotation=70,
                  fontsize=7)
    ax.set(ylabel="final density (kept / all)", title="Final per-layer density")
    ax.legend(fontsize=6, ncol=4)
    return [_save(fig, images / f"{prefix}-density.png")]


FIGURES = (plot_curves, plot_sad, plot_sad_decay, plot_sad_scatter, plot_density)
