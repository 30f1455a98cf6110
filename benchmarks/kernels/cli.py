"""Options, the machine description and ``main`` of ``python -m benchmarks.kernels``."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from nmsparse import parse_pattern
from nmsparse.tables import format_table

from . import timing
from .page import render_markdown
from .results import TARGET_HEADERS, format_decode_table, format_kernel_table, target_rows

DEFAULT_OUT = Path("docs") / "kernels.md"  # relative to where it is run: the repository root
DEFAULT_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192)]
QUICK_SHAPES = [(4096, 4096), (8192, 8192)]
DEFAULT_BATCHES = [1, 16, 256, 4096]
DEFAULT_PATTERNS = ["2:4", "4:8", "1:4", "2:8"]
EXIT_NO_GPU = 2
PROGRAM = "python -m benchmarks.kernels"


def parse_shape(text: str) -> tuple[int, int]:
    parts = text.strip().lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"shape {text!r} is not OUTxIN with positive integers "
                                         "(e.g. 4096x11008)")
    return int(parts[0]), int(parts[1])


def parse_shapes(text: str) -> list[tuple[int, int]]:
    return [parse_shape(part) for part in text.split(",") if part.strip()]


def parse_batches(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"batches {text!r} are not integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"batches {text!r} must be positive integers")
    return values


def parse_patterns(text: str) -> list[str]:
    patterns = []
    for part in text.split(","):
        if not part.strip():
            continue
        try:
            pattern = parse_pattern(part.strip())
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        patterns.append(f"{pattern.n}:{pattern.m}")
    return patterns


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description="Time dense, 2:4 tensor-core and packed N:M Triton linear kernels and GPT "
                    "decode on a CUDA GPU; write the results as markdown.")
    parser.add_argument("--quick", action="store_true",
                        help="shapes 4096x4096 and 8192x8192 (unless --shapes), 3 warm-up and "
                             "10 timed runs, 32 decode tokens")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="markdown file to write (default: docs/kernels.md)")
    parser.add_argument("--no-write", action="store_true", help="print only, write no file")
    parser.add_argument("--shapes", type=parse_shapes, default=None,
                        help="comma-separated weight shapes OUTxIN (default: "
                             + ",".join(f"{o}x{i}" for o, i in DEFAULT_SHAPES) + ")")
    parser.add_argument("--batches", type=parse_batches, default=None,
                        help="comma-separated batch sizes, rows of x (default: "
                             + ",".join(map(str, DEFAULT_BATCHES)) + ")")
    parser.add_argument("--patterns", type=parse_patterns, default=None,
                        help="N:M patterns of the Triton kernels (default: "
                             + ",".join(DEFAULT_PATTERNS) + ")")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up runs (default 10)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (default 50)")
    parser.add_argument("--timing", choices=("graph", "eager"), default="graph",
                        help="replay the calls in a CUDA graph (default) or call them from "
                             "Python")
    parser.add_argument("--no-decode", action="store_true", help="skip the gpt_1b decode")
    parser.add_argument("--decode-tokens", type=int, default=None,
                        help="tokens generated per decode run (default 128)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.shapes = args.shapes or (QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    args.batches = args.batches or DEFAULT_BATCHES
    args.patterns = args.patterns or DEFAULT_PATTERNS
    args.warmup = args.warmup if args.warmup is not None else (3 if args.quick else 10)
    args.repeats = args.repeats if args.repeats is not None else (10 if args.quick else 50)
    if args.decode_tokens is None:
        args.decode_tokens = 32 if args.quick else 128
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    for name in ("repeats", "decode_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def gpu_problem() -> str | None:
    """Why this machine cannot run the benchmark, or None."""
    if not torch.cuda.is_available():
        return (f"no CUDA GPU (torch.cuda.is_available() is False, torch {torch.__version__}); "
                "this benchmark needs an NVIDIA GPU of compute capability >= 8.0")
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 0):
        return (f"{torch.cuda.get_device_name()} has compute capability {major}.{minor}; 2:4 "
                "sparse tensor cores need 8.0 or newer")
    return None


def machine_info() -> dict[str, str]:
    """GPU, library versions and date, for the page's machine table."""
    index = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    cusparselt = getattr(torch.backends, "cusparselt", None)
    cusparselt_version = cusparselt.version() if cusparselt and cusparselt.is_available() \
        else "not available"
    return {
        "GPU": f"{props.name} (compute capability {props.major}.{props.minor}, "
               f"{props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB, "
               f"L2 {timing.l2_cache_bytes() / 2**20:.0f} MiB)",
        "torch": f"{torch.__version__} (CUDA {torch.version.cuda})",
        "triton": triton_version,
        "cuSPARSELt": str(cusparselt_version),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def settings_text(args: argparse.Namespace) -> str:
    return (f"timing {args.timing}, {args.warmup} warm-up and {args.repeats} timed runs, "
            f"bf16, decode {args.decode_tokens} tokens")


def main(argv: Sequence[str] | None = None) -> int:
    from .decode import run_decode
    from .linear import run_kernels

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    problem = gpu_problem()
    if problem:
        print(f"{PROGRAM}: {problem}. Nothing was measured and {args.out} was not written.",
              file=sys.stderr)
        return EXIT_NO_GPU
    # Time the Triton kernels, never their unpack + F.linear fallback.
    os.environ["NMSPARSE_KERNELS"] = "triton"
    torch.manual_seed(args.seed)
    machine = machine_info()
    print("\n".join(f"{key}: {value}" for key, value in machine.items()), flush=True)
    results = run_kernels(args, log=lambda line: print(line, flush=True))
    decode = [] if args.no_decode else run_decode(args, log=lambda line: print(line, flush=True))
    print()
    print(format_kernel_table(results))
    if decode:
        print()
        print(format_decode_table(decode))
    print()
    print(format_table(TARGET_HEADERS, target_rows(results, decode)))
    if not args.no_write:
        command = PROGRAM + (" " + shlex.join(argv) if argv else "")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        text = render_markdown(command, machine, results, decode, settings_text(args))
        temporary = args.out.with_name(args.out.name + ".tmp")
        temporary.write_text(text)
        temporary.replace(args.out)  # never a half-written page
        print(f"\nwrote {args.out}")
    return 0
