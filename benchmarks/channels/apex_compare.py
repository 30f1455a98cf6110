"""nmsparse's channel-permutation search beside NVIDIA apex's, on the same 2:4 inputs.

    python -m benchmarks.channels.apex_compare --apex /path/to/apex/contrib/sparsity

``--apex`` is the folder that holds apex's ``permutation_search_kernels`` package (a checkout
of github.com/NVIDIA/apex; apex itself need not be installed); it is imported only because
the flag names it. apex's CPU search (``Exhaustive_Search``: stripe groups of 8 channels, 100
escape attempts, its default) and ours run on the same ``|w|`` matrices (random cubed
uniforms, which have a few large entries like trained weights); the table gives the kept
magnitude of each and the seconds each took. apex's search supports N:4 only, so this is
2:4. Timings are as measured on whatever else the machine was doing.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from nmsparse.channels.permute import greedy_swap_order, pair_search_order, stripe_kept
from nmsparse.tables import format_table

SHAPES = ((32, 16), (16, 32), (64, 32))  # (rows, channels)


def kept(matrix: torch.Tensor, order) -> float:
    return stripe_kept(matrix, torch.as_tensor(order).reshape(-1, 4), 2).sum().item()


def ours(matrix: torch.Tensor) -> torch.Tensor:
    order, _ = greedy_swap_order(matrix, 2, 4)
    return pair_search_order(matrix, 2, 4, order)[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--apex", type=Path, required=True,
                        help="folder holding apex's permutation_search_kernels package")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    if not (args.apex / "permutation_search_kernels").is_dir():
        print(f"--apex: no permutation_search_kernels folder in {args.apex}", file=sys.stderr)
        return 2
    # apex caches its partition lists in ./.cache unless told otherwise: keep them out of here
    os.environ.setdefault("APEX_ASP_CACHE_DIR", tempfile.mkdtemp(prefix="apex-asp-"))
    sys.path.insert(0, str(args.apex))
    apex = importlib.import_module("permutation_search_kernels.exhaustive_search")
    apex.time = time  # its module uses `time` without importing it (its package does elsewhere)
    rows = []
    for height, channels in SHAPES:
        for seed in range(args.seeds):
            generator = torch.Generator().manual_seed(seed)
            matrix = torch.rand(height, channels, generator=generator) ** 3
            started = time.perf_counter()
            mine = ours(matrix)
            mine_s = time.perf_counter() - started
            started = time.perf_counter()
            np.random.seed(seed)
            _, _, theirs = apex.Exhaustive_Search(matrix.numpy().astype(np.float64),
                                                  stripe_group_size=8, escape_attempts=100)
            theirs_s = time.perf_counter() - started
            a, b = kept(matrix, mine), kept(matrix, list(theirs))
            rows.append([f"{height}x{channels}", str(seed), f"{kept(matrix, range(channels)):.3f}",
                         f"{a:.3f}", f"{b:.3f}", f"{a - b:+.3f}", f"{mine_s:.1f}",
                         f"{theirs_s:.1f}"])
            print(format_table(["rows x channels", "seed", "identity", "nmsparse", "apex",
                                "nmsparse - apex", "nmsparse s", "apex s"], rows[-1:]),
                  flush=True)
    print()
    print(format_table(["rows x channels", "seed", "identity", "nmsparse", "apex",
                        "nmsparse - apex", "nmsparse s", "apex s"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
