"""The pre-registered SR-STE vs STE study (issue 26): configurations, seeds and test fixed
before any run, then run and decided by exactly that test.

``python -m benchmarks.study.power --jobs 2 --threads 1`` runs what is missing (a finished
run is skipped, an interrupted one resumed: the runner of :mod:`.runner`), then writes its
section of ``docs/results.md`` between two marker lines (the rest of the file is the ``cpu``
preset's report, which keeps this section when it is rewritten). ``--report-only`` writes
the section from the run folders alone; before any run it is the pre-registration.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import stats
from .grid import FASHION, RunSpec
from .records import RunRecord, load_run
from .runner import DEFAULT_ROOT, run_all

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "docs" / "results.md"
START = "<!-- power-study:start (benchmarks/study/power.py writes this section) -->"
END = "<!-- power-study:end -->"
# The follow-up's block (power_followup.py writes it) lies inside this section, before END.
FOLLOW_UP_START = "<!-- power-followup:start (benchmarks/study/power_followup.py writes this) -->"
FOLLOW_UP_END = "<!-- power-followup:end -->"

DELTA = 0.2  # the smallest SR-STE - STE gain (top-1 points) the study must detect
ALPHA, POWER = 0.05, 0.80
FLOOR = 8  # fewest seeds of any configuration: a planning sd from 5-8 seeds can be 2x off
Z_ALPHA, Z_POWER = 1.959964, 0.841621  # normal quantiles at 0.975 and 0.80


def seeds_for(sd: float, delta: float = DELTA, floor: int = FLOOR) -> int:
    """Pairs for a two-sided paired t at ALPHA with POWER against ``delta``: the normal
    approximation plus Guenther's small-sample term z_alpha^2 / 2, at least ``floor``."""
    n = ((Z_ALPHA + Z_POWER) * sd / delta) ** 2 + Z_ALPHA ** 2 / 2
    return max(floor, math.ceil(n))


def detectable(sd: float, n: int) -> float:
    """The gain detected with POWER at ALPHA by n pairs of paired sd ``sd`` (t quantiles)."""
    df = n - 1
    return (stats.t_quantile(1 - ALPHA / 2, df) + stats.t_quantile(POWER, df)) * sd / math.sqrt(n)


@dataclass(frozen=True)
class Arm:
    """One pre-registered comparison: SR-STE against STE at one pattern of one setting."""

    key: str
    setting: str  # "mlp512" or "lm"
    pattern: str
    planning_sd: float  # paired sd of SR-STE - STE in earlier runs
    sd_source: str
    seeds: int
    first_seed: int = 0  # a follow-up's new seeds start after the ones already run
    # the setting's training configuration when it is not one of this module's
    config: dict | None = field(default=None, hash=False, compare=False)

    @property
    def seed_range(self) -> range:
        return range(self.first_seed, self.first_seed + self.seeds)


# Earlier paired sds of SR-STE - STE (issue 26 and docs/results.md's cpu preset):
#   1:8, MLP 512: 8 seeds of `nmsparse train` at this recipe, +0.16 [-0.10, +0.42] -> sd 0.31;
#   1:16, MLP 512: 8 seeds, +0.02 [-0.05, +0.08] -> sd 0.065 * sqrt(8) / t(7) = 0.078;
#   2:4: no 512-wide runs; the 128-wide cpu preset, 5 seeds, [-0.17, +0.12] -> sd 0.115;
#   LM 2:4, cpu preset, 3 seeds at 200 steps: differences 0.010, 0.011, 0.018 bpb -> 0.0044.
MLP_ARMS = (
    Arm("mlp512-1:8", "mlp512", "1:8", 0.31, "8 seeds, MLP 512 at this recipe (issue 26)",
        seeds_for(0.31)),
    Arm("mlp512-2:4", "mlp512", "2:4", 0.115, "5 seeds, MLP 128 (cpu preset)",
        seeds_for(0.115)),
    Arm("mlp512-1:16", "mlp512", "1:16", 0.078, "8 seeds, MLP 512 at this recipe (issue 26)",
        seeds_for(0.078)),
)
LM_DELTA = 0.01  # bits per byte
LM_ARM = Arm("lm-2:4", "lm", "2:4", 0.0044, "3 seeds at 200 steps (cpu preset)",
             seeds_for(0.0044, LM_DELTA, floor=5))

MLP512 = {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-5,
          "decay": 2e-4, "layout": "in", "exclude": ["classifier"], "data": "fashion-mnist",
          "data_dir": FASHION, "model": "mlp", "model_options": {"hidden": [512, 512]},
          "epochs": 5, "batch_size": 128, "warmup_epochs": 0.5, "device": "cpu",
          "plots": False, "log_every": 20}
LM = {"data": "text", "model": "gpt_tiny", "seq_len": 64,
      "model_options": {"n_layer": 2, "n_head": 2, "d_model": 64}, "optimizer": "sgd",
      "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-5, "decay": 2e-4, "epochs": 1,
      "batch_size": 16, "limit_train_batches": 600, "limit_test_batches": 20,
      "warmup_epochs": 0.1, "log_every": 10, "device": "cpu", "plots": False}

PREREGISTRATION = f"""\
Pre-registered on 2026-12-07 before any of its runs (the commit that added this text to
`benchmarks/study/power.py` and `docs/results.md` precedes every result below; the
configuration, seeds and test were not changed afterwards).

- **Question.** Does SR-STE beat STE (the paper's central claim) when the test has the power
  to see a gain of {DELTA} top-1 points? Earlier CPU runs left it "not decided".
- **Configurations (confirmatory).** MLP 784-512-512-10 on the full Fashion-MNIST (60,000 /
  10,000), 5 epochs at batch 128 (2,340 steps: 2.5x the 936 steps of the `cpu` preset, at
  4x its width), SGD momentum 0.9, lr 0.1, 0.5 warm-up epochs then cosine, weight decay 5e-5,
  SR-STE decay 2e-4, the classifier dense, one thread per run; SR-STE and STE on the same
  seeds at 2:4, 1:8 and 1:16. Language model: gpt_tiny (2 layers, d_model 64) on the default
  byte corpus, 600 steps of 16 x 64 bytes (3x the `cpu` preset's 200), tested on 20 batches;
  dense, STE 2:4 and SR-STE 2:4 on the same seeds.
- **Seeds (power).** n = ceil(((z_0.975 + z_0.80) sd / delta)^2 + z_0.975^2 / 2) (the normal
  approximation with Guenther's small-sample term for a paired t), at least {FLOOR} because
  a planning sd from 5-8 seeds can be off by a factor of 2; delta {DELTA} points ({LM_DELTA}
  bits/byte for the LM), two-sided alpha {ALPHA}, power {POWER}. Planning sds and seeds:
  1:8 sd 0.31 -> {MLP_ARMS[0].seeds} seeds; 2:4 sd 0.115 -> {MLP_ARMS[1].seeds}; 1:16 sd 0.078
  -> {MLP_ARMS[2].seeds}; LM sd 0.0044 bits/byte -> {LM_ARM.seeds} (at least 5 for the dense
  comparison). After the runs the observed sd and the gain these seeds detect with 80 %
  power are reported next to each verdict.
- **Left out, and why.** The small ResNet-style conv net (resnet20 at width 0.5) was
  measured first: 0.2 s a step on one thread, so one epoch of Fashion-MNIST is ~95 s
  before load, and {MLP_ARMS[0].seeds} seeds x 2 methods x even 1 epoch would take ~70 min of
  the ~85 min this session has on 2 shared cores. Rather than many underpowered
  configurations, the conv net is not in this study (it stays in the `gpu` preset). The
  512-wide MLP is not trained longer than 5 epochs for the same reason (a 5-epoch run takes
  ~75 s on a quiet core, twice that under load).
- **Claims and test.** Per pattern, "SR-STE beats STE": the paired t test of the per-seed
  difference SR-STE - STE in top-1 (seed s of both methods starts from the same
  initialisation and data order), two-sided at 5 %, with its 95 % confidence interval.
  Verdict: reproduced if the CI lies above 0, reversed if below 0; otherwise "no gain of
  {DELTA} points" when the CI lies below +{DELTA} (a bound, which the power makes likely when
  there is no gain), else not decided. LM: "SR-STE beats STE at 2:4" the same way on bits
  per byte (lower is better, bound {LM_DELTA}); "SR-STE 2:4 within 2 % of dense": reproduced
  if the CI of dense - SR-STE lies above -2 % of the dense mean, reversed if below.
  Secondary (not powered): "the gain grows with sparsity" (gain at 1:16 minus gain at 2:4,
  paired over the seeds both share) and SAD. No multiple-comparison correction; the three
  patterns are reported separately.
- **Order and stopping.** Runs go 1:8 first (all seeds), then the LM, then 2:4 and 1:16,
  two at a time, one thread each; nothing is stopped early on the data. A configuration
  left unfinished by the deadline is reported as unfinished, not decided on fewer seeds.
"""


def _for_method(base: dict, method: str) -> dict:
    """``base`` with its SR-STE decay as a method option of SR-STE only. STE refuses a decay
    since the decay became a method option; stage 1 ran before, when every run saved a
    top-level ``decay`` that STE ignored: the resolved configuration is the same but for that
    deprecated key (2e-4 then, None now), so the run ids differ from stage 1's."""
    out = {k: v for k, v in base.items() if k != "decay"}
    if method == "srste":
        out["method_options"] = {"decay": base["decay"]}
    return out


def arm_specs(arm: Arm) -> list[RunSpec]:
    out: list[RunSpec] = []
    for seed in arm.seed_range:
        if arm.config is not None:
            base = arm.config
        elif arm.setting == "lm":
            out.append(RunSpec("lm", {**_for_method(LM, "srste"), "pattern": "dense",
                                      "method": "srste", "seed": seed}))
            base = LM
        else:
            base = MLP512
        for method in ("ste", "srste"):
            out.append(RunSpec("lm" if arm.setting == "lm" else "main",
                               {**_for_method(base, method), "pattern": arm.pattern,
                                "method": method, "seed": seed}))
    return out


def specs() -> list[RunSpec]:
    """Every run in the pre-registered order: 1:8, the LM, then 2:4 and 1:16."""
    order = [MLP_ARMS[0], LM_ARM, MLP_ARMS[1], MLP_ARMS[2]]
    return [spec for arm in order for spec in arm_specs(arm)]


def records_of(run_specs: list[RunSpec], root: Path) -> dict[str, RunRecord]:
    """The finished runs among ``run_specs``, by run name."""
    out = {}
    for spec in run_specs:
        record = load_run(root / spec.name)
        if record is not None:
            out[spec.name] = record
    return out


Scores = dict[tuple[str, int], float]  # (method, seed) -> top-1 or bits per byte


def arm_scores(arm: Arm, records: dict[str, RunRecord]) -> Scores:
    """The finished scores of ``arm``'s runs."""
    by = {}
    for spec in arm_specs(arm):
        r = records.get(spec.name)
        if r is not None:
            by[(r.method, r.seed)] = r.score
    return by


def _pairs(arm: Arm, by: Scores, a: str, b: str) -> tuple[list[float], list[float]]:
    seeds = [s for s in arm.seed_range if (a, s) in by and (b, s) in by]
    return [by[(a, s)] for s in seeds], [by[(b, s)] for s in seeds]


def verdict(cmp: stats.Comparison, bound: float) -> str:
    if cmp.low > 0:
        return "reproduced"
    if cmp.high < 0:
        return "reversed"
    if cmp.high < bound:
        return f"no gain of {bound:g} (not reproduced)"
    return "not decided"


def gain_row(arm: Arm, scores: Scores) -> list[str]:
    """One row of the gains table: SR-STE against STE over ``arm``'s seeds, and the
    verdict once every registered seed has finished."""
    lm = arm.setting == "lm"
    srste, ste = _pairs(arm, scores, "srste", "ste")
    n = len(srste)
    done = f"{n} / {arm.seeds}"
    if n < 2:
        return [arm.key, done, "-", "-", "-", "-", "-", "unfinished" if n else "not run"]
    # Lower bits per byte is better: the gain is STE - SR-STE there.
    a, b = (ste, srste) if lm else (srste, ste)
    cmp = stats.paired(a, b)
    sd = statistics.stdev([x - y for x, y in zip(a, b, strict=True)])
    digits = 4 if lm else 2
    return [arm.key, done, f"{statistics.mean(srste):.{digits}f}",
            f"{statistics.mean(ste):.{digits}f}",
            f"{cmp.effect:+.{digits}f} [{cmp.low:+.{digits}f}, {cmp.high:+.{digits}f}]",
            f"{cmp.p:.2g}", f"{sd:.{digits}f} (planned {arm.planning_sd:g}); detects "
            f"{detectable(sd, n):.{digits}f}",
            # Fewer seeds than registered decide nothing (the pre-registration's stopping rule).
            verdict(cmp, LM_DELTA if lm else DELTA) if n == arm.seeds
            else "unfinished: interim numbers, no verdict"]


def decay_row(key: str, runs: list[RunRecord]) -> list[str] | None:
    """The cumulative SR-STE decay of one configuration's runs (None when none logged it)."""
    sums = [c for r in runs if (c := r.cumulative_decay())]
    if not sums:
        return None
    steps = max(s for s, _ in sums)
    total = statistics.mean(t for _, t in sums)
    return [key, f"{steps:,}", f"{total:.3g}", f"{total / 6.0:.2g}"]


DECAY_HEADERS = ["arm", "steps", "sum_t lr_t * decay", "/ paper's 6.0"]
GAIN_HEADERS = ["arm", "seeds done", "SR-STE", "STE", "gain [95 % CI]", "p",
                "paired sd; detects", "verdict"]


def _decay_rows(records: dict[str, RunRecord]) -> list[list[str]]:
    rows = []
    for arm in (*MLP_ARMS, LM_ARM):
        row = decay_row(arm.key, [r for r in records.values() if r.method == "srste"
                                  and r.pattern == arm.pattern
                                  and r.lm == (arm.setting == "lm")])
        if row:
            rows.append(row)
    return rows


def usage(records: dict[str, RunRecord]) -> str:
    """CPU and wall time of the finished runs."""
    cpus = [r.meta.get("cpu_seconds", 0.0) for r in records.values()]
    walls = [r.wall for r in records.values()]
    return (f"CPU time {sum(cpus) / 3600:.2f} h (user + system of every training process), "
            f"summed wall time {sum(walls) / 3600:.2f} h; a run took {min(walls):.0f}-"
            f"{max(walls):.0f} s of wall time (median {statistics.median(walls):.0f} s) for a "
            f"median {statistics.median(cpus):.0f} s of CPU")


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def section(root: Path = DEFAULT_ROOT) -> str:
    """The study's Markdown section: the pre-registration, then what the runs say."""
    records = records_of(specs(), root)
    parts = [START, "", "## Pre-registered study: SR-STE against STE with power (issue 26)",
             "", "### Pre-registration", "", PREREGISTRATION]
    if not records:
        parts += ["### Results", "", "No run has finished yet.", "", END]
        return "\n".join(parts)
    parts += ["### Results", "",
              f"{len(records)} of {len(specs())} runs finished; {usage(records)}, on 2 CPU "
              "cores shared with other sessions, where the pre-registration planned on 75-150 "
              "s: other sessions kept the machine's load average between about 7 and 20 for "
              "the first hour.", "",
              "Gain is SR-STE - STE in top-1 points (LM: STE - SR-STE in bits per byte, so "
              "positive favours SR-STE), paired over seeds, 95 % CI; \"detects\" is the gain "
              "these seeds detect with 80 % power at the observed sd.", "",
              table(GAIN_HEADERS, [gain_row(arm, arm_scores(arm, records))
                                   for arm in (*MLP_ARMS, LM_ARM)]), ""]
    parts += _secondary(records)
    rows = _decay_rows(records)
    if rows:
        parts += ["Cumulative SR-STE decay sum_t lr_t * decay per configuration (the paper's "
                  "ImageNet run: 6.0):", "",
                  table(DECAY_HEADERS, rows), ""]
    parts.append(END)
    return "\n".join(parts)


def _secondary(records: dict[str, RunRecord]) -> list[str]:
    out = []
    two, _, sixteen = MLP_ARMS
    g2 = dict(zip(*_seeded_gain(two, records), strict=True))
    g16 = dict(zip(*_seeded_gain(sixteen, records), strict=True))
    shared = sorted(set(g2) & set(g16))
    if len(shared) >= 2:
        cmp = stats.paired([g16[s] for s in shared], [g2[s] for s in shared])
        out.append(f"- Secondary, not powered: the gain grows with sparsity (gain at 1:16 "
                   f"minus gain at 2:4): {cmp.text()}; "
                   f"{verdict(cmp, DELTA).split(' (')[0]}.")
    lm_dense, lm_srste = _pairs(LM_ARM, arm_scores(LM_ARM, records), "dense", "srste")
    if len(lm_dense) == LM_ARM.seeds:
        cmp = stats.paired(lm_dense, lm_srste)
        margin = -0.02 * statistics.mean(lm_dense)
        word = ("reproduced" if cmp.low > margin else "reversed" if cmp.high < margin
                else "not decided")
        out.append(f"- LM: SR-STE 2:4 within 2 % of dense bits per byte (dense "
                   f"{statistics.mean(lm_dense):.4f}, SR-STE {statistics.mean(lm_srste):.4f}; "
                   f"dense - SR-STE {cmp.text(digits=4)}, margin {margin:+.4f}): {word}.")
    sad = []
    for arm in MLP_ARMS:
        pairs = [(r.sad_total, q.sad_total) for r in records.values() for q in records.values()
                 if r.pattern == q.pattern == arm.pattern and not r.lm and not q.lm
                 and r.seed == q.seed and r.method == "ste" and q.method == "srste"
                 and r.sad_total is not None and q.sad_total is not None]
        if len(pairs) >= 2:
            cmp = stats.paired([a for a, _ in pairs], [b for _, b in pairs])
            sad.append(f"{arm.pattern} {cmp.effect:+,.0f} [{cmp.low:+,.0f}, {cmp.high:+,.0f}]")
    if sad:
        out.append("- Secondary: SAD summed over training, STE - SR-STE (positive: SR-STE "
                   "flips fewer mask entries): " + "; ".join(sad) + ".")
    return [*out, ""] if out else []


def _seeded_gain(arm: Arm, records: dict[str, RunRecord]) -> tuple[list[int], list[float]]:
    by = {(r.method, r.seed): r.score for r in records.values()
          if not r.lm and r.pattern == arm.pattern}
    seeds = [s for s in range(arm.seeds) if ("srste", s) in by and ("ste", s) in by]
    return seeds, [by[("srste", s)] - by[("ste", s)] for s in seeds]


def splice(text: str, block: str, start: str = START, end: str = END) -> str:
    """``text`` with its section marked by ``start`` and ``end`` replaced by ``block``
    (appended when it has none)."""
    if start in text and end in text:
        head, rest = text.split(start, 1)
        return head + block + rest.split(end, 1)[1]
    return text.rstrip("\n") + "\n\n" + block + "\n"


def marked(text: str, start: str, end: str) -> str | None:
    """The block of ``text`` from ``start`` to ``end`` (markers included), or None."""
    if start not in text or end not in text.split(start, 1)[1]:
        return None
    return start + text.split(start, 1)[1].split(end, 1)[0] + end


def write_section(results: Path = RESULTS, root: Path = DEFAULT_ROOT) -> None:
    old = results.read_text(encoding="utf-8") if results.is_file() else ""
    block = section(root)
    follow_up = marked(old, FOLLOW_UP_START, FOLLOW_UP_END)
    if follow_up:  # the follow-up (power_followup.py) sits inside this section: keep it
        block = block.replace(END, follow_up + "\n\n" + END)
    atomic_write(results, splice(old, block))


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def command_line(argv: list[str] | None, *, prog: str, description: str, specs_of, write,
                 label: str) -> int:
    """The command line of a study stage: ``--list`` its runs, run them, then ``write`` the
    report. With no finished run under ``--root`` it writes nothing: the report in the
    results file may rest on run folders that are gone (stage 1's were), and "no run has
    finished" must not replace it."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--list", action="store_true", help="the runs, in their order")
    args = parser.parse_args(argv)
    if args.list:
        for spec in specs_of():
            print(spec.name)
        return 0
    if not args.report_only:
        run_all(specs_of(), args.root, jobs=args.jobs, threads=args.threads)
    if not records_of(specs_of(), args.root):
        print(f"[{label}] no finished run under {args.root}: {args.results} left as it is",
              file=sys.stderr)
        return 1
    write(args.results, args.root)
    print(f"[{label}] written into {args.results}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return command_line(argv, prog="python -m benchmarks.study.power",
                        description=__doc__.split("\n\n")[0], specs_of=specs,
                        write=write_section, label="power")


if __name__ == "__main__":
    sys.exit(main())
