"""Write ``docs/results.md`` and ``docs/images/study-*.png`` from the run folders alone.

Every number in the report is read from files the training wrote or the runner wrote (see
:mod:`.records`); nothing is typed in by hand. Each claim of the paper is decided over seeds
by the rules of :mod:`.claims`. Runs of another preset measured elsewhere (the ``gpu``
preset on a lent GPU) come in as a bundle (:mod:`.bundle`) and get their own section.
"""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path

from nmsparse.machine import cpu_model
from nmsparse.tables import format_table

from . import power, stats
from .claims import NOT_MEASURED, RULES, Claim, claims, compare, sad_accuracy, values
from .figures import FIGURES
from .grid import (
    PAPER_CUMULATIVE_DECAY,
    PAPER_DECAY_EFFECTIVE,
    PAPER_STEPS,
    PAPER_SUM_LR,
    PRESETS,
    expand,
)
from .records import (
    Key,
    RunRecord,
    decay_groups,
    extra_groups,
    layout_groups,
    lm_groups,
    load_run,
    main_groups,
)

__all__ = ["NOT_MEASURED", "Claim", "claims", "load_run", "render", "write_report"]

PAPER_CUMULATIVE_EFFECTIVE = PAPER_SUM_LR * PAPER_DECAY_EFFECTIVE


def _count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    return format_table(headers, rows, markdown=True)


def _mean_std(xs: list[float], digits: int = 2) -> str:
    text = f"{stats.mean(xs):.{digits}f}"
    return text + (f" ± {math.sqrt(stats.sample_var(xs)):.{digits}f}" if len(xs) > 1 else "")


def _effect(a: list[RunRecord] | None, b: list[RunRecord] | None, digits: int = 2) -> str:
    """a - b over seeds with its 95 % CI (paired when the seeds match), or why not."""
    va, vb = values(a), values(b)
    if not va or not vb:
        return "-"
    c = compare(va, vb)
    if c is None:
        return f"{stats.mean(list(va.values())) - stats.mean(list(vb.values())):+.{digits}f}" \
               " (1 seed)"
    return f"{c.effect:+.{digits}f} [{c.low:+.{digits}f}, {c.high:+.{digits}f}]"


_PATTERN_ORDER = {p: i for i, p in enumerate(("dense", "2:4", "4:8", "1:4", "2:8", "1:8",
                                              "1:16"))}
_ROW_ORDER = {"dense": 0, "ste": 1, "srste": 2, "asp-1x": 3, "asp": 4}


def _order(key: Key) -> tuple[int, int, str]:
    row, pattern = key
    return (_PATTERN_ORDER.get(pattern, 99), _ROW_ORDER.get(row, 9), row)


def score_table(grouped: dict[Key, list[RunRecord]], lm: bool) -> str:
    base = grouped.get(("dense", "dense"))
    digits = 3 if lm else 2
    label = "test bits/byte" if lm else "top-1 %"
    rows = []
    for key in sorted(grouped, key=_order):
        rs = grouped[key]
        s0 = rs[0].summary
        delta = "-" if key == ("dense", "dense") else _effect(rs, base, digits)
        rows.append([key[0], key[1], _mean_std([r.score for r in rs], digits), str(len(rs)),
                     delta, f"{_count(s0['params_dense'])} / {_count(s0['params_kept'])}",
                     f"{_count(s0['macs_dense'])} / {_count(s0['macs_sparse'])}",
                     f"{sum(r.wall for r in rs) / len(rs):.0f}"])
    return _table(["method", "pattern", f"{label} (mean ± std)", "seeds",
                   "vs dense: effect [95 % CI]", "params dense / kept", "MACs dense / sparse",
                   "wall s / run"], rows)


def extra_table(records: list[RunRecord]) -> str:
    extra = extra_groups(records)
    main = main_groups(records)
    rows = []
    for (method, pattern, options), rs in sorted(extra.items()):
        plain = pattern.rsplit(":", 2)  # "transposable:1:8" is compared with plain 1:8
        base = ":".join(plain[-2:]) if len(plain) == 3 else pattern
        rows.append([method, pattern, options or "-", _mean_std([r.score for r in rs]),
                     str(len(rs)), _effect(rs, main.get(("srste", base))),
                     _effect(rs, main.get(("ste", base)))])
    return _table(["method", "pattern", "options", "top-1 % (mean ± std)", "seeds",
                   "vs SR-STE [95 % CI]", "vs STE [95 % CI]"], rows) if rows else ""


def _sum_decay(rs: list[RunRecord]) -> float | None:
    sums = [c[1] for c in (r.cumulative_decay() for r in rs) if c]
    return stats.mean(sums) if sums else None


def decay_table(sweep: dict[float, list[RunRecord]]) -> str:
    rows = []
    for decay in sorted(sweep):
        rs = sweep[decay]
        total = _sum_decay(rs)
        sads = [r.sad_total for r in rs if r.sad_total is not None]
        rows.append([f"{decay:g}", _mean_std([r.score for r in rs]), str(len(rs)),
                     "-" if decay == 2e-4 else _effect(rs, sweep.get(2e-4)),
                     f"{stats.mean(sads):,.0f}" if sads else "-",
                     f"{total:.3g}" if total is not None else "-",
                     f"{total / PAPER_CUMULATIVE_DECAY:.2g}" if total is not None else "-"])
    return _table(["SR-STE decay", "top-1 % (mean ± std)", "seeds", "vs 2e-4 [95 % CI]",
                   "SAD summed", "sum_t lr_t * decay", "/ paper's 6.0"], rows)


def layout_table(records: list[RunRecord]) -> str:
    rows = []
    patterns = {r.pattern for r in records if not r.lm}
    for pattern in sorted(patterns, key=lambda p: (_PATTERN_ORDER.get(p, 99), p)):
        lay = layout_groups(records, pattern)
        for layout in ("in", "flat") if lay else ():
            if layout in lay:
                rows.append([pattern, layout, _mean_std([r.score for r in lay[layout]]),
                             str(len(lay[layout])),
                             "-" if layout == "in" else _effect(lay["in"], lay["flat"])])
    return _table(["pattern", "layout", "top-1 % (mean ± std)", "seeds",
                   "in - flat [95 % CI]"], rows) if rows else ""


def correlation_table(records: list[RunRecord]) -> str:
    rows = []
    for sweep in (False, True):
        for pattern, c in sad_accuracy(records, sweep).items():
            if c is None or (sweep and c.n == sad_accuracy(records)[pattern].n):
                continue  # too few runs, or no sweep runs at this pattern
            rows.append([pattern, "STE + SR-STE, every decay" if sweep else
                         "STE + SR-STE (main table)", str(c.n), f"{c.r:+.2f}",
                         f"[{c.low:+.2f}, {c.high:+.2f}]", f"{c.p:.2g}"])
    return _table(["pattern", "runs", "n", "Pearson r (SAD, top-1)", "95 % CI", "p"],
                  rows) if rows else ""


def cumulative_table(records: list[RunRecord]) -> str:
    """sum_t lr_t * decay of every SR-STE row against the paper's."""
    found: dict[tuple, list[RunRecord]] = {}
    for r in records:
        if r.cumulative_decay() is not None:
            where = "LM" if r.lm else r.group
            found.setdefault((where, r.pattern, r.decay, r.config.get("layout")), []).append(r)
    rows = []
    for (where, pattern, decay, layout), rs in sorted(found.items(), key=lambda kv: (
            kv[0][0], _PATTERN_ORDER.get(kv[0][1], 99), kv[0][2], str(kv[0][3]))):
        steps = max(c[0] for c in (r.cumulative_decay() for r in rs) if c)
        total = _sum_decay(rs)
        momentum = rs[0].config.get("momentum", 0.0) or 0.0
        rows.append([where + ("" if layout in (None, "in") else f" ({layout})"), pattern,
                     f"{decay:g}", str(len(rs)), f"{steps:,}", f"{total:.3g}",
                     f"{total / PAPER_CUMULATIVE_DECAY:.2g}",
                     f"{total / PAPER_CUMULATIVE_EFFECTIVE:.2g}", f"{math.exp(-total):.3f}",
                     f"{math.exp(-total / (1 - momentum)):.3g}"])
    rows.append(["paper (ImageNet)", "2:4", "2e-4 (1.6e-3 effective)", "-", f"{PAPER_STEPS:,}",
                 f"{PAPER_CUMULATIVE_DECAY:.1f} ({PAPER_CUMULATIVE_EFFECTIVE:.0f})", "1", "1",
                 f"{math.exp(-PAPER_CUMULATIVE_DECAY):.1e}",
                 f"{math.exp(-PAPER_CUMULATIVE_DECAY / 0.1):.0e}"])
    return _table(["rows", "pattern", "decay", "runs", "steps", "sum_t lr_t * decay",
                   "/ paper 6.0", "/ paper 48", "shrink exp(-sum)",
                   "with momentum 0.9: exp(-sum / 0.1)"], rows)


def runs_table(records: list[RunRecord]) -> str:
    rows = []
    for r in records:
        value = f"{r.summary['test_bpb']:.3f} bpb" if r.lm else f"{r.score:.2f} %"
        rows.append([r.name, value, str(r.summary["steps"]),
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


def verdict_table(verdicts: list[Claim]) -> str:
    """One line per claim: the verdict and the effect with its interval (details below)."""
    rows = []
    for i, c in enumerate(verdicts, 1):
        e = c.effect
        if e is not None:
            effect = f"{e.effect:+.3g} [{e.low:+.3g}, {e.high:+.3g}]"
            test = f"{e.test}, n={e.n_a}" + ("" if e.test == "paired" else f"/{e.n_b}")
        else:
            effect, test = c.interval or "-", "Pearson" if c.interval else "-"
        rows.append([str(i), c.claim, c.verdict, effect, test])
    return _table(["#", "claim", "verdict", "effect a - b [95 % CI]", "test"], rows)


def machine() -> str:
    cpu = cpu_model()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}, {cores} cores usable, Python {platform.python_version()}"


def _vision_intro(c: dict) -> str:
    return (f"{c['model']} (options {json.dumps(c['model_options'])}) on {c['data']}, SGD "
            f"momentum {c['momentum']:g}, lr {c['lr']:g} with {c['warmup_epochs']:g} warm-up "
            f"epochs then cosine, weight decay {c['weight_decay']:g}, batch {c['batch_size']}, "
            f"{c['epochs']} epochs per phase (ASP (2x): a dense phase, a one-shot prune, then "
            f"a fixed-mask retrain of the same length, so 2x the total budget; asp-1x: both "
            f"phases half as long), SR-STE decay {c['decay']:g}, layers kept dense: "
            f"{', '.join(c['exclude']) or 'none'} (plus layers whose input channels do not "
            "divide M). Params and MACs count the kept weights of sparse layers and dense "
            "layers in full. \"vs dense\" is the mean difference with its 95 % confidence "
            "interval over seeds (paired: every seed runs every row).")


def sections(records: list[RunRecord], images: Path, *, prefix: str, link: str,
             level: str = "##") -> list[str]:
    """The tables, figures, claims and decay view of one preset's runs."""
    parts: list[str] = []
    vision = [r for r in records if not r.lm]
    if vision:
        parts += [f"{level} Image classification (the paper's table, reshaped)", "",
                  _vision_intro(vision[0].config), "",
                  score_table(main_groups(records), lm=False), ""]
        extra = extra_table(records)
        if extra:
            parts += [f"{level}# Further methods", "", extra, ""]
        sweep = decay_groups(records)
        if sweep:
            parts += [f"{level}# SR-STE decay sweep", "", decay_table(sweep), ""]
        lay = layout_table(records)
        if lay:
            parts += [f"{level}# Grouping layout: input channels (hardware) vs flat (the "
                      "paper's)", "", "For a Linear layer (out, in) the two layouts are the "
                      "same groups (M consecutive inputs in memory); they differ for "
                      "convolutions.", "", lay, ""]
        corr = correlation_table(records)
        if corr:
            parts += [f"{level}# SAD and accuracy", "", "Pearson correlation across runs "
                      "of SAD summed over training with the final top-1, per pattern (the "
                      "CI is Fisher's z): over the main table's STE and SR-STE runs, and "
                      "with the decay sweep added, where the decay moves SAD and accuracy "
                      "together.", "", corr, ""]
        figures = [path for draw in FIGURES for path in draw(records, images, prefix)]
        parts += [line for path in figures for line in (f"![{path.stem}]({link}/{path.name})",
                                                         "")]
    lm = [r for r in records if r.lm]
    if lm:
        c = lm[0].config
        parts += [f"{level} Language model (bits per byte, lower is better)", "",
                  f"{c['model']} (options {json.dumps(c['model_options'])}) on `--data text` "
                  f"(default corpus), seq_len {c['seq_len']}, batch {c['batch_size']}, "
                  f"{c['epochs']} epoch(s) of {c['limit_train_batches'] or 'all'} steps, test "
                  f"on {c['limit_test_batches'] or 'all'} batches, SGD lr {c['lr']:g}.", "",
                  score_table(lm_groups(records), lm=True), ""]
    verdicts = claims(records)
    tally = {v: sum(c.verdict == v for c in verdicts) for v in dict.fromkeys(
        c.verdict for c in verdicts)}
    parts += [f"{level} The paper's claims, decided over seeds", "",
              "Rule: a paired t comparison over the seeds both sides share (Welch's t when "
              "they share fewer than 2); "
              "the effect is the mean advantage of a over b with its 95 % confidence "
              f"interval. Claims \"a beats b\": {RULES['greater']}; claims \"within m\": "
              f"{RULES['within'].format(m='m')}; claims \"close\": "
              f"{RULES['close'].format(m='m')}; otherwise \"not decided at this scale\". "
              "Fewer than 2 seeds on a side decides nothing. No multiple-comparison "
              "correction.", "",
              "Tally: " + ", ".join(f"{n} {v}" for v, n in tally.items()) + ".", ""]
    parts += [verdict_table(verdicts), ""]
    parts += [f"{i}. {claim.sentence()}" for i, claim in enumerate(verdicts, 1)]
    parts += ["", f"{level} Cumulative SR-STE decay against the paper's", "",
              "sum_t lr_t * decay from each run's logged learning rate (the factor "
              "exp(-sum) is how far the refinement term alone shrinks a weight that stays "
              f"pruned). The paper's ImageNet run: {PAPER_STEPS:,} steps, sum_t lr_t = "
              f"{PAPER_SUM_LR:,.0f}, so {PAPER_CUMULATIVE_DECAY:.1f} at the nominal 2e-4 and "
              f"{PAPER_CUMULATIVE_EFFECTIVE:.0f} at the effective 1.6e-3 of its 8-GPU code.",
              "", cumulative_table(records), ""]
    return parts


def _elapsed(records: list[RunRecord]) -> float | None:
    """First start to last finish, from each summary.json's time and the run's wall time."""
    ends = [(r.path / "summary.json").stat().st_mtime for r in records
            if (r.path / "summary.json").is_file()]
    if len(ends) != len(records) or not ends:
        return None  # a bundle: its folders are elsewhere
    return max(ends) - min(end - r.wall for end, r in zip(ends, records, strict=True))


def render(records: list[RunRecord], preset: str, images: Path, *, command: str,
           why: str = "", image_link: str = "images",
           merged: dict[str, list[RunRecord]] | None = None) -> str:
    """The Markdown report; writes its figures into ``images``."""
    images.mkdir(parents=True, exist_ok=True)
    torch_versions = sorted({r.summary.get("torch", "?") for r in records})
    devices = sorted({r.summary.get("device", "?") for r in records})
    total_wall = sum(r.wall for r in records)
    elapsed = _elapsed(records)
    parts = [
        "# Accuracy study: nmsparse against the SR-STE paper's claims",
        "",
        "Generated by `benchmarks/study/report.py` from the run folders; do not edit by hand.",
        "",
        f"- Command: `{command}`",
        f"- Preset: `{preset}`" + (f" ({why})" if why else ""),
        f"- Machine: {machine()}; device {', '.join(devices)}; torch "
        f"{', '.join(torch_versions)}",
        f"- Runs: {len(records)} finished; summed wall time {total_wall / 60:.1f} min"
        + (f", {elapsed / 60:.0f} min elapsed from the first start to the last finish (runs "
           "side by side)" if elapsed else "")
        + "; the machine was shared with other work, so times are as measured, not quiet",
        "- \"N:M\" means keep N of every M weights along the input dimension.",
        "",
    ]
    parts += sections(records, images, prefix="study", link=image_link)
    for name, runs in (merged or {}).items():
        devices = sorted({r.summary.get("device", "?") for r in runs})
        parts += [f"## Preset `{name}` (measured elsewhere, merged from its bundle)", "",
                  f"{len(runs)} runs on device {', '.join(devices)}; summed wall time "
                  f"{sum(r.wall for r in runs) / 60:.1f} min. Why these sizes: "
                  f"{PRESETS[name].why if name in PRESETS else '-'}", ""]
        parts += sections(runs, images, prefix=f"study-{name}", link=image_link,
                          level="###")
    parts += ["## Every run", "", runs_table(records), ""]
    return "\n".join(parts)


def write_report(root: Path, preset: str, results: Path, images: Path, *, command: str,
                 merge: list[Path] | None = None) -> str:
    """The report of ``preset``'s runs under ``root``, plus the bundles in ``merge``."""
    from .bundle import read_bundle

    records = [r for r in (load_run(root / s.name) for s in expand(preset)) if r]
    merged: dict[str, list[RunRecord]] = {}
    for path in merge or []:
        name, runs = read_bundle(path)
        if runs and name != preset:
            merged[name] = runs
    link = os.path.relpath(images, results.parent)
    text = render(records, preset, images, command=command, why=PRESETS[preset].why,
                  image_link=link, merged=merged)
    if results.is_file():  # the pre-registered study's section (power.py) stays in place
        old = results.read_text(encoding="utf-8")
        if power.START in old and power.END in old:
            text = power.splice(text, power.START + old.split(power.START, 1)[1]
                                .split(power.END, 1)[0] + power.END)
    results.parent.mkdir(parents=True, exist_ok=True)
    tmp = results.with_name(results.name + ".tmp")  # never a half-written report
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(results)
    return text
