"""Which N:M patterns each CPU kernel takes: pure predicates of (N, M), shared by the dispatch
(:mod:`nmsparse.kernels.cpu`), the AMX kernel (:mod:`.amx`) and the prepared layout."""

from __future__ import annotations

# The largest M the packed format holds (8-bit positions) and the kernels take.
MAX_M = 256
# Up to this M the positions take at most 4 bits, which the AVX2 library and every AVX-512
# kernel read; larger M (8-bit positions) runs the dot kernel (M = 32, 64), the table kernel
# (N dividing 8) or the dense path, on AVX-512 (:func:`wide_m`).
NARROW_M = 16


def pattern_reason(n: int, m: int) -> str | None:
    if m > MAX_M or not 1 <= n < m:
        return f"pattern {n}:{m} (the CPU kernels need 1 <= N < M <= {MAX_M})"
    return None


def any_n(n: int) -> bool:
    """Whether N needs the kernels that take any N (the dot kernel and the dense path, on
    AVX-512): the others read the positions of 8 values at a time as whole groups."""
    return bool(8 % n)


def wide_m(m: int) -> bool:
    """Whether M's positions take 8 bits (M > 16): AVX-512 only, no AVX2, pairs or lanes."""
    return m > NARROW_M


def kernel_takes(kernel: str, n: int, m: int) -> bool:
    """Whether ``kernel`` (one of ``KERNELS[1:]``) takes N:M at all (pairs, lanes and amx also
    need bf16 weights on ``avx512bf16``; "avx2" is the AVX2 library's kernel)."""
    if kernel == "avx2":
        return not any_n(n) and not wide_m(m)
    if kernel == "dot":
        return masks_take(n, m)
    if kernel == "table":
        return not any_n(n)
    if kernel in BF16_KERNELS:
        return BF16_KERNELS[kernel](n, m)
    return kernel == "dense"


def masks_take(n: int, m: int) -> bool:
    """Whether the dense masks of 64 inputs at a time hold whole groups of N:M (M a power of
    two up to 64), which the dot and AMX kernels read."""
    return not m & (m - 1) and m <= 64


def pairs_take(n: int, m: int) -> bool:
    """Whether the pairs kernel takes N:M: M in {2, 4, 8}, N = 1 or even."""
    return m in (2, 4, 8) and (n == 1 or n % 2 == 0) and not any_n(n)


def lanes_take(n: int, m: int) -> bool:
    """Whether the lanes kernel takes N:M: M in {2, 4, 8}, N even, or N = 1 with M <= 4 (every
    pair of kept values must lie in one aligned window of 8 inputs)."""
    return m in (2, 4, 8) and (n % 2 == 0 or (n == 1 and m <= 4)) and not any_n(n)


# The kernels that take bf16 weights only (on avx512bf16), with what else they need of the
# pattern.
BF16_KERNELS = {"pairs": pairs_take, "lanes": lanes_take, "amx": masks_take}
