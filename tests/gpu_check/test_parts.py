"""The GPU check's parts, run for real (not from fixtures) on the CPU at small sizes, with
only the GPU-only calls replaced (tests/fake_gpu.py; the Triton kernels by their unpack +
F.linear reference): the rows, checks, partial saves and summaries a GPU run would produce.
No number here is a measurement."""

from __future__ import annotations

import pytest
import torch
from fake_gpu import install_fake_gpu
from torch import nn

from benchmarks import overhead
from benchmarks.gpu_check import parts
from benchmarks.kernels import cli
from nmsparse import kernels


@pytest.fixture
def small_cpu(monkeypatch):
    install_fake_gpu(monkeypatch)
    monkeypatch.setattr(parts, "DEVICE", "cpu")
    monkeypatch.setenv("NMSPARSE_KERNELS", "auto")  # restored after a part forces "triton"
    monkeypatch.setenv("NMSPARSE_COMPILE", "0")
    monkeypatch.setenv("NMSPARSE_NATIVE_MASKS", "1")  # restored after the overhead part's "0"
    monkeypatch.setattr(parts, "CORRECTNESS_SHAPES", {"bfloat16": (64, 128),
                                                      "float16": (48, 64)})
    monkeypatch.setattr(parts, "CORRECTNESS_GPT", {"n_layer": 1, "n_head": 2, "d_model": 64})
    saves: list[tuple[dict, str]] = []
    return lambda data, summary: saves.append((data, summary)), saves


def reference_kernel(x, values, indices, n, m, bias=None, path="auto"):
    assert path in ("gemv", "gemm")
    return kernels.reference(x, values, indices, n, m, bias)


def test_correctness_rows(small_cpu, monkeypatch):
    save, saves = small_cpu
    monkeypatch.setattr(kernels, "nm_linear_triton", reference_kernel, raising=False)
    data, summary = parts.part_correctness(False, save)
    rows = data["rows"]
    assert len(rows) == 5 * 3 + 3 + 2 == len(saves)  # saved after every row
    assert summary == f"{len(rows)}/{len(rows)} checks within tolerance", rows
    assert rows[0]["where"] == "64x128, batch 1" and rows[0]["check"] == "Triton 2:4 gemv"
    assert [r["dtype"] for r in rows[15:18]] == ["float16"] * 3
    assert rows[-2]["check"] == "accelerate 2:4 (tensor cores)"
    assert rows[-1]["where"] == "gpt_tiny d64 x1 layers, logits of (2, 128)"
    assert all(r["rel_err"] <= r["tolerance"] for r in rows)


def test_correctness_catches_a_wrong_kernel(small_cpu, monkeypatch):
    save, _ = small_cpu

    def wrong(x, values, indices, n, m, bias=None, path="auto"):
        return reference_kernel(x, values, indices, n, m, bias, path) * 1.05

    monkeypatch.setattr(kernels, "nm_linear_triton", wrong, raising=False)
    data, summary = parts.part_correctness(False, save)
    triton_rows = [r for r in data["rows"] if r["check"].startswith("Triton")]
    assert not any(r["ok"] for r in triton_rows)
    assert summary.startswith(f"{len(data['rows']) - len(triton_rows)}/{len(data['rows'])}")


def test_kernels_part(small_cpu, monkeypatch):
    save, saves = small_cpu
    monkeypatch.setattr(cli, "DEFAULT_SHAPES", [(64, 128)])
    monkeypatch.setattr(cli, "DEFAULT_BATCHES", [1, 5])
    data, summary = parts.part_kernels(False, save)
    results = data["results"]
    assert len(results) == 7 * 2 == len(saves)  # dense, cuSPARSELt, CUTLASS, 4 Triton
    assert [len(d["results"]) for d, _ in saves] == list(range(1, 15))
    by_kernel = {(r["kernel"], r["batch"]): r for r in results}
    assert by_kernel[("2:4 cuSPARSELt (torch)", 1)]["time_us"] is not None
    assert "sm8x only" in by_kernel[("2:4 CUTLASS (torch)", 5)]["note"]
    # the part forces NMSPARSE_KERNELS=triton: off the GPU the Triton rows say why they failed
    assert "Triton kernels cannot run" in by_kernel[("2:8 Triton (nmsparse)", 1)]["note"]
    assert data["settings"]["warmup"] == 5 and data["settings"]["repeats"] == 20
    assert summary.startswith("14 kernel rows; ")


def test_decode_part(small_cpu, monkeypatch):
    save, saves = small_cpu
    monkeypatch.setattr(parts, "DECODE_MODEL", "gpt_tiny")
    monkeypatch.setattr(parts, "DECODE_OPTIONS", {"n_layer": 1, "n_head": 2, "d_model": 64})
    data, summary = parts.part_decode(False, save)
    variants = [r["variant"] for r in data["results"]]
    assert variants == ["dense (cuBLAS)", "2:4 tensor cores (accelerate)",
                        "2:4 Triton (swap_linear_layers)", "2:8 Triton (swap_linear_layers)"]
    assert len(saves) == 4
    assert data["results"][1]["tokens_per_s"] == 128 / 0.5 and data["results"][1]["layers"] \
        == "5/5 2:4"
    assert "dense (cuBLAS) 256 tok/s" in summary


def test_overhead_part(small_cpu, monkeypatch):
    save, saves = small_cpu
    tiny = overhead.Case("tiny MLP", "8 rows", 1.05,
                         lambda: nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)),
                         lambda device: (torch.randn(8, 16, device=device),
                                         torch.randint(0, 4, (8,), device=device)),
                         nn.functional.cross_entropy, "cuda")
    monkeypatch.setattr(overhead, "gpu_cases", lambda: [tiny, tiny])
    quiet = overhead.ForeignLoad
    monkeypatch.setattr(overhead, "ForeignLoad", lambda enabled=True: quiet(enabled=False))
    data, summary = parts.part_overhead(False, save, "eager")  # compiling: ~40 s here
    rows = data["rows"]
    assert len(rows) == 2 == len(saves)
    for row in rows:
        assert row["refresh"] == "eager" and row["steps"] == parts.OVERHEAD_STEPS
        assert row["ratio"] == pytest.approx(row["sparse_ms"] / row["dense_ms"])
    assert summary.startswith("tiny MLP ")


def test_overhead_row_says_when_nmsparse_fell_back_to_eager(small_cpu, monkeypatch):
    import warnings

    save, _ = small_cpu
    monkeypatch.setattr(overhead, "gpu_cases",
                        lambda: [overhead.Case("m", "s", 1.05, None, None, None, "cuda")])

    def run_case(case, method, device, warmup, steps):
        warnings.warn("nmsparse: the compiled mask kernels failed (boom); using the eager "
                      "path from now on", RuntimeWarning, stacklevel=2)
        warnings.warn("an unrelated warning", UserWarning, stacklevel=2)
        return {("dense", "total"): 2.0, ("sparse", "total"): 3.0, ("kernels", "refresh_"): 0.1,
                ("kernels", "add_decay_"): 0.1, ("pairs", "timed"): 7}

    monkeypatch.setattr(overhead, "run_case", run_case)
    data, _ = parts.part_overhead(False, save, "compiled")
    row = data["rows"][0]
    assert row["ratio"] == 1.5
    assert row["note"].startswith("warning: nmsparse: the compiled mask kernels failed (boom)")
    # none were built
    assert "compiled path not used: nmsparse.engine.fused.status()" in row["note"]
