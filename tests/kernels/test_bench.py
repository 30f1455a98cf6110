"""The kernel benchmark (``python -m benchmarks.kernels``) on the CPU: the exit without a GPU,
argument parsing, the table and markdown formatting (unit tests on fake timings written out
below, not measurements), the L2 rotation rule, and the runs with the GPU-only pieces faked.
The decoder it times is the model's own (tests/models/test_gpt_decoder.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fake_gpu import install_fake_gpu

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    """The benchmark's modules under one name, as the tests knew them."""
    from types import SimpleNamespace

    from benchmarks.kernels import cli, decode, linear, page, results, timing

    names = {}
    for module in (results, timing, page, linear, decode, cli):
        names.update({k: v for k, v in vars(module).items() if not k.startswith("__")})
    return SimpleNamespace(**names)


# ------------------------------------------------------------------ no GPU

def test_script_exits_2_without_cuda(tmp_path):
    out = tmp_path / "kernels.md"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.kernels", "--quick", "--out",
                           str(out)], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "no CUDA GPU" in proc.stderr and "Nothing was measured" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_main_exits_2_without_cuda(bench, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "kernels.md"
    assert bench.main(["--out", str(out)]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
    assert not out.exists()


def test_main_exits_2_on_an_old_gpu(bench, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100")
    assert bench.main(["--out", str(tmp_path / "k.md")]) == 2
    assert "Tesla V100 has compute capability 7.0" in capsys.readouterr().err


# ------------------------------------------------------------------ arguments

def test_defaults(bench):
    args = bench.parse_args([])
    assert args.shapes == [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192)]
    assert args.batches == [1, 16, 256, 4096]
    assert args.patterns == ["2:4", "4:8", "1:4", "2:8"]
    assert (args.warmup, args.repeats, args.decode_tokens) == (10, 50, 128)
    assert args.timing == "graph" and not args.no_decode and not args.no_write
    assert args.out == Path("docs") / "kernels.md"


def test_quick_and_explicit_options(bench):
    quick = bench.parse_args(["--quick"])
    assert quick.shapes == [(4096, 4096), (8192, 8192)]
    assert (quick.warmup, quick.repeats, quick.decode_tokens) == (3, 10, 32)
    args = bench.parse_args(["--quick", "--shapes", "4096x11008, 128X256", "--batches", "1,7",
                             "--patterns", "2:8", "--repeats", "5", "--timing", "eager",
                             "--out", "x.md", "--no-decode"])
    assert args.shapes == [(4096, 11008), (128, 256)]
    assert args.batches == [1, 7] and args.patterns == ["2:8"] and args.repeats == 5
    assert args.timing == "eager" and args.out == Path("x.md") and args.no_decode


@pytest.mark.parametrize("argv", [["--shapes", "4096"], ["--shapes", "0x16"],
                                  ["--shapes", "axb"], ["--batches", "0"],
                                  ["--batches", "1,x"], ["--patterns", "4:2"],
                                  ["--repeats", "0"], ["--warmup", "-1"],
                                  ["--timing", "cupti"]])
def test_bad_arguments_exit_2(bench, argv, capsys):
    with pytest.raises(SystemExit) as info:
        bench.parse_args(argv)
    assert info.value.code == 2
    assert "error" in capsys.readouterr().err


# ------------------------------------------------------------------ formatting
# Unit tests of the formatting only: the timings below are made-up inputs, not measurements.

def fake_results(bench):
    r = bench.KernelResult
    shape, batch = (4096, 4096), 1
    act = batch * (4096 + 4096) * 2
    dense = 4096 * 4096 * 2
    return [
        r(shape, batch, "dense (cuBLAS)", "dense", dense, act, time_us=20.0, mode="graph",
          error=0.0),
        r(shape, batch, "2:4 Triton (nmsparse)", "2:4", dense * 9 // 16, act, time_us=12.5,
          mode="graph", error=1e-3),
        r(shape, batch, "2:4 CUTLASS (torch)", "2:4", 0, act,
          note="unavailable: RuntimeError: sm8x only"),
        r((8192, 8192), 4096, "dense (cuBLAS)", "dense", 8192 * 8192 * 2,
          4096 * 16384 * 2, time_us=1000.0, mode="graph"),
        r((8192, 8192), 4096, "2:4 cuSPARSELt (torch)", "2:4", 8192 * 8192 * 9 // 8,
          4096 * 16384 * 2, time_us=800.0, mode="eager"),
    ]


def test_metrics_on_fake_timings(bench):
    results = fake_results(bench)
    dense, triton_row = results[0], results[1]
    m = bench.metrics(triton_row, dense)
    assert m["speedup"] == pytest.approx(1.6)
    assert m["limit"] == pytest.approx(dense.bytes / triton_row.bytes)
    assert m["fraction"] == pytest.approx(1.6 / m["limit"])
    assert m["gbps"] == pytest.approx(triton_row.bytes / 12.5e-6 / 1e9)
    assert bench.metrics(dense, dense)["speedup"] == 1.0
    missing = bench.metrics(results[2], dense)
    assert missing == {"speedup": None, "gbps": None, "limit": None, "fraction": None}


def test_kernel_table_on_fake_timings(bench):
    text = bench.format_kernel_table(fake_results(bench))
    lines = text.splitlines()
    assert lines[0].split()[:5] == ["shape", "batch", "kernel", "time", "(us)"]
    triton_line = next(line for line in lines if "2:4 Triton" in line)
    assert "12.5" in triton_line and "1.60x" in triton_line and "1.0e-03" in triton_line
    dense_line = next(line for line in lines if "dense" in line and "4096x4096" in line)
    assert "1.00x" in dense_line and "100%" in dense_line
    cutlass_line = next(line for line in lines if "CUTLASS" in line)
    assert "unavailable: RuntimeError: sm8x only" in cutlass_line
    assert "1.25x" in next(line for line in lines if "cuSPARSELt" in line)


def test_target_rows_on_fake_timings(bench):
    rows = bench.target_rows(fake_results(bench))
    by_target = {(row[0], row[1]): row for row in rows}
    two_four = by_target[("batch-1 decode, 2:4 (best 2:4 kernel)", "4096x4096, batch 1")]
    assert two_four[2:] == ["2:4 Triton (nmsparse)", "1.60x", ">= 1.6x", "yes"]
    one_four = by_target[("batch-1 decode, 1:4", "4096x4096, batch 1")]
    assert one_four[3] == "not measured" and one_four[5] == "-"
    big = by_target[("8192x8192 at batch 4096, 2:4 tensor cores", "8192x8192, batch 4096")]
    assert big[2:] == ["2:4 cuSPARSELt (torch)", "1.25x", ">= 1.3x", "no"]


def test_decode_table_on_fake_timings(bench):
    d = bench.DecodeResult
    decode = [d("dense (cuBLAS)", "dense", "97 dense", 128, seconds=1.0, mode="graph"),
              d("2:8 Triton (swap_linear_layers)", "2:8", "97/97 2:8", 128, seconds=0.4,
                mode="graph", logit_error=2e-3),
              d("2:4 tensor cores (accelerate)", "2:4", "-", 128, note="failed: boom")]
    text = bench.format_decode_table(decode)
    assert "128.0" in text and "320.0" in text and "2.50x" in text and "failed: boom" in text
    rows = bench.target_rows([], decode)
    assert rows[-2][3] == "not measured"
    assert rows[-1][2:] == ["2:8 Triton (swap_linear_layers)", "2.50x", ">= 2.8x", "no"]


def test_markdown_measured_vs_placeholder(bench):
    placeholder = bench.render_markdown()
    assert "GPU figures not yet measured" in placeholder
    assert bench.COMMAND in placeholder and "These figures are measured" not in placeholder
    measured = bench.render_markdown(
        "python -m benchmarks.kernels --quick", {"GPU": "fake GPU (formatting test)"},
        fake_results(bench), [], "timing graph")
    assert "These figures are measured" in measured and "not yet measured" not in measured
    assert "| GPU | fake GPU (formatting test) |" in measured
    assert "### 4096x4096 (out x in)" in measured and "### 8192x8192 (out x in)" in measured
    assert "| 1 | 2:4 Triton (nmsparse) | 12.5 | 1.60x |" in measured
    assert "`python -m benchmarks.kernels --quick`" in measured
    assert "| ---: | --- | ---: | ---: |" in measured  # numbers right-aligned


def test_committed_page_is_placeholder_or_measured(bench):
    text = (ROOT / "docs" / "kernels.md").read_text()
    placeholder = "GPU figures not yet measured" in text
    measured = "These figures are measured" in text
    assert "FIXTURE" not in text  # a dry run's page is never the committed one
    assert placeholder != measured  # never a mix: no unmeasured numbers presented as figures
    if placeholder:
        assert bench.COMMAND in text


# ------------------------------------------------------------------ helpers

def test_rotation_copies(bench):
    l2 = 50 * 2**20
    assert bench.rotation_copies(32 * 2**20, l2) == 5  # 4 others = 128 MiB > 2 x 50 MiB
    assert bench.rotation_copies(128 * 2**20, l2) == 2
    assert bench.rotation_copies(1, l2) == 256  # capped
    for size in (2**20, 9 * 2**20, 90 * 2**20):
        copies = bench.rotation_copies(size, l2)
        assert (copies - 1) * size >= 2 * l2 or copies == 2


def test_tensor_bytes(bench):
    assert bench.tensor_bytes(torch.zeros(4, 8, dtype=torch.bfloat16)) == 64
    assert bench.tensor_bytes(torch.zeros(3, dtype=torch.uint8)) == 3


def test_time_decode_on_the_cpu(bench):
    from nmsparse.app.models import create_model

    model = create_model("gpt_tiny", input_shape=(16,), num_classes=256,
                         task="language_model", n_layer=1, n_head=2, d_model=32).eval()
    seconds, mode = bench.time_decode(model, 4, "graph", repeats=2, warmup=1)
    assert seconds > 0 and mode == "eager (no CUDA graphs off the GPU)"
    assert bench.time_decode(model, 1, "eager", repeats=1)[1] == "eager"


# ------------------------------------------------------------------ plumbing, GPU faked
# run_kernels / run_decode on the CPU with the GPU-only pieces replaced (CUDA-event timing by
# fixed numbers, 2:4 compression by the identity, Triton by its unpack + F.linear fallback):
# checks the rows and errors come out right, not any speed.


@pytest.fixture
def fake_gpu(monkeypatch):
    install_fake_gpu(monkeypatch)


def test_run_kernels_plumbing(bench, fake_gpu):
    args = bench.parse_args(["--shapes", "64x128,32x64", "--batches", "1,5",
                             "--patterns", "2:4,2:8"])
    results = bench.run_kernels(args, log=lambda line: None, device="cpu")
    kernels = ["dense (cuBLAS)", "2:4 cuSPARSELt (torch)", "2:4 CUTLASS (torch)",
               "2:4 Triton (nmsparse)", "2:8 Triton (nmsparse)"]
    assert [(r.shape, r.batch, r.kernel) for r in results] == [
        (shape, batch, kernel) for shape in [(64, 128), (32, 64)] for kernel in kernels
        for batch in (1, 5)]
    for result in results:
        if "CUTLASS" in result.kernel:
            assert result.time_us is None and "sm8x only" in result.note
        else:
            assert result.time_us is not None and result.mode == "fake"
            assert result.error == 0.0  # identity compression / exact fallback
    packed = next(r for r in results if r.kernel == "2:8 Triton (nmsparse)")
    assert packed.weight_bytes == 64 * 128 * 2 * 5 // 16
    assert "not measured" not in bench.format_kernel_table(results)


def test_run_decode_plumbing(bench, fake_gpu):
    args = bench.parse_args(["--decode-tokens", "4"])
    decode = bench.run_decode(args, log=lambda line: None, device="cpu", model_name="gpt_tiny",
                              options={"n_layer": 1, "n_head": 2, "d_model": 64})
    assert [(d.variant, d.pattern) for d in decode] == [
        ("dense (cuBLAS)", "dense"), ("2:4 tensor cores (accelerate)", "2:4"),
        ("2:4 Triton (swap_linear_layers)", "2:4"), ("2:8 Triton (swap_linear_layers)", "2:8")]
    assert [d.layers for d in decode] == ["5 dense", "5/5 2:4", "5/5 2:4", "5/5 2:8"]
    for result in decode[1:]:
        assert result.logit_error == 0.0 and result.tokens_per_s == 8.0 and not result.note
    text = bench.format_decode_table(decode)
    assert "gpt_tiny" in text and "1.00x" in text
