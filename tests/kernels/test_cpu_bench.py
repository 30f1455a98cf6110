"""Plumbing of the CPU benchmarks (benchmarks/cpu_kernels.py, benchmarks/decode.py) on tiny
shapes: every path this CPU runs appears in the table, the page is written, and a swapped
Llama built from a config generates. No timing is checked."""

import pytest
import torch

from nmsparse.kernels import NMLinear, cpu

BUILD_ERROR = cpu.build_error()
pytestmark = pytest.mark.skipif(BUILD_ERROR is not None,
                                reason=f"CPU kernels unavailable: {BUILD_ERROR}")


def test_cpu_kernels_page_lists_every_path(tmp_path, monkeypatch):
    from benchmarks import cpu_kernels

    monkeypatch.delenv(cpu.ENV_ISA, raising=False)
    out = tmp_path / "page.md"
    assert cpu_kernels.main(["--shapes", "32x96", "--rows", "1,9", "--patterns", "2:4,1:3",
                             "--repeats", "1", "--cold-mb", "1", "--no-decode",
                             "--out", str(out)]) == 0
    page = out.read_text()
    assert "Load average" in page and "CPU flags:" in page and "AMX" in page
    for isa, kernel in cpu_kernels.paths():
        for pattern in ("2:4", "1:3"):
            n, m = map(int, pattern.split(":"))
            for dtype in ("fp32", "bf16"):
                if cpu_kernels.applies(isa, kernel, dtype, n, m):
                    name = (f"{pattern} {dtype} auto" if isa is None else
                            f"{pattern} {dtype} {isa}" + ("" if kernel == "auto" else f"/{kernel}"))
                    assert f"| {name}" in page, name
    assert "| dense bf16 |" in page
    if "avx512bf16" in cpu.features():
        assert "| 2:4 bf16 prepared |" in page and "1:3 bf16 prepared" not in page


def test_methods_sharing_copies_never_read_one_another_has_just_read():
    from benchmarks.cpu_kernels import Copies

    copies = Copies(range(5))
    taken = [copies.next() for _ in range(12)]  # as three methods taking turns, 4 rounds
    assert taken == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]
    for i, copy in enumerate(taken):  # a copy comes back only after all the others
        assert copy not in taken[max(0, i - 4):i]


def test_decode_benchmark_runs_a_swapped_llama():
    pytest.importorskip("transformers")
    from benchmarks import decode

    lines = []
    described, rows = decode.run(layers=1, hidden=128, intermediate=256, batches=(1, 2),
                                 prompt_len=4, new_tokens=2, prefill_len=8, repeats=1,
                                 log=lines.append)
    assert "7 Linear layers swapped" in described  # q, k, v, o, gate, up, down; lm_head dense
    assert [row[1] for row in rows] == [1, 2, 1] and rows[-1][0].startswith("prefill 8")
    if "avx512bf16" in cpu.features():  # the prepared run, with its own speedups
        assert "prepared: the same after prepare_cpu" in described
        assert all(row[5] and row[6].endswith("x") for row in rows)
    model = decode.llama(1, 128, 256)
    decode.prune_linears(model, 2, 4)
    from nmsparse.kernels import swap_linear_layers

    swap_linear_layers(model, "2:4", exclude="lm_head")
    assert sum(isinstance(module, NMLinear) for module in model.modules()) == 7
    with torch.inference_mode():
        assert model(torch.tensor([[1, 2, 3]])).logits.isfinite().all()


def test_pairs_loop_benchmark_writes_its_table(tmp_path):
    if "avx512bf16" not in cpu.features():
        pytest.skip("the pairs loop needs AVX512_BF16")
    from benchmarks.pairs_loop import run

    out = tmp_path / "loop.md"
    assert run.main(["--repeats", "1", "--out", str(out)]) == 0
    page = out.read_text()
    assert "CPU flags:" in page and "Load average" in page
    for case in ("registers", "table V=1 units=8", "table V=4 units=256"):
        line = next(line for line in page.splitlines() if line.startswith(f"| {case}"))
        assert float(line.split("|")[2]) > 0
