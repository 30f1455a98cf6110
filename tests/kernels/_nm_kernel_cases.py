"""Correctness cases of the Triton N:M kernels, shared by the CPU-interpreter and the GPU tests.

Run as a script (``TRITON_INTERPRET=1 python _nm_kernel_cases.py``) it computes every case on
the CPU with Triton's interpreter and prints one JSON object ``{case id: result}``: the tests
run it in a subprocess so that the interpreter flag never leaks into the pytest process (it
would route every CPU call of ``nm_linear`` to the slow interpreter).
"""

from __future__ import annotations

import json
import sys
import zlib
from dataclasses import dataclass

import torch

PATTERNS = ((2, 4), (1, 4), (4, 8), (2, 8), (1, 16), (3, 16))
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# |y - ref| <= atol + rtol * |ref|, ref computed in fp32 from the same (rounded) inputs: the
# output rounding to the dtype dominates; fp32 accumulation order adds a little.
TOLERANCES = {"fp16": (2e-3, 2e-3), "bf16": (1e-2, 1e-2), "fp32": (1e-5, 1e-4)}


@dataclass(frozen=True)
class Case:
    n: int
    m: int
    dtype: str
    out: int
    inp: int
    batch: tuple[int, ...]
    path: str
    bias: bool

    @property
    def id(self) -> str:
        batch = "x".join(map(str, self.batch))
        return (f"{self.n}:{self.m}-{self.dtype}-{self.out}x{self.inp}-b{batch}-{self.path}"
                f"{'-bias' if self.bias else ''}")


def cases() -> list[Case]:
    found = []
    for k, (n, m) in enumerate(PATTERNS):
        for dtype in ("fp16", "bf16"):
            # in_features 96 / 112 are not multiples of the kernels' K tiles; out 48 is not a
            # multiple of the GEMM's 64 output rows.
            shape = (48, 96) if m != 16 else (40, 112)
            for batch, path in (((1,), "gemv"), ((3,), "gemv"), ((17,), "gemm"),
                                ((3,), "gemm")):
                bias = (k + len(found)) % 2 == 0
                found.append(Case(n, m, dtype, *shape, batch, path, bias))
    found += [
        Case(2, 4, "fp32", 32, 64, (5,), "gemv", True),
        Case(2, 4, "fp32", 32, 64, (5,), "gemm", False),
        Case(3, 8, "fp16", 16, 128, (2, 3), "auto", True),  # 3-D x -> GEMV
        Case(2, 8, "fp16", 64, 32, (2, 9), "auto", False),  # 3-D x -> GEMM
        Case(1, 4, "bf16", 24, 8, (33,), "gemm", True),  # in < one K tile, 3 row tiles
    ]
    return found


def run_case(case: Case, device: str) -> dict:
    """Error of the Triton kernels against F.linear with the unpacked weight (in fp32)."""
    import torch.nn.functional as F

    from nmsparse.engine.masks import nm_mask
    from nmsparse.kernels import nm_linear_triton
    from nmsparse.packing import pack, unpack_rows

    gen = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))
    dtype = DTYPES[case.dtype]
    dense = torch.randn(case.out, case.inp, generator=gen) * 0.5
    mask = nm_mask(dense, case.n, case.m)
    packed = pack(dense.masked_fill(~mask, 0).to(dtype), case.n, case.m, mask=mask).to(device)
    x = torch.randn(*case.batch, case.inp, generator=gen).to(dtype).to(device)
    bias = (torch.randn(case.out, generator=gen).to(dtype).to(device) if case.bias else None)
    y = nm_linear_triton(x, packed.values, packed.indices, case.n, case.m, bias, path=case.path)
    weight = unpack_rows(packed.values, packed.indices, case.n, case.m).float()
    ref = F.linear(x.float(), weight, None if bias is None else bias.float())
    rtol, atol = TOLERANCES[case.dtype]
    excess = ((y.float() - ref).abs() - (atol + rtol * ref.abs())).max().item()
    return {"shape": list(y.shape), "dtype": str(y.dtype), "expected_shape": list(ref.shape),
            "max_err": (y.float() - ref).abs().max().item(), "excess": excess,
            "finite": bool(torch.isfinite(y).all())}


def run_module_checks() -> dict:
    """The op and NMLinear routed to Triton on CPU (TRITON_INTERPRET=1, backend auto)."""
    import torch.nn.functional as F

    from nmsparse.engine.masks import nm_mask
    from nmsparse.kernels import NMLinear

    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(64, 32).half()
    with torch.no_grad():
        linear.weight.copy_(torch.randn(32, 64, generator=gen).half())
        linear.weight.mul_(nm_mask(linear.weight.float(), 2, 4))
    module = NMLinear.from_linear(linear, 2, 4)
    assert "triton" not in sys.modules
    results = {}
    for rows in (1, 20):
        x = torch.randn(rows, 64, generator=gen).half()
        y = module(x)
        ref = F.linear(x.float(), linear.weight.float(), linear.bias.float())
        results[f"module-{rows}"] = (y.float() - ref).abs().max().item()
    results["triton_imported"] = "triton" in sys.modules
    return results


def main() -> None:
    out: dict = {"module": run_module_checks()}  # first: Triton must not be imported yet
    out.update((case.id, run_case(case, "cpu")) for case in cases())
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
