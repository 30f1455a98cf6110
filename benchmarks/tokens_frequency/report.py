"""Write ``docs/tokens_frequency.md`` and ``docs/images/tokens-*.png`` / ``frequency-*.png``
from the run folders alone: ``summary.json`` and ``config.json`` (written by training) and
``bench_run.json`` (written by the runner: command, wall time, gate results, channels).
Nothing is typed in by hand; a configuration with no finished run is left out of the tables.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

from nmsparse.app.models.spvit import keep_counts_for
from nmsparse.machine import cpu_model
from nmsparse.tables import format_table

from .grid import BLOCK, FREQUENCY_CHANNELS, KEEP_RATIOS, KEPT, PRUNE_AT, VIT
from .runner import META

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "tokens_frequency.md"
IMAGES = REPO / "docs" / "images"
PATCHES = (28 // VIT["patch_size"]) ** 2


def load(root: Path) -> list[dict]:
    records = []
    for meta_path in sorted(root.glob(f"*/{META}")):
        run_dir = meta_path.parent
        if not (run_dir / "summary.json").is_file():
            continue
        record = json.loads(meta_path.read_text())
        record["summary"] = json.loads((run_dir / "summary.json").read_text())
        records.append(record)
    return records


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def _human(count: float) -> str:
    return f"{count / 1e6:.2f}M"


def token_rows(records: list[dict]) -> tuple[list[list[str]], dict]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        if r["group"] == "tokens":
            groups[(r["labels"]["weights"], r["labels"]["keep_ratio"])].append(r)
    rows, points = [], {}
    for weights in ("dense", "2:4"):
        for ratio in KEEP_RATIOS:
            runs = groups.get((weights, ratio))
            if not runs:
                continue
            acc = [r["summary"]["test_acc"] for r in runs]
            macs = runs[0]["summary"]["macs_sparse"]
            counts = ([PATCHES] * 2 if ratio == 1.0
                      else keep_counts_for(PATCHES, len(PRUNE_AT), ratio))
            wall = statistics.mean(r["wall_seconds"] for r in runs)
            rows.append([weights, f"{ratio:.1f}", " / ".join(map(str, counts)), mean_std(acc),
                         _human(runs[0]["summary"]["macs_dense"]), _human(macs),
                         str(len(runs)), f"{wall:.0f}"])
            points.setdefault(weights, []).append((ratio, macs, acc))
    return rows, points


def token_findings(points: dict) -> list[str]:
    """One measured sentence per configuration against the dense, unpruned ViT."""
    dense = [point for point in points.get("dense", []) if point[0] == 1.0]
    if not dense:
        return []
    _, base_macs, base_acc = dense[0]
    lines = []
    for weights, series in points.items():
        for ratio, macs, acc in series:
            if weights == "dense" and ratio == 1.0:
                continue
            delta = statistics.mean(acc) - statistics.mean(base_acc)
            lines.append(f"- {weights} weights, keep ratio {ratio}: {base_macs / macs:.2f}x "
                         f"fewer MACs than the dense unpruned ViT, accuracy "
                         f"{delta * 100:+.2f} points.")
    return lines


def frequency_rows(records: list[dict]) -> tuple[list[list[str]], list[list[str]], dict]:
    groups: dict[str, list[dict]] = defaultdict(list)
    gates: dict[float, list[dict]] = defaultdict(list)
    for r in records:
        if r["group"] == "frequency":
            groups[r["labels"]["input"]].append(r)
        elif r["group"] == "gate":
            gates[r["labels"]["target"]].append(r)
    rows, points = [], {}
    grid = (28 // BLOCK) ** 2
    for label, channels in [("spatial 4x down", 1), *[(f"DCT {k}", n or FREQUENCY_CHANNELS)
                                                       for k, n in KEPT.items()]]:
        runs = groups.get(label)
        if not runs:
            continue
        acc = [r["summary"]["test_acc"] for r in runs]
        picked = "; ".join(",".join(map(str, r["channels"])) for r in runs if r["channels"])
        wall = statistics.mean(r["wall_seconds"] for r in runs)
        rows.append([label, f"{channels} x 7x7 = {channels * grid}", mean_std(acc),
                     _human(runs[0]["summary"]["macs_dense"]), picked or "-", str(len(runs)),
                     f"{wall:.0f}"])
        points[label] = (channels * grid, acc)
    gate_rows = []
    for target, runs in sorted(gates.items(), reverse=True):
        reached = [r["gate_kept_fraction"] for r in runs]
        expected = [r.get("gate_expected_fraction", float("nan")) for r in runs]
        gate_rows.append([f"{target:.2f}", ", ".join(f"{x:.3f}" for x in reached),
                          ", ".join(f"{x:.3f}" for x in expected),
                          mean_std([r["summary"]["test_acc"] for r in runs]), str(len(runs))])
    return rows, gate_rows, points


def plot(token_points: dict, frequency_points: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    IMAGES.mkdir(parents=True, exist_ok=True)
    written = []
    if token_points:
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for weights, series in token_points.items():
            xs = [m / 1e6 for _, m, _ in series]
            ys = [statistics.mean(a) for _, _, a in series]
            es = [statistics.stdev(a) if len(a) > 1 else 0 for _, _, a in series]
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=f"{weights} weights")
        ax.set_xlabel("MACs per image (millions, kept weights)")
        ax.set_ylabel("test accuracy")
        ax.set_title("SPViT keep ratio 1.0 / 0.7 / 0.5, Fashion-MNIST")
        ax.legend()
        fig.tight_layout()
        fig.savefig(IMAGES / "tokens-acc-vs-macs.png", dpi=110)
        plt.close(fig)
        written.append("tokens-acc-vs-macs.png")
    if frequency_points:
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for label, (size, acc) in frequency_points.items():
            sd = statistics.stdev(acc) if len(acc) > 1 else 0
            ax.errorbar([size], [statistics.mean(acc)], yerr=[sd], marker="o", capsize=3,
                        label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("input numbers per image")
        ax.set_ylabel("test accuracy")
        ax.set_title("Block-DCT channels vs spatial downsampling (7x7 grid)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(IMAGES / "frequency-acc-vs-input.png", dpi=110)
        plt.close(fig)
        written.append("frequency-acc-vs-input.png")
    return written


def noise_line(series: list[list[float]]) -> list[str]:
    """How large a difference the seeds can resolve: twice the largest seed spread."""
    spreads = [statistics.stdev(acc) for acc in series if len(acc) > 1]
    if not spreads:
        return []
    return [f"- Noise: the largest standard deviation over seeds in this table is "
            f"{max(spreads) * 100:.2f} points; differences below about twice that are not "
            "resolved by these runs.", ""]


def write_report(root: Path) -> str:
    records = load(root)
    tokens, token_points = token_rows(records)
    frequency, gates, frequency_points = frequency_rows(records)
    images = plot(token_points, frequency_points)
    total_minutes = sum(r["wall_seconds"] for r in records) / 60
    md = ["# Token pruning and frequency-domain input on Fashion-MNIST",
          "",
          "Generated by `python -m benchmarks.tokens_frequency` (`--report-only` rewrites this "
          "page from the run folders). Sizes, schedules and why are in "
          "`benchmarks/tokens_frequency/grid.py`. Every run is one `nmsparse train` call (its "
          "exact command is in the run folder's `bench_run.json`) on one thread; test "
          "accuracy is on the first 5,120 test images, mean ± standard deviation over the "
          "seeds; MACs are `nmsparse.summary` counts of one image at inference (the pruned "
          "token sequence, kept weights only).",
          "",
          f"Measured on {cpu_model()}, shared with other jobs (wall times are disturbed); "
          f"{len(records)} runs took {total_minutes:.1f} minutes in all.",
          "", "## SPViT token pruning (accuracy vs MACs)", "",
          f"`vit_tiny` dim {VIT['dim']}, depth {VIT['depth']}, {VIT['heads']} heads, patch "
          f"{VIT['patch_size']} ({PATCHES} patch tokens); keep ratio 1.0 is the plain ViT, "
          f"0.7 and 0.5 are `spvit_tiny` with selectors before blocks "
          f"{', '.join(map(str, PRUNE_AT))} (kept patch tokens after each selector shown; a "
          "package token joins them). Trained from scratch with the selectors (the paper "
          "fine-tunes a trained DeiT).", ""]
    if tokens:
        md += [format_table(["weights", "keep ratio", "patch tokens kept", "test acc",
                             "MACs (dense)", "MACs (kept)", "seeds", "s / run"], tokens,
                            markdown=True), ""]
    md += token_findings(token_points)
    md += noise_line([acc for series in token_points.values() for _, _, acc in series]) or [""]
    if "tokens-acc-vs-macs.png" in images:
        md += ["![accuracy vs MACs](images/tokens-acc-vs-macs.png)", ""]
    md += ["## Frequency channels vs spatial downsampling", "",
           f"`dct_resnet` (block {BLOCK}: {FREQUENCY_CHANNELS} frequency channels of the Y "
           "plane on a 7x7 grid) and `downsampled_resnet` (the image area-averaged 4x to "
           "7x7), both resnet20 at width 0.5 with the stride-2 reductions removed, so the "
           "trunk is the same and only the input differs. Half and quarter keep the top-k "
           "channels of a gate trained first (Gumbel-softmax, target = k / 16) with the same "
           "seed; the channels it picked are listed per seed (0 is the DC term, `u * 4 + v` "
           "frequency (u, v)).", ""]
    if frequency:
        md += [format_table(["input", "input numbers", "test acc", "MACs", "channels picked",
                             "seeds", "s / run"], frequency, markdown=True), ""]
    spatial = frequency_points.get("spatial 4x down")
    if spatial:
        base = statistics.mean(spatial[1])
        for label, (size, acc) in frequency_points.items():
            if label != "spatial 4x down":
                md.append(f"- {label} ({size} input numbers): accuracy "
                          f"{(statistics.mean(acc) - base) * 100:+.2f} points against spatial "
                          f"downsampling to the same grid ({spatial[0]} input numbers).")
        md += noise_line([acc for _, acc in frequency_points.values()]) or [""]
    if "frequency-acc-vs-input.png" in images:
        md += ["![accuracy vs input size](images/frequency-acc-vs-input.png)", ""]
    if gates:
        md += ["Gate runs (2 epochs): the fraction of channels the trained gate keeps at "
               "inference (logit > 0) and its mean keep probability in training (what the "
               "gate loss drives to the target) per seed, and the gated model's own accuracy.",
               "",
               format_table(["target", "kept at inference", "mean keep probability",
                             "gated model acc", "seeds"],
                            gates, markdown=True), ""]
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text("\n".join(md), encoding="utf-8")
    return f"wrote {DOC.relative_to(REPO)} and {len(images)} plot(s) from {len(records)} runs"
