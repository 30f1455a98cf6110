"""A/B of the AVX-512 kernel library: another git revision's build against this tree's, in one
process, interleaved, on the same cold weights.

    python benchmarks/cpu_library_ab.py --old-rev 44e2912
    python benchmarks/cpu_library_ab.py --old-rev HEAD~3 --patterns 2:4,3:4 --rows 1,64 --rounds 9

For a change to the C++ kernels, where two runs of ``benchmarks/cpu_kernels.py`` minutes apart
differ by more than the change: the other revision's ``src/nmsparse/kernels/cpu`` is exported
(``git archive``) and built by its own ``_build.py`` into a temporary cache; both libraries then
run the same entry points on the same bytes. Per pattern (bf16, 11008x4096 by default) and row
count: the plain packed product with the kernel this tree's dispatch picks (``nmsparse_nm_linear``)
and the prepared layout's (``nmsparse_lanes_linear``) where the pattern has one. Each round runs
every method on both libraries, the order of the two alternating from round to round, each call
on the next of enough weight copies (``--cold-mb``) that no call finds its weight in cache. The
table gives the medians over the rounds after the first. Needs a CPU with AVX512_BF16 and git.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch

from benchmarks.cpu_kernels import features_line, l3_bytes, load_text
from nmsparse.kernels import NMLinear, cpu
from nmsparse.kernels.cpu import _build, prepacked
from nmsparse.machine import cpu_model
from nmsparse.tables import format_table

ROOT = Path(__file__).resolve().parents[1]
KERNEL_DIR = "src/nmsparse/kernels/cpu"
KERNEL_CODES = {"dot": 1, "table": 2, "pairs": 3, "lanes": 4}


def build_revision(revision: str, folder: Path) -> ctypes.CDLL:
    """The AVX-512 library of ``revision``, built by that revision's own ``_build.py``."""
    archive = subprocess.run(["git", "archive", revision, KERNEL_DIR], cwd=ROOT,
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    before = os.environ.get(_build.ENV_CACHE)
    os.environ[_build.ENV_CACHE] = str(folder / "cache")
    try:
        spec = importlib.util.spec_from_file_location("old_build", folder / KERNEL_DIR /
                                                      "_build.py")
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
        return old.load("avx512")
    finally:  # this tree's library is then loaded from the user's cache, as set
        if before is None:
            del os.environ[_build.ENV_CACHE]
        else:
            os.environ[_build.ENV_CACHE] = before


def pruned_layer(out_features: int, in_features: int, n: int, m: int) -> NMLinear:
    weight = torch.randn(out_features, in_features, dtype=torch.bfloat16)
    groups = weight.view(-1, m)
    groups.scatter_(1, groups.float().abs().argsort(dim=1)[:, : m - n], 0)
    dense = torch.nn.Linear(in_features, out_features, bias=False, dtype=torch.bfloat16)
    dense.weight.data = weight
    return NMLinear.from_linear(dense, n, m)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old-rev", required=True, help="a git revision of this repository")
    parser.add_argument("--patterns", default="2:4,3:4,1:4,4:8")
    parser.add_argument("--rows", default="1,4,16,64,256")
    parser.add_argument("--shape", default="11008x4096", help="OUTxIN")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--cold-mb", type=int, default=None,
                        help="default: max(1024, twice the L3 in MiB)")
    args = parser.parse_args(argv)
    if cpu.isa() != "avx512bf16":
        print(f"this needs a CPU with AVX512_BF16 and VBMI (kernels here: {cpu.isa()})")
        return 1
    out_features, in_features = (int(v) for v in args.shape.lower().split("x"))
    cold_mb = args.cold_mb or max(1024, 2 * (l3_bytes() >> 20))
    threads = torch.get_num_threads()
    load_before = load_text()
    with tempfile.TemporaryDirectory() as folder:
        libraries = {"old": build_revision(args.old_rev, Path(folder)),
                     "new": cpu.library("avx512")}
    rows_out = []
    torch.manual_seed(0)
    for pattern in args.patterns.split(","):
        n, m = (int(v) for v in pattern.split(":"))
        layer = pruned_layer(out_features, in_features, n, m)
        layout = (prepacked.prepack(layer.values, layer.indices, n, m, in_features)
                  if prepacked.prepack_reason(layer.values, n, m) is None else None)
        per_copy = layer.values.nbytes + layer.indices.nbytes
        copies = [(layer.values.clone(), layer.indices.clone(),
                   None if layout is None else layout.clone())
                  for _ in range(max(2, -(-cold_mb * 2**20 // per_copy)))]
        for rows in (int(v) for v in args.rows.split(",")):
            x = torch.randn(rows, in_features, dtype=torch.bfloat16)
            y = torch.empty(rows, out_features)
            kernel = cpu.kernel_for("avx512bf16", torch.bfloat16, rows, n, m)
            methods = {}
            if kernel in KERNEL_CODES:
                def plain(lib, values, indices, _, kernel=kernel, x=x, y=y, rows=rows, n=n, m=m):
                    status = lib.nmsparse_nm_linear(
                        x.data_ptr(), int(kernel != "table"), rows, in_features,
                        values.data_ptr(), 1, indices.data_ptr(), out_features,
                        values.shape[1], indices.shape[1], n, m, None, y.data_ptr(), threads,
                        KERNEL_CODES[kernel] | cpu.OPTION_BF16)
                    assert status == 0, status
                methods[f"plain ({kernel})"] = plain
            if layout is not None:
                def prepared(lib, _, __, lay, x=x, y=y, rows=rows, n=n, m=m):
                    status = lib.nmsparse_lanes_linear(x.data_ptr(), rows, in_features,
                                                       lay.data_ptr(), out_features, n, m,
                                                       None, y.data_ptr(), threads)
                    assert status == 0, status
                methods["prepared"] = prepared
            times = {(name, side): [] for name in methods for side in libraries}
            turn = 0
            for round_ in range(args.rounds):
                sides = ("old", "new") if round_ % 2 == 0 else ("new", "old")
                for name, call in methods.items():
                    for side in sides:
                        copy = copies[turn % len(copies)]
                        turn += 1
                        start = time.perf_counter()
                        call(libraries[side], *copy)
                        times[(name, side)].append(time.perf_counter() - start)
            for name in methods:
                old, new = (statistics.median(times[(name, side)][1:]) * 1e3
                            for side in ("old", "new"))
                rows_out.append([pattern, rows, name, f"{old:.3f}", f"{new:.3f}",
                                 f"{old / new:.3f}x"])
    print(f"* command: python benchmarks/cpu_library_ab.py {' '.join(argv or sys.argv[1:])}")
    print(f"* machine: {cpu_model()}, {os.cpu_count()} logical CPUs, {threads} threads, "
          f"torch {torch.__version__}; {features_line()}")
    print(f"* load average: {load_before} at the start, {load_text()} at the end")
    print(f"* weight {out_features}x{in_features} bf16; {len(copies)} copies per pattern "
          f"(>= {cold_mb} MiB); median of {args.rounds - 1} rounds\n")
    print(format_table(["pattern", "rows", "method", f"old ms ({args.old_rev})", "new ms",
                        "speedup"], rows_out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
