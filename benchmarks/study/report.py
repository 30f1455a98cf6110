"""Write ``docs/results.md`` and ``docs/images/study-*.png`` from the run folders alone.

Every number in the report is read from files the training wrote (``config.json``,
``summary.json``, ``metrics.jsonl``, ``sad.csv``) or the runner wrote (``study_run.json``:
command and wall time); nothing is typed in by hand. Each claim of the paper gets a sentence
decided by a stated comparison: "reproduced", "not reproduced" or "reversed", or "not
measured in this preset" when a row it needs is missing.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nmsparse._machine import cpu_model
from nmsparse.tables import format_table

from .runner import STUDY_FILE

# The paper's ImageNet schedule (paper.md): 120 epochs of 1.28M images at batch 256, lr 0.1,
# 5 warm-up epochs then cosine to 0; lambda_w 2e-4, effectively 1.6e-3 (8 GPUs summed).
PAPER_STEPS_PER_EPOCH = 1_281_167 // 256
PAPER_STEPS = 120 * PAPER_STEPS_PER_EPOCH
PAPER_WARMUP = 5 * PAPER_STEPS_PER_EPOCH
PAPER_SUM_LR = 0.1 * (PAPER_WARMUP / 2 + (PAPER_STEPS - PAPER_WARMUP) / 2)  # mean of cosine
PAPER_DECAY, PAPER_DECAY_EFFECTIVE = 2e-4, 1.6e-3


@dataclass
class RunRecord:
    """One finished run folder, as read from disk."""

    path: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    sad: list[dict[str, float]] = field(default_factory=list)

    @property
    def method(self) -> str:
        return "dense" if self.pattern == "dense" else self.config["method"]

    @property
    def pattern(self) -> str:
        p = self.config["pattern"]
        return "dense" if p.strip().lower() == "dense" else p

    @property
    def lm(self) -> bool:
        return "test_bpb" in self.summary

    @property
    def score(self) -> float:
        """Top-1 in percent, or bits per byte for a language model."""
        return self.summary["test_bpb"] if self.lm else 100.0 * self.summary["test_acc"]

    @property
    def sad_total(self) -> float | None:
        """SAD summed over training: the mask flips of every logged interval."""
        if not self.sad:
            return None
        return sum(row["sad_prev_total"] for row in self.sad)

    def cumulative_decay(self) -> tuple[int, float] | None:
        """(steps, sum over steps of lr_t * decay) from the logged lr (step records)."""
        if self.method != "srste":
            return None
        steps = [r for r in self.metrics if r.get("kind") == "step" and r.get("lr") is not None]
        if not steps:
            return None
        total, previous = 0.0, 0
        for record in steps:  # each logged lr stands for the steps since the previous log
            total += record["lr"] * (record["step"] - previous)
            previous = record["step"]
        last = int(self.summary.get("steps", previous))  # steps after the last log record
        total += steps[-1]["lr"] * max(0, last - previous)
        return max(last, previous), total * self.config["decay"]


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def load_run(run_dir: Path) -> RunRecord | None:
    """The record of a finished run folder, or None when it holds no summary.json."""
    run_dir = Path(run_dir)
    if not (run_dir / "summary.json").is_file():
        return None
    record = RunRecord(run_dir, _read_json(run_dir / "config.json"),
                       _read_json(run_dir / "summary.json"))
    if (run_dir / STUDY_FILE).is_file():
        record.meta = _read_json(run_dir / STUDY_FILE)
    if (run_dir / "metrics.jsonl").is_file():
        with (run_dir / "metrics.jsonl").open(encoding="utf-8") as file:
            record.metrics = [json.loads(line) for line in file if line.strip()]
    if (run_dir / "sad.csv").is_file():
        with (run_dir / "sad.csv").open(encoding="utf-8") as file:
            record.sad = [{k: float(v) for k, v in row.items() if v != ""}
                          for row in csv.DictReader(file)]
    return record


# -- statistics -------------------------------------------------------------------------------
@dataclass
class Stats:
    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return sum(self.values) / self.n

    @property
    def std(self) -> float | None:
        if self.n < 2:
            return None
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in self.values) / (self.n - 1))

    def text(self, digits: int = 2) -> str:
        s = f"{self.mean:.{digits}f}"
        return s + (f" ± {self.std:.{digits}f}" if self.std is not None else "")


def diff_noise(a: Stats, b: Stats) -> float | None:
    """Standard error of the difference of two means; None with a single seed on a side."""
    if a.std is None or b.std is None:
        return None
    return math.sqrt(a.std ** 2 / a.n + b.std ** 2 / b.n)


def groups(records: list[RunRecord], where: Callable[[RunRecord], bool],
           key: Callable[[RunRecord], Any]) -> dict[Any, list[RunRecord]]:
    out: dict[Any, list[RunRecord]] = {}
    for record in records:
        if where(record):
            out.setdefault(key(record), []).append(record)
    return out


def _is_main(r: RunRecord) -> bool:
    # The paper-shaped table: default decay and hardware layout (dense rows have neither).
    return not r.lm and (r.method == "dense" or (r.config["layout"] == "in" and (
        r.method != "srste" or r.config["decay"] == 2e-4)))


def main_groups(records: list[RunRecord]) -> dict[tuple[str, str], list[RunRecord]]:
    return groups(records, _is_main, lambda r: (r.method, r.pattern))


def lm_groups(records: list[RunRecord]) -> dict[tuple[str, str], list[RunRecord]]:
    return groups(records, lambda r: r.lm, lambda r: (r.method, r.pattern))


def stats(rs: list[RunRecord] | None, value: Callable[[RunRecord], float | None]
          = lambda r: r.score) -> Stats | None:
    if not rs:
        return None
    values = [v for v in (value(r) for r in rs) if v is not None]
    return Stats(values) if values else None


# -- claims -----------------------------------------------------------------------------------
@dataclass
class Claim:
    claim: str
    verdict: str
    comparison: str

    def sentence(self) -> str:
        return f"**{self.claim}**: {self.verdict}. {self.comparison}"


NOT_MEASURED = "not measured in this preset"


def _noise_text(noise: float | None, digits: int = 2) -> str:
    if noise is None:
        return "single seed on at least one side: no seed-noise estimate, decided on the raw " \
               "difference"
    return f"seed noise (s.e. of the difference) {noise:.{digits}f}"


def judge(claim: str, a: Stats | None, b: Stats | None, kind: str, what: str,
          margin: float = 0.0, unit: str = "points", higher_better: bool = True,
          digits: int = 2) -> Claim:
    """Decide ``claim`` about a (first) vs b (second).

    kind ``greater``: a beats b by more than the noise (reversed: b beats a by more);
    ``at_least``: a is not worse than b beyond the noise (else reversed);
    ``within``: a is at most ``margin`` (+ noise) worse than b (else not reproduced);
    ``close``: |a - b| <= margin + noise.
    """
    if a is None or b is None:
        return Claim(claim, NOT_MEASURED, f"Needs {what}.")
    sign = 1.0 if higher_better else -1.0
    diff = sign * (a.mean - b.mean)  # > 0: a is better
    noise = diff_noise(a, b)
    tol = noise or 0.0
    if kind == "greater":
        verdict = ("reproduced" if diff > tol else "reversed" if diff < -tol
                   else "not reproduced (within noise)")
    elif kind == "at_least":
        verdict = "reproduced" if diff >= -tol else "reversed"
    elif kind == "within":
        verdict = "reproduced" if diff >= -(margin + tol) else "not reproduced"
    elif kind == "close":
        verdict = "reproduced" if abs(diff) <= margin + tol else "not reproduced"
    else:
        raise ValueError(kind)
    if noise is None:  # one seed: the verdict stands on the raw difference; say so
        verdict += " (single seed)"
    raw = a.mean - b.mean
    rule = {"greater": "a - b > noise", "at_least": "a - b >= -noise",
            "within": f"a - b >= -({margin:.3g} + noise)",
            "close": f"|a - b| <= {margin:.3g} + noise"}[kind]
    if not higher_better:
        rule += " (lower is better, sign flipped)"
    comparison = (f"Compared {what}: a = {a.text(digits)} (n={a.n}), b = {b.text(digits)} "
                  f"(n={b.n}), a - b = {raw:+.{digits}f} {unit}; rule {rule}; "
                  f"{_noise_text(noise, digits)}.")
    return Claim(claim, verdict, comparison)


def claims(records: list[RunRecord]) -> list[Claim]:
    main = main_groups(records)
    lm = lm_groups(records)
    dense = stats(main.get(("dense", "dense")))

    def sr(pattern: str, method: str = "srste") -> Stats | None:
        return stats(main.get((method, pattern)))

    out = [
        judge("SR-STE 2:4 is within 0.3 points of dense (paper 77.0 vs 77.3)", sr("2:4"),
              dense, "within", "top-1 of a = SR-STE 2:4 vs b = dense", margin=0.3),
        judge("SR-STE 4:8 is within 0.3 points of dense (paper 77.4 vs 77.3)", sr("4:8"),
              dense, "within", "top-1 of a = SR-STE 4:8 vs b = dense", margin=0.3),
        judge("4:8 >= 2:4 at the same 50 % sparsity (SR-STE)", sr("4:8"), sr("2:4"),
              "at_least", "top-1 of a = SR-STE 4:8 vs b = SR-STE 2:4"),
        judge("2:8 >= 1:4 at the same 75 % sparsity (SR-STE)", sr("2:8"), sr("1:4"),
              "at_least", "top-1 of a = SR-STE 2:8 vs b = SR-STE 1:4"),
        judge("SR-STE 1:4 is at most ~2 points below dense", sr("1:4"), dense, "within",
              "top-1 of a = SR-STE 1:4 vs b = dense", margin=2.0),
        judge("SR-STE 2:8 is at most ~2 points below dense", sr("2:8"), dense, "within",
              "top-1 of a = SR-STE 2:8 vs b = dense", margin=2.0),
    ]
    for pattern in ("2:4", "1:8", "1:16"):
        out.append(judge(f"SR-STE beats STE at {pattern} by more than seed noise",
                         sr(pattern), sr(pattern, "ste"), "greater",
                         f"top-1 of a = SR-STE {pattern} vs b = STE {pattern}"))
    out.append(judge("SR-STE 2:4 >= ASP 2:4 (paper 77.0 vs 76.8; ASP trains 2x as long)",
                     sr("2:4"), sr("2:4", "asp"), "at_least",
                     "top-1 of a = SR-STE 2:4 vs b = ASP 2:4"))
    patterns = sorted({p for (m, p) in main if m == "ste"} | {"2:4", "1:8"})
    for pattern in patterns:
        out.append(judge(f"STE's SAD is higher than SR-STE's at {pattern}",
                         stats(main.get(("ste", pattern)), lambda r: r.sad_total),
                         stats(main.get(("srste", pattern)), lambda r: r.sad_total),
                         "greater", f"SAD summed over training (mask flips per logged "
                         f"interval, from sad.csv) of a = STE {pattern} vs b = SR-STE "
                         f"{pattern}", unit="flips", digits=0))
    sweep = decay_groups(records)
    if sweep:
        pattern = next(iter(sweep.values()))[0].pattern
        best = max(sweep, key=lambda d: stats(sweep[d]).mean)
        out.append(judge(f"SR-STE decay 2e-4 beats decay 0 (plain STE) at {pattern}",
                         stats(sweep.get(2e-4)), stats(sweep.get(0.0)), "greater",
                         f"top-1 of a = decay 2e-4 vs b = decay 0 (best decay in the sweep: "
                         f"{best:g})"))
    else:
        out.append(Claim("SR-STE decay 2e-4 beats decay 0 (plain STE) in a decay sweep",
                         NOT_MEASURED, "Needs the decay sweep."))
    for pattern in ("2:4", "1:4"):
        lay = layout_groups(records, pattern)
        out.append(judge(f"Input-channel grouping is within 0.3 points of the paper's flat "
                         f"grouping at {pattern} (repository 77.1 vs 77.0)",
                         stats(lay.get("in")), stats(lay.get("flat")), "close",
                         f"top-1 of a = SR-STE {pattern} layout in vs b = layout flat",
                         margin=0.3))
    dense_bpb = stats(lm.get(("dense", "dense")))
    margin = 0.02 * dense_bpb.mean if dense_bpb else 0.0
    out.append(judge("On a language model SR-STE 2:4 stays close to dense (within 2 % of "
                     "dense bits per byte; the paper's Transformer claim)",
                     stats(lm.get(("srste", "2:4"))), dense_bpb, "within",
                     "test bits per byte of a = SR-STE 2:4 vs b = dense", margin=margin,
                     unit="bits/byte", higher_better=False, digits=3))
    out.append(judge("On a language model SR-STE beats STE at 2:4",
                     stats(lm.get(("srste", "2:4"))), stats(lm.get(("ste", "2:4"))),
                     "greater", "test bits per byte of a = SR-STE 2:4 vs b = STE 2:4",
                     unit="bits/byte", higher_better=False, digits=3))
    return out


def decay_groups(records: list[RunRecord]) -> dict[float, list[RunRecord]]:
    """SR-STE runs at the single pattern that was swept (more than two decays)."""
    by_pattern = groups(records, lambda r: not r.lm and r.method == "srste"
                        and r.config["layout"] == "in", lambda r: r.pattern)
    for rs in by_pattern.values():
        decays = groups(rs, lambda r: True, lambda r: r.config["decay"])
        if len(decays) > 2:
            return decays
    return {}


def layout_groups(records: list[RunRecord], pattern: str) -> dict[str, list[RunRecord]]:
    out = groups(records, lambda r: not r.lm and r.method == "srste" and r.pattern == pattern
                 and r.config["decay"] == 2e-4, lambda r: r.config["layout"])
    return out if "flat" in out else {}


# -- tables -----------------------------------------------------------------------------------
def _count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    return format_table(headers, rows, markdown=True)


_PATTERN_ORDER = {p: i for i, p in enumerate(("dense", "2:4", "4:8", "1:4", "2:8", "1:8",
                                              "1:16"))}
_METHOD_ORDER = {"dense": 0, "ste": 1, "srste": 2, "asp": 3}


def _order(key: tuple[str, str]) -> tuple[int, int]:
    method, pattern = key
    return (_PATTERN_ORDER.get(pattern, 99), _METHOD_ORDER.get(method, 9))


def score_table(grouped: dict[tuple[str, str], list[RunRecord]], lm: bool) -> str:
    base = stats(grouped.get(("dense", "dense")))
    label = "test bits/byte" if lm else "top-1 %"
    rows = []
    for key in sorted(grouped, key=_order):
        rs = grouped[key]
        s = stats(rs)
        s0 = rs[0].summary
        if base is not None and key != ("dense", "dense"):
            noise = diff_noise(s, base)
            delta = f"{s.mean - base.mean:+.2f}" + (f" ± {noise:.2f}" if noise is not None
                                                     else " (1 seed)")
        else:
            delta = "-"
        wall = sum(r.meta.get("wall_seconds", r.summary["wall_seconds"]) for r in rs) / len(rs)
        rows.append([key[0], key[1], s.text(3 if lm else 2), str(s.n), delta,
                     f"{_count(s0['params_dense'])} / {_count(s0['params_kept'])}",
                     f"{_count(s0['macs_dense'])} / {_count(s0['macs_sparse'])}",
                     f"{wall:.0f}"])
    return _table(["method", "pattern", f"{label} (mean ± std)", "seeds",
                   "vs dense (± noise)", "params dense / kept", "MACs dense / sparse",
                   "wall s / run"], rows)


def decay_table(sweep: dict[float, list[RunRecord]]) -> str:
    rows = []
    for decay in sorted(sweep):
        s = stats(sweep[decay])
        cum = [c for c in (r.cumulative_decay() for r in sweep[decay]) if c]
        rows.append([f"{decay:g}", s.text(), str(s.n),
                     f"{cum[0][1]:.3g}" if cum else "-",
                     f"{math.exp(-cum[0][1]):.3f}" if cum else "-"])
    return _table(["SR-STE decay", "top-1 % (mean ± std)", "seeds", "sum_t lr_t * decay",
                   "shrink factor exp(-sum)"], rows)


def layout_table(records: list[RunRecord]) -> str:
    rows = []
    for pattern in ("2:4", "1:4", *sorted({r.pattern for r in records if not r.lm})):
        lay = layout_groups(records, pattern)
        if not lay or any(row[0] == pattern for row in rows):
            continue
        for layout in ("in", "flat"):
            if layout in lay:
                s = stats(lay[layout])
                rows.append([pattern, layout, s.text(), str(s.n)])
    return _table(["pattern", "layout", "top-1 % (mean ± std)", "seeds"], rows) if rows else ""


def runs_table(records: list[RunRecord]) -> str:
    rows = []
    for r in records:
        value = f"{r.summary['test_bpb']:.3f} bpb" if r.lm else f"{r.score:.2f} %"
        rows.append([r.path.name, value, str(r.summary["steps"]),
                     f"{r.summary['wall_seconds']:.0f}",
                     f"{r.meta['wall_seconds']:.0f}" if "wall_seconds" in r.meta else "-"])
    table = _table(["run folder", "result", "steps", "training s", "wall s (process)"], rows)
    repo = str(Path(__file__).resolve().parents[2]) + os.sep  # show paths from the repo root
    commands = [" ".join(r.meta["command"]).replace(repo, "") for r in records
                if r.meta.get("command")]
    if commands:  # the exact training command of every run (all flags, nothing defaulted)
        table += ("\n\n<details><summary>The training command of each run</summary>\n\n"
                  + "\n".join(f"```\n{c}\n```" for c in commands) + "\n\n</details>")
    return table


def decay_text(records: list[RunRecord]) -> str:
    cum = [(r, c) for r in records for c in [r.cumulative_decay()] if c]
    if not cum:
        return "No SR-STE run in this preset."
    lines = []
    for r, (steps, total) in cum:
        momentum = r.config.get("momentum", 0.0) or 0.0
        lines.append(f"- `{r.path.name}`: {steps} steps, decay {r.config['decay']:g}, "
                     f"sum_t lr_t * decay = {total:.3g}: a weight that stays pruned shrinks by "
                     f"exp(-{total:.3g}) = {math.exp(-total):.3f} from the refinement term "
                     f"alone (up to exp(-{total / (1 - momentum):.3g}) = "
                     f"{math.exp(-total / (1 - momentum)):.3f} once SGD momentum {momentum:g} "
                     f"has accumulated it).")
    paper = PAPER_SUM_LR * PAPER_DECAY
    paper_eff = PAPER_SUM_LR * PAPER_DECAY_EFFECTIVE
    lines.append(f"- The paper's ImageNet run: {PAPER_STEPS:,} steps, sum_t lr_t = "
                 f"{PAPER_SUM_LR:,.0f}, so sum_t lr_t * decay = {paper:.1f} at the nominal 2e-4 "
                 f"(factor {math.exp(-paper):.1e}) and {paper_eff:.0f} at the effective 1.6e-3 "
                 f"of its 8-GPU code (factor {math.exp(-paper_eff):.0e}): pruned weights go "
                 f"to ~0 there; a run whose sum is far below 1 barely moves them.")
    return "\n".join(lines)


# -- figures ----------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sad(records: list[RunRecord], images: Path) -> list[Path]:
    """STE vs SR-STE SAD over training at each pattern that has both."""
    plt = _plt()
    main = main_groups(records)
    written = []
    for pattern in sorted({p for (m, p) in main if m in ("ste", "srste")}):
        pair = [(m, main.get((m, pattern))) for m in ("ste", "srste")]
        if not all(rs for _, rs in pair):
            continue
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
        for method, rs in pair:
            for i, r in enumerate(rs):
                steps = [row["step"] for row in r.sad]
                label = f"{method.upper().replace('SRSTE', 'SR-STE')}" if i == 0 else None
                color = "tab:red" if method == "ste" else "tab:blue"
                ax1.plot(steps, [row["sad_prev_frac"] for row in r.sad], color=color,
                         alpha=0.8, lw=1, label=label)
                ax2.plot(steps, [row["sad_init_frac"] for row in r.sad], color=color,
                         alpha=0.8, lw=1, label=label)
        ax1.set(title=f"{pattern}: SAD per logged interval", xlabel="step",
                ylabel="fraction of weights flipped", yscale="log")
        ax2.set(title=f"{pattern}: SAD vs the initial mask", xlabel="step",
                ylabel="fraction differing")
        ax1.legend()
        ax2.legend()
        fig.tight_layout()
        path = images / f"study-sad-{pattern.replace(':', 'of')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def plot_density(records: list[RunRecord], images: Path) -> Path | None:
    """Final per-layer density (kept / dense weights) of the main table's sparse runs."""
    plt = _plt()
    main = main_groups(records)
    keys = [k for k in sorted(main, key=_order) if k[0] != "dense"]
    if not keys:
        return None
    fig, ax = plt.subplots(figsize=(10, 3.8))
    width = 0.8 / len(keys)
    names: list[str] = []
    for i, key in enumerate(keys):
        rows = [row for row in main[key][0].summary["summary"]["rows"] if row["macs_dense"]]
        names = [row["name"] for row in rows]
        ax.bar([j + i * width for j in range(len(rows))], [row["density"] for row in rows],
               width, label=f"{key[0]} {key[1]}")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, rotation=70,
                  fontsize=7)
    ax.set(ylabel="final density (kept / all)", title="Final per-layer density")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    path = images / "study-density.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(records: list[RunRecord], images: Path) -> Path | None:
    """Test accuracy per epoch of the main table's runs (seed of the first run)."""
    plt = _plt()
    main = main_groups(records)
    if not main:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for key in sorted(main, key=_order):
        epochs = [m for m in main[key][0].metrics if m.get("kind") == "epoch"]
        # ASP's dense phase repeats the dense run step for step: draw dense dashed on top.
        style = {"ls": "--", "color": "black", "zorder": 5} if key[0] == "dense" else {}
        ax.plot([m["epoch"] for m in epochs], [100 * m["test_acc"] for m in epochs],
                marker="o", ms=3, label=f"{key[0]} {key[1]}", **style)
    ax.set(xlabel="epoch (asp: dense phase, then retrain)", ylabel="test top-1 %",
           title="Test accuracy during training")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = images / "study-curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- the document -----------------------------------------------------------------------------
def machine() -> str:
    cpu = cpu_model()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}, {cores} cores usable, Python {platform.python_version()}"


def render(records: list[RunRecord], preset: str, images: Path, *, command: str,
           why: str = "", image_link: str = "images") -> str:
    """The Markdown report; writes its figures into ``images``."""
    images.mkdir(parents=True, exist_ok=True)
    torch_versions = sorted({r.summary.get("torch", "?") for r in records})
    devices = sorted({r.summary.get("device", "?") for r in records})
    total_wall = sum(r.meta.get("wall_seconds", r.summary["wall_seconds"]) for r in records)
    parts = [
        "# Accuracy study: nmsparse against the SR-STE paper's claims",
        "",
        "Generated by `benchmarks/study/report.py` from the run folders; do not edit by hand.",
        "",
        f"- Command: `{command}`",
        f"- Preset: `{preset}`" + (f" ({why})" if why else ""),
        f"- Machine: {machine()}; device {', '.join(devices)}; torch "
        f"{', '.join(torch_versions)}",
        f"- Runs: {len(records)} finished; summed wall time {total_wall / 60:.1f} min",
        "- \"N:M\" means keep N of every M weights along the input dimension.",
        "",
    ]
    vision = [r for r in records if not r.lm]
    if vision:
        c = vision[0].config
        parts += [
            "## Image classification (the paper's table, reshaped)",
            "",
            f"{c['model']} (options {json.dumps(c['model_options'])}) on {c['data']}, SGD "
            f"momentum {c['momentum']:g}, lr {c['lr']:g} with {c['warmup_epochs']:g} warm-up "
            f"epochs then cosine, weight decay {c['weight_decay']:g}, batch {c['batch_size']}, "
            f"{c['epochs']} epochs per phase (ASP: a dense phase, a one-shot prune, then a "
            f"fixed-mask retrain of the same length, so 2x the total budget), SR-STE decay "
            f"{c['decay']:g}, layers kept dense: {', '.join(c['exclude']) or 'none'} (plus "
            f"layers whose input channels do not divide M, e.g. the 1-channel first conv). "
            "Params and MACs count the kept weights of sparse layers and dense layers in full.",
            "",
            score_table(main_groups(records), lm=False),
            "",
        ]
        sweep = decay_groups(records)
        if sweep:
            parts += ["### SR-STE decay sweep", "", decay_table(sweep), ""]
        lay = layout_table(records)
        if lay:
            parts += ["### Grouping layout: input channels (hardware) vs flat (the paper's)",
                      "", lay, ""]
        for figure in (plot_curves(records, images), *plot_sad(records, images),
                       plot_density(records, images)):
            if figure is not None:
                parts += [f"![{figure.stem}]({image_link}/{figure.name})", ""]
    lm = [r for r in records if r.lm]
    if lm:
        c = lm[0].config
        parts += ["## Language model (bits per byte, lower is better)", "",
                  f"{c['model']} on `--data text` (default corpus), seq_len {c['seq_len']}, "
                  f"batch {c['batch_size']}, {c['epochs']} epoch(s) of "
                  f"{c['limit_train_batches'] or 'all'} steps, test on "
                  f"{c['limit_test_batches'] or 'all'} batches, SGD lr {c['lr']:g}.", "",
                  score_table(lm_groups(records), lm=True), ""]
    parts += ["## The paper's claims", ""]
    parts += [f"{i}. {claim.sentence()}" for i, claim in enumerate(claims(records), 1)]
    parts += ["", "## Cumulative SR-STE decay of these runs vs the paper's", "",
              decay_text(records), "", "## Every run", "", runs_table(records), ""]
    return "\n".join(parts)


def write_report(root: Path, preset: str, results: Path, images: Path, *,
                 command: str) -> str:
    from .grid import PRESETS, expand

    records = [r for r in (load_run(root / s.name) for s in expand(preset)) if r]
    link = os.path.relpath(images, results.parent)
    text = render(records, preset, images, command=command, why=PRESETS[preset].why,
                  image_link=link)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(text, encoding="utf-8")
    return text
