"""``python -m nmsparse.kernels.cpu``: build now the CPU libraries this machine can use, and
say which instruction set each part runs, or why it cannot.

The libraries are otherwise compiled on first use, once per user and source (on a 2-core AMD
EPYC: about 3 s for the AVX2 library, 11 s for the AVX-512 one, under a second for each mask
pass). Run this where that first use should not pay for it: while building a container image
or a shared install (with ``NMSPARSE_CACHE_DIR`` pointing at a folder the users read, at build
time and at run time; the run-time image needs no compiler). Exit status 0 when every part
this CPU supports is built, 1 otherwise."""

from __future__ import annotations

import sys

from . import (
    AMX_DENSE_ROWS,
    AMX_ROWS,
    ISAS,
    amx_reason,
    build_error,
    features,
    isa,
    isa_reason,
    mask_pass,
)
from ._build import BuildError, cache_dir, compiler


def main() -> int:
    try:
        folder = str(cache_dir())
    except BuildError as error:
        print(f"nmsparse CPU kernels: {error}")
        return 1
    print(f"cache folder: {folder}")
    print(f"compiler: {compiler() or 'none found (set CXX, or install g++)'}")
    error = build_error()
    if error:
        print(f"not built: {error}")
        print("the N:M layers compute unpack + F.linear instead (exact, no faster)")
        return 1
    cpu = sorted(features())
    print(f"this CPU: {', '.join(cpu) or 'none of ' + ', '.join(ISAS)}")
    missing = 0
    for name in ISAS:
        reason = isa_reason(name)
        if reason is not None and name in cpu:
            missing += 1
        print(f"  Linear kernels, {name}: {'built' if reason is None else reason}")
    reason = mask_pass.reason()
    missing += reason is not None
    print(f"  training mask pass: {'built' if reason is None else reason}")
    print(f"Linear kernels use: {isa()}")
    prepared = ("available for bf16 weights (nmsparse.kernels.prepare_cpu)"
                if isa() == "avx512bf16" else "not available (it needs AVX512_BF16 and VBMI)")
    print(f"prepared layout (PreparedNMLinear): {prepared}")
    if "amx" in cpu:
        reason = amx_reason()
        if reason is None:
            print(f"AMX: bf16 calls from {AMX_ROWS} rows take the AMX kernel (its self-check "
                  "passed; the row count is not measured: rerun benchmarks/cpu_kernels.py)")
        else:
            print(f"AMX: bf16 calls from {AMX_DENSE_ROWS} rows take the dense path, whose "
                  f"F.linear runs on AMX tiles; the AMX kernel is not used: {reason}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
