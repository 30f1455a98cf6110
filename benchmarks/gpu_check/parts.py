"""The GPU check's parts that run Python: one per process, so a part that hangs or crashes
takes nothing else with it.

    python -m benchmarks.gpu_check.parts NAME --json RESULT.json [--fixture]

writes ``{"part", "fixture", "partial", "summary", "data"}`` to RESULT.json (atomically),
also after each row while a long part runs (``"partial": true``), so a part killed at its
time cap still leaves what it measured. With
``--fixture`` (the dry run) a part imports and sets up everything it would use, touches no
GPU, and returns the numbers of :mod:`benchmarks.gpu_check.fixtures`, marked as fixtures.
Only public nmsparse names are used here, so renames inside the library do not break it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from . import fixtures

# Reduced settings of the kernel benchmark: the shapes and batches of docs/kernels.md, fewer
# warm-up and timed runs than its defaults (10 / 50), so that it fits its time cap.
KERNEL_SETTINGS = {"warmup": 5, "repeats": 20, "timing": "graph", "seed": 0}
DECODE_SETTINGS = {"decode_tokens": 128, "timing": "graph", "seed": 0}
OVERHEAD_WARMUP, OVERHEAD_STEPS = 3, 7
# (pattern, dtype, out x in, batch, path) of the Triton correctness checks: bf16 for every
# pattern, through the GEMV and both GEMM row tiles (16 and 64 rows: native bf16 tl.dot).
CORRECTNESS_PATTERNS = ("2:4", "4:8", "1:4", "2:8", "1:16")
CORRECTNESS_BATCHES = ((1, "gemv"), (16, "gemm"), (300, "gemm"))
CORRECTNESS_SHAPES = {"bfloat16": (4096, 4096), "float16": (1000, 1024)}  # (out, in)
CORRECTNESS_GPT = {"n_layer": 4, "n_head": 8, "d_model": 512}  # gpt_tiny options, seq 128
TOLERANCE = {"bfloat16": 1e-2, "float16": 2e-3}  # max |y - ref| / max |ref|
DECODE_MODEL, DECODE_OPTIONS = "gpt_1b", None
# Where the parts run. The tests of the parts' real (not fixture) code set "cpu" and shrink
# the sizes above, with the GPU-only calls replaced (tests/gpu_check/test_parts.py).
DEVICE = "cuda"


Save = Callable[[dict, str], None]  # (data so far, summary): writes a partial result


def part_machine(fixture: bool, save: Save) -> tuple[dict, str]:
    import torch

    import nmsparse

    base = {"python": platform.python_version(), "torch": torch.__version__,
            "nmsparse": nmsparse.__version__, "nmsparse_path": str(Path(nmsparse.__file__))}
    if fixture:
        return {**base, **fixtures.MACHINE}, "fixture machine (dry run: no GPU touched)"
    if not torch.cuda.is_available():
        return {**base, "cuda": False}, "no CUDA GPU: torch.cuda.is_available() is False"
    from benchmarks.kernels.cli import gpu_problem, machine_info

    info = {**base, **machine_info(), "cuda": True, "problem": gpu_problem()}
    x = torch.randn(1024, 1024, device=DEVICE)
    info["matmul_check"] = float((x @ x).float().sum().isfinite())
    return info, info["GPU"]


def part_correctness(fixture: bool, save: Save) -> tuple[dict, str]:
    """Triton kernels at model-sized shapes and accelerate / swap_linear_layers on a GPT,
    each against dense F.linear / the dense model in fp32."""
    import torch
    import torch.nn.functional as F

    import nmsparse
    from nmsparse import kernels
    from nmsparse.app.models import create_model
    from nmsparse.packing import pack, unpack

    assert callable(kernels.nm_linear_triton)  # imports Triton, in the dry run too

    if fixture:
        rows = fixtures.CORRECTNESS
        return {"rows": rows}, summarize_correctness(rows)
    rows = []
    device = torch.device(DEVICE)
    generator = torch.Generator(device=device).manual_seed(0)

    def record(check: str, dtype: torch.dtype, where: str, run: Callable[[], float]) -> None:
        name = str(dtype).replace("torch.", "")
        try:
            error = run()
            ok = error <= TOLERANCE[name]
            rows.append({"check": check, "dtype": name, "where": where, "rel_err": error,
                         "tolerance": TOLERANCE[name], "ok": ok, "note": ""})
        except Exception as exc:  # noqa: BLE001 - a failing check is a row, not a crash
            rows.append({"check": check, "dtype": name, "where": where, "rel_err": None,
                         "tolerance": TOLERANCE[name], "ok": False,
                         "note": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"})
        print(json.dumps(rows[-1]), flush=True)
        save({"rows": rows}, summarize_correctness(rows))

    def relative(out: torch.Tensor, ref: torch.Tensor) -> float:
        if not bool(torch.isfinite(out).all()):
            return float("inf")
        return float((out.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12))

    def kernel(pattern: str, dtype: torch.dtype, shape: tuple[int, int], batch: int,
               path: str) -> float:
        n, m = map(int, pattern.split(":"))
        dense = torch.randn(*shape, device=device, generator=generator) * 0.02
        weight = (dense * nmsparse.nm_mask(dense, n, m)).to(dtype)
        packed = pack(weight, n, m)
        assert torch.equal(unpack(packed), weight)
        x = torch.randn(batch, shape[1], device=device, generator=generator).to(dtype)
        bias = torch.randn(shape[0], device=device, generator=generator).to(dtype)
        y = kernels.nm_linear_triton(x, packed.values, packed.indices, n, m, bias, path=path)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return relative(y, F.linear(x.float(), weight.float(), bias.float()))

    for dtype, patterns in ((torch.bfloat16, CORRECTNESS_PATTERNS), (torch.float16, ("2:4",))):
        shape = CORRECTNESS_SHAPES[str(dtype).replace("torch.", "")]
        for pattern in patterns:
            for batch, path in CORRECTNESS_BATCHES:
                record(f"Triton {pattern} {path}", dtype,
                       f"{shape[0]}x{shape[1]}, batch {batch}",
                       lambda p=pattern, d=dtype, s=shape, b=batch, q=path: kernel(p, d, s, b, q))

    torch.manual_seed(0)
    with torch.device(device):
        base = create_model("gpt_tiny", input_shape=(128,), num_classes=256,
                            task="language_model", **CORRECTNESS_GPT)
    ids = torch.randint(0, 256, (2, 128), device=device)
    for pattern, label, convert in (
            ("2:4", "accelerate 2:4 (tensor cores)", lambda model: kernels.accelerate(model)),
            ("2:8", "swap_linear_layers 2:8 (Triton)",
             lambda model: kernels.swap_linear_layers(model, "2:8"))):
        def model_check(pattern=pattern, convert=convert) -> float:
            import copy

            model = copy.deepcopy(base)
            nmsparse.sparsify(model, pattern, "fixed")
            nmsparse.finalize(model)
            model = model.to(torch.bfloat16).eval()
            with torch.no_grad():
                ref = model(ids).float()
                report = convert(model)
                out = model(ids)
            print(report, flush=True)
            return relative(out, ref)

        options = CORRECTNESS_GPT
        record(label, torch.bfloat16, f"gpt_tiny d{options['d_model']} x{options['n_layer']} "
               "layers, logits of (2, 128)", model_check)
    return {"rows": rows}, summarize_correctness(rows)


def summarize_correctness(rows: list[dict]) -> str:
    bad = [row["check"] + " " + row["where"] for row in rows if not row["ok"]]
    return (f"{len(rows) - len(bad)}/{len(rows)} checks within tolerance"
            + (f"; failed: {', '.join(bad[:4])}" if bad else ""))


def part_kernels(fixture: bool, save: Save) -> tuple[dict, str]:
    from benchmarks.kernels.cli import parse_args
    from benchmarks.kernels.linear import run_kernels
    from benchmarks.kernels.results import KernelResult

    args = parse_args(["--no-write", "--no-decode", *settings_argv(KERNEL_SETTINGS)])
    settings = {"shapes": [list(s) for s in args.shapes], "batches": args.batches,
                "patterns": args.patterns, **KERNEL_SETTINGS}
    if fixture:
        results = [KernelResult(**{**row, "shape": tuple(row["shape"])})
                   for row in fixtures.KERNELS]
    else:
        os.environ["NMSPARSE_KERNELS"] = "triton"  # time the kernels, never the fallback
        results = run_kernels(
            args, log=lambda line: print(line, flush=True), device=DEVICE,
            progress=lambda so_far: save(*kernel_result(settings, so_far)))
    return kernel_result(settings, results)


def kernel_result(settings: dict, results: list) -> tuple[dict, str]:
    from benchmarks.kernels.results import target_rows

    rows = target_rows(results)
    met = [row for row in rows if row[-1] == "yes"]
    return ({"settings": settings, "results": [r.to_dict() for r in results]},
            f"{len(results)} kernel rows; {len(met)}/{len(rows)} kernel targets met")


def part_decode(fixture: bool, save: Save) -> tuple[dict, str]:
    from benchmarks.kernels.cli import parse_args
    from benchmarks.kernels.decode import run_decode
    from benchmarks.kernels.results import DecodeResult

    args = parse_args(["--no-write", *settings_argv(DECODE_SETTINGS)])
    if fixture:
        results = [DecodeResult(**row) for row in fixtures.DECODE]
    else:
        os.environ["NMSPARSE_KERNELS"] = "triton"
        results = run_decode(args, log=lambda line: print(line, flush=True), device=DEVICE,
                             model_name=DECODE_MODEL, options=DECODE_OPTIONS,
                             progress=lambda so_far: save(*decode_result(so_far)))
    return decode_result(results)


def decode_result(results: list) -> tuple[dict, str]:
    speeds = ", ".join(f"{r.variant} {r.tokens_per_s:.0f} tok/s" for r in results
                       if r.tokens_per_s)
    return ({"settings": DECODE_SETTINGS, "results": [r.to_dict() for r in results]},
            speeds or "no variant measured")


def part_overhead(fixture: bool, save: Save, mode: str) -> tuple[dict, str]:
    """SR-STE 2:4 step time vs dense with the mask refresh eager or compiled
    (``NMSPARSE_COMPILE``, set before nmsparse runs any step)."""
    os.environ["NMSPARSE_COMPILE"] = "1" if mode == "compiled" else "0"
    os.environ["NMSPARSE_NATIVE_MASKS"] = "0"  # the CPU's C++ pass: neither mode (a CPU dry run)
    import torch

    from benchmarks import overhead
    from nmsparse.engine import fused

    cases = overhead.gpu_cases()
    rows = []
    for case in cases:
        row = {"model": case.name, "size": case.size, "method": "srste", "refresh": mode,
               "target": case.target}
        if fixture:
            row.update(fixtures.OVERHEAD[mode][case.name])
        else:
            try:
                # nmsparse warns once if its compiled kernels fail and it falls back to eager:
                # that must show in the row, or an eager run would pass for a compiled one.
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    r = overhead.run_case(case, "srste", torch.device(DEVICE),
                                          OVERHEAD_WARMUP, OVERHEAD_STEPS)
                own = [str(w.message) for w in caught if str(w.message).startswith("nmsparse")]
                if own:
                    row["note"] = f"warning: {own[0][:200]}"
                state = fused.status()
                row["compiled_kernels"] = state["kernels"]
                if mode == "compiled" and (state["broken"] or not state["kernels"]):
                    row["note"] = (row.get("note", "") + " | compiled path not used: "
                                   f"nmsparse.engine.fused.status() = {state}").strip(" |")
                row.update(dense_ms=r[("dense", "total")], sparse_ms=r[("sparse", "total")],
                           refresh_ms=r[("kernels", "refresh_")],
                           decay_ms=r[("kernels", "add_decay_")], steps=r[("pairs", "timed")])
            except Exception as exc:  # noqa: BLE001
                row["note"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            print(json.dumps(row), flush=True)
        if row.get("sparse_ms") and row.get("dense_ms"):
            row["ratio"] = row["sparse_ms"] / row["dense_ms"]
        rows.append(row)
        save(*overhead_result(rows))
    return overhead_result(rows)


def overhead_result(rows: list[dict]) -> tuple[dict, str]:
    text = ", ".join(f"{row['model'].split(' (')[0]} {row['ratio']:.3f}x" for row in rows
                     if "ratio" in row)
    return {"warmup": OVERHEAD_WARMUP, "steps": OVERHEAD_STEPS, "rows": rows}, text


def settings_argv(settings: dict) -> list[str]:
    argv = []
    for key in ("warmup", "repeats", "decode_tokens", "timing", "seed"):
        if key in settings:
            argv += [f"--{key.replace('_', '-')}", str(settings[key])]
    return argv


PARTS: dict[str, Callable[[bool, Save], tuple[dict, str]]] = {
    "machine": part_machine,
    "correctness": part_correctness,
    "kernels": part_kernels,
    "decode": part_decode,
    "overhead-eager": lambda fixture, save: part_overhead(fixture, save, "eager"),
    "overhead-compiled": lambda fixture, save: part_overhead(fixture, save, "compiled"),
}


def write_result(path: Path, part: str, fixture: bool, partial: bool, start: float,
                 data: dict, summary: str) -> None:
    result = {"part": part, "fixture": fixture, "partial": partial, "summary": summary,
              "seconds": time.perf_counter() - start, "data": data}
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(result, indent=1, default=str))
    temporary.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check.parts",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=sorted(PARTS))
    parser.add_argument("--json", type=Path, required=True, help="where to write the result")
    parser.add_argument("--fixture", action="store_true",
                        help="dry run: no GPU, fixture numbers marked as such")
    args = parser.parse_args(argv)
    start = time.perf_counter()

    def save(data: dict, summary: str) -> None:
        write_result(args.json, args.part, args.fixture, True, start, data, summary)

    data, summary = PARTS[args.part](args.fixture, save)
    write_result(args.json, args.part, args.fixture, False, start, data, summary)
    print(f"{args.part}: {summary}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
