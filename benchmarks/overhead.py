"""Training-step overhead of N:M sparse training (nmsparse) relative to the same dense model.

For each model the dense and the sparse copy (same initial weights, ``nmsparse.sparsify``)
are trained side by side with an ordinary loop (``opt.zero_grad(); loss.backward();
opt.step()``, SGD with momentum 0.9 and weight decay 5e-5). Their steps alternate, so a
noisy machine slows both alike; the table reports the median step time of each after the
warm-up steps (which include building the native mask pass or compiling the fused mask
kernels) and their ratio.

    python benchmarks/overhead.py            # full run, writes benchmarks/results/overhead.md
    python benchmarks/overhead.py --quick    # fewer steps
    python benchmarks/overhead.py --check    # compiled vs eager mask kernels, bit for bit
    python benchmarks/overhead.py --device cuda --cases gpu   # GPU-sized batches, ViT too
    python benchmarks/overhead.py --mask-path compiled   # the torch.compile mask kernels

The breakdown section times the parts of a sparse step: forward+backward, the optimizer
step with its hooks, and inside them the SR-STE gradient term (``add_decay_``) and the mask
refresh (``refresh_``) of all layers.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import nmsparse
from nmsparse.engine import fused
from nmsparse.machine import cpu_model
from nmsparse.patterns import NM

RESULTS = Path(__file__).resolve().parent / "results" / "overhead.md"


@dataclass(frozen=True)
class Case:
    name: str
    size: str  # batch / tokens, for the table
    target: float | None  # the ratio the srste row should meet
    build: Callable[[], nn.Module]
    batch: Callable[[torch.device], tuple[torch.Tensor, torch.Tensor]]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    target_device: str = "cpu"  # where ``target`` applies


def small_cnn() -> nn.Module:
    # The PyTorch MNIST example network (without dropout).
    return nn.Sequential(
        nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(9216, 128), nn.ReLU(), nn.Linear(128, 10))


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 1024), nn.ReLU(),
        nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 1024))


def cases() -> list[Case]:
    def images(device):
        return (torch.randn(128, 1, 28, 28, device=device),
                torch.randint(0, 10, (128,), device=device))

    def tokens(count):
        def make(device):
            return (torch.randn(count, 1024, device=device),
                    torch.randn(count, 1024, device=device))
        return make

    return [
        Case("small CNN (conv 1-32-64 3x3, linear 9216-128-10)", "batch 128, 28x28", 1.05,
             small_cnn, images, nn.functional.cross_entropy),
        Case("MLP 1024-4096-1024-4096-1024", "256 tokens", 1.25, mlp, tokens(256),
             nn.functional.mse_loss),
        Case("MLP 1024-4096-1024-4096-1024", "2048 tokens", 1.05, mlp, tokens(2048),
             nn.functional.mse_loss),
    ]


def vit() -> nn.Module:
    from nmsparse.app.models import create_model

    return create_model("vit_tiny", input_shape=(3, 32, 32), num_classes=10, dim=384,
                        heads=6, depth=6)


def gpu_cases() -> list[Case]:
    """Batches that fill a GPU: its target (<= 1.05x) is for large batches, where the
    per-step mask work is small next to the forward and backward passes."""
    def images(batch, channels):
        def make(device):
            return (torch.randn(batch, channels, 28 + 4 * (channels == 3),
                                28 + 4 * (channels == 3), device=device),
                    torch.randint(0, 10, (batch,), device=device))
        return make

    def tokens(device):
        return (torch.randn(8192, 1024, device=device), torch.randn(8192, 1024, device=device))

    cross_entropy = nn.functional.cross_entropy
    return [
        Case("small CNN (conv 1-32-64 3x3, linear 9216-128-10)", "batch 2048, 28x28", 1.05,
             small_cnn, images(2048, 1), cross_entropy, "cuda"),
        Case("MLP 1024-4096-1024-4096-1024", "8192 tokens", 1.05, mlp, tokens,
             nn.functional.mse_loss, "cuda"),
        Case("ViT (vit_tiny dim 384, depth 6, 6 heads, 8x8 patches of 4 px)",
             "batch 512, 32x32", 1.05, vit, images(512, 3), cross_entropy, "cuda"),
    ]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_pair(case: Case, method: str, device: torch.device):
    torch.manual_seed(0)
    dense = case.build().to(device)
    sparse = case.build().to(device)
    sparse.load_state_dict(dense.state_dict())
    handle = nmsparse.sparsify(sparse, "2:4", method=method)
    return dense, sparse, handle


class ForeignLoad:
    """CPU time used by other processes, from /proc (Linux): on a shared machine a pair of
    steps during which others ran is remeasured instead of trusted."""

    def __init__(self, enabled: bool = True) -> None:
        self.ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.available = enabled and self._read() is not None

    @staticmethod
    def _read() -> tuple[int, int] | None:
        try:
            fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
            own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
            return (user + nice + system + irq + softirq + steal,
                    int(own[11]) + int(own[12]))  # utime + stime of this process
        except (OSError, ValueError, IndexError):
            return None

    def start(self) -> tuple[float, tuple[int, int] | None]:
        return time.perf_counter(), self._read()

    def wait_until_idle(self, patience: float) -> None:
        """Sleep (up to ``patience`` seconds) until others leave the CPU alone for 0.3 s."""
        deadline = time.perf_counter() + patience
        while self.available and time.perf_counter() < deadline:
            mark = self.start()
            time.sleep(0.3)
            if not self.busy(mark):
                return

    def busy(self, mark: tuple[float, tuple[int, int] | None]) -> bool:
        """Did other processes use more than ~5 % of the machine since ``mark``?"""
        now = self._read() if self.available else None
        if mark[1] is None or now is None:
            return False
        foreign = (now[0] - mark[1][0]) - (now[1] - mark[1][1])
        wall = time.perf_counter() - mark[0]
        return foreign > 2 + 0.05 * wall * self.ticks * (os.cpu_count() or 1)


def run_case(case: Case, method: str, device: torch.device, warmup: int, steps: int) -> dict:
    dense, sparse, handle = make_pair(case, method, device)
    x, y = case.batch(device)
    times: dict[tuple[str, str], list[float]] = {}
    opts = {}
    for tag, model in (("dense", dense), ("sparse", sparse)):
        opts[tag] = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9,
                                    weight_decay=5e-5)

    def step(tag: str, model: nn.Module) -> None:
        opt = opts[tag]
        sync(device)
        t0 = time.perf_counter()
        opt.zero_grad()
        case.loss(model(x), y).backward()
        sync(device)
        t1 = time.perf_counter()
        opt.step()
        sync(device)
        t2 = time.perf_counter()
        for part, value in (("fwd+bwd", t1 - t0), ("step", t2 - t1), ("total", t2 - t0)):
            times.setdefault((tag, part), []).append(value * 1e3)

    for _ in range(warmup):
        step("dense", dense)
        step("sparse", sparse)
    times.clear()
    # On a GPU the timed work is the device's: no waiting for the host CPU to be idle.
    load = ForeignLoad(enabled=device.type == "cpu")
    clean: dict[tuple[str, str], list[float]] = {}
    noisy = 0
    # Alternate dense and sparse steps so slow drifts hit both alike; drop pairs during which
    # other processes used the CPU (up to 4x the asked number of pairs), then take medians.
    for _ in range(4 * steps):
        load.wait_until_idle(patience=20.0)
        mark = load.start()
        step("dense", dense)
        step("sparse", sparse)
        if load.busy(mark):
            noisy += 1
        else:
            for key, values in times.items():
                clean.setdefault(key, []).append(values[-1])
            if len(clean[("dense", "total")]) >= steps:
                break
    if len(clean.get(("dense", "total"), [])) < 3:  # too busy: use everything, say so
        clean = times
    result = {key: statistics.median(values) for key, values in clean.items()}
    result[("pairs", "timed")] = len(clean[("dense", "total")])
    result[("pairs", "dropped")] = noisy
    result.update(kernel_times(handle, method, device, steps))
    return result


def kernel_times(handle, method: str, device: torch.device, reps: int) -> dict:
    """Median time of all layers' SR-STE term and mask refresh (what the step hooks run)."""
    weights = list(handle)
    decay = getattr(handle.method, "decay", 0.0)
    parts: dict[str, list[float]] = {"add_decay_": [], "refresh_": []}
    for _ in range(reps + 1):
        for w in weights:
            w.dense.grad = torch.zeros_like(w.dense)
        sync(device)
        t0 = time.perf_counter()
        if decay:
            for w in weights:
                w.add_pruned_to_grad(decay)
        sync(device)
        t1 = time.perf_counter()
        for w in weights:
            w.refresh()
        sync(device)
        t2 = time.perf_counter()
        parts["add_decay_"].append((t1 - t0) * 1e3)
        parts["refresh_"].append((t2 - t1) * 1e3)
    return {("kernels", k): statistics.median(v[1:]) for k, v in parts.items()}


def profile_case(case: Case, method: str, device: torch.device, steps: int) -> str:
    """torch.profiler table of the sparse model's optimizer steps (the hooks' work)."""
    from torch.profiler import ProfilerActivity, profile

    _, sparse, _ = make_pair(case, method, device)
    x, y = case.batch(device)
    opt = torch.optim.SGD(sparse.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-5)
    for _ in range(2):
        opt.zero_grad()
        case.loss(sparse(x), y).backward()
        opt.step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                           if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            opt.zero_grad()
            case.loss(sparse(x), y).backward()
            opt.step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)


def machine() -> str:
    cpu = cpu_model()
    text = (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}")
    if torch.cuda.is_available():
        text += f", GPU: {torch.cuda.get_device_name(0)}"
    return text


# --mask-path: (set_native, set_compile) for nmsparse.engine.fused
MASK_PATHS = {"auto": (None, None), "native": (True, None), "compiled": (False, None),
              "eager": (False, False)}


def benchmark(args: argparse.Namespace) -> str:
    native, compiled = MASK_PATHS[args.mask_path]
    fused.set_native(native)
    fused.set_compile(compiled)
    devices = [torch.device(d) for d in args.device]
    warmup, steps = (2, 5) if args.quick else (3, 9)
    lines = [
        "# nmsparse training-step overhead vs the dense model", "",
        f"- machine: {machine()}",
        f"- command: `{shlex.join(['python', *sys.argv])}`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M:%S')}",
        f"- mask pass: {args.mask_path} (native C++ pass on the CPU: "
        f"{fused.status()['native'] or 'runs'}; compiled kernels: "
        f"{ {None: 'auto', True: 'on', False: 'off'}[fused.compile_mode()]}, auto: CPU weights "
        f"of >= {fused.COMPILE_MIN_NUMEL} elements the native pass does not take)",
        f"- {warmup} warm-up steps (not timed, they include compiling), then the median of "
        f"{steps} steps; dense and sparse steps alternate, and a pair of steps during which "
        "other processes used the CPU is dropped and repeated (at most 4x; before each pair "
        "the run waits up to 20 s for the CPU to be idle). "
        "SGD(lr=1e-3, momentum=0.9, weight_decay=5e-5), pattern 2:4.",
        "",
        "| device | model | size | method | dense ms | sparse ms | ratio | target "
        "| step pairs timed (dropped: other processes busy) |",
        "|---|---|---|---|---:|---:|---:|---|---|",
    ]
    breakdown = [
        "", "## Where the sparse step's time goes (ms, medians)", "",
        "| device | model | size | method | fwd+bwd dense | fwd+bwd sparse | opt.step dense "
        "| opt.step sparse | add_decay_ (all layers) | refresh_ (all layers) |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for device in devices:
        for case in gpu_cases() if args.cases == "gpu" else cases():
            for method in args.methods:
                r = run_case(case, method, device, warmup, steps)
                ratio = r[("sparse", "total")] / r[("dense", "total")]
                target = ""
                # the CPU cases' targets are for the 2-core CPU they were written for
                if (case.target is not None and method == "srste"
                        and device.type == case.target_device):
                    verdict = "met" if ratio <= case.target else "MISSED"
                    target = f"<= {case.target:.2f} ({verdict})"
                row = (f"| {device.type} | {case.name} | {case.size} | {method} | "
                       f"{r[('dense', 'total')]:.1f} | {r[('sparse', 'total')]:.1f} | "
                       f"{ratio:.3f} | {target} | {r[('pairs', 'timed')]} "
                       f"({r[('pairs', 'dropped')]}) |")
                lines.append(row)
                print(row, flush=True)
                breakdown.append(
                    f"| {device.type} | {case.name} | {case.size} | {method} | "
                    f"{r[('dense', 'fwd+bwd')]:.1f} | {r[('sparse', 'fwd+bwd')]:.1f} | "
                    f"{r[('dense', 'step')]:.1f} | {r[('sparse', 'step')]:.1f} | "
                    f"{r[('kernels', 'add_decay_')]:.1f} | {r[('kernels', 'refresh_')]:.1f} |")
    text = "\n".join(lines + breakdown) + "\n"
    if args.profile:
        case = cases()[1]
        table = profile_case(case, "srste", devices[0], 3)
        text += (f"\n## torch.profiler: 3 srste steps of the {case.name}, {case.size} "
                 f"({devices[0].type})\n\n```\n{table}\n```\n")
    return text


# ---------------------------------------------------------------------------------------
# --check: the compiled kernels against the eager reference


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (torch.equal calls -0.0 == 0.0 and NaN != NaN), except that NaNs only
    need to be NaN: the compiled kernels compute 16-bit floats in float32, which can change
    a NaN's payload bits."""
    def bits(t):
        return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])

    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(bits(a)[~nan], bits(b)[~nan])


def _weights(shape, dtype, kind: str, generator: torch.Generator) -> torch.Tensor:
    if kind == "ties":  # a small integer set: many equal |w| within a group
        return torch.randint(-2, 3, shape, generator=generator).to(dtype)
    weight = torch.randn(shape, generator=generator).to(dtype)
    if kind == "nonfinite":
        flat = weight.view(-1)
        flat[3] = float("nan")
        flat[-1] = float("inf")
        flat[flat.numel() // 2] = float("-inf")
    return weight


def check(args: argparse.Namespace) -> bool:
    """Compiled vs eager: masks, masked weights, the finite flag, fixed-mask refresh and
    the SR-STE gradient term, for random shapes, both layouts, several patterns/dtypes."""
    device = torch.device(args.device[0])
    generator = torch.Generator().manual_seed(0)
    patterns = [NM(2, 4)] if args.quick else [NM(2, 4), NM(1, 8), NM(4, 16)]
    dtypes = [torch.float32] if args.quick else [torch.float32, torch.bfloat16]
    # Linear, odd row count, conv2d (grouped axis stride 9), conv with stride 5, conv1d, and
    # one above the automatic size threshold.
    shapes = [(96, 160), (33, 112), (40, 32, 3, 3), (24, 64, 5, 1), (16, 48, 3), (256, 1024)]
    fused.set_native(False)  # compiled against eager (tests/test_fused_native.py: the native pass)
    failures = 0
    compared = 0
    decay_diffs = 0
    decay_total = 0
    start = time.perf_counter()
    for pattern in patterns:
        for dtype in dtypes:
            for layout in ("in", "flat"):
                for shape in shapes:
                    if layout == "in" and shape[1] % pattern.m:
                        continue
                    for kind in ("normal", "ties", "nonfinite"):
                        weight = _weights(shape, dtype, kind, generator).to(device)
                        ok, diffs = _check_one(weight, pattern, layout)
                        compared += 1
                        decay_diffs += diffs
                        decay_total += weight.numel()
                        if not ok:
                            failures += 1
                            print(f"MISMATCH {pattern} {dtype} {layout} {shape} {kind}")
    fused.set_compile(None)
    fused.set_native(None)
    print(f"check: {compared} cases, {failures} mismatches in masks / masked weights / "
          f"finite flags / fixed-mask refresh; add_decay_: {decay_diffs} of {decay_total} "
          f"entries differ from eager (allowed: rounding of eager's fused multiply-add); "
          f"compiled kernels: {fused.status()['kernels']}, dynamo graphs: "
          f"{torch._dynamo.utils.counters['stats']['unique_graphs']} (equal: no recompiles "
          f"across shapes and layouts); {time.perf_counter() - start:.0f} s"
          + (" -- compiled path FAILED, fell back to eager" if fused.status()["broken"] else ""))
    return failures == 0 and not fused.status()["broken"]


def _check_one(weight: torch.Tensor, pattern: NM, layout: str) -> tuple[bool, int]:
    results = {}
    for compiled in (False, True):
        fused.set_compile(compiled)
        w = weight.clone()
        mask = torch.zeros(w.shape, dtype=torch.bool, device=w.device)  # contiguous
        masked = torch.empty_like(w)
        grouped = NM(pattern.n, pattern.m, layout)
        finite = fused.refresh_(w, mask, masked, grouped, recompute=True)
        fixed_w = weight.clone()
        fixed_masked = torch.empty_like(w)
        fixed_finite = fused.refresh_(fixed_w, mask, fixed_masked, grouped, recompute=False)
        grad = torch.randn(w.shape, generator=torch.Generator().manual_seed(1)).to(w)
        fused.add_decay_(grad, w, mask, 2e-4)
        results[compiled] = (mask, masked, bool(finite), fixed_w, fixed_masked,
                             bool(fixed_finite), grad)
    eager, compiled_result = results[False], results[True]
    reference_mask = NM(pattern.n, pattern.m, layout).mask(weight.abs())
    zero = torch.zeros((), dtype=weight.dtype, device=weight.device)
    ok = (torch.equal(eager[0], reference_mask) and torch.equal(compiled_result[0], eager[0])
          and _same(compiled_result[1], torch.where(eager[0], weight, zero))
          and compiled_result[2] == eager[2] == bool(torch.isfinite(weight).all())
          and _same(compiled_result[3], eager[3]) and _same(compiled_result[4], eager[4])
          and compiled_result[5] == eager[5])
    finite = torch.isfinite(weight)
    if bool(finite.all()):
        diff = compiled_result[6] != eager[6]
        # a difference must be one rounding step: at most one unit in the last place
        spacing = torch.finfo(weight.dtype).eps * eager[6].abs().float().clamp_min(1e-30)
        gap = (compiled_result[6].float() - eager[6].float()).abs()
        ok = ok and bool((gap <= spacing).all())
        return ok, int(diff.sum())
    return ok, 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps / check cases")
    parser.add_argument("--device", nargs="+", default=None,
                        help="devices to run on (default: cpu, and cuda if available)")
    parser.add_argument("--methods", nargs="+", default=["srste", "ste", "fixed"],
                        choices=["srste", "ste", "fixed"])
    parser.add_argument("--cases", choices=["cpu", "gpu"], default="cpu",
                        help="the CPU-sized cases (default) or GPU-sized batches with a ViT")
    parser.add_argument("--check", action="store_true",
                        help="only check the compiled kernels against eager, bit for bit")
    parser.add_argument("--profile", action="store_true",
                        help="append a torch.profiler table of sparse MLP steps")
    parser.add_argument("--mask-path", choices=list(MASK_PATHS), default="auto",
                        help="which implementation of the per-step mask pass runs: auto (the "
                        "native C++ pass on the CPU), native, compiled (torch.compile "
                        "kernels) or eager")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.device is None:
        args.device = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if args.check:
        sys.exit(0 if check(args) else 1)
    text = benchmark(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print()
    print(text)
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
