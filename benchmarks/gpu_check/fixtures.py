"""FIXTURE numbers for the dry run of the GPU check: made up, never measured.

They let ``make gpu-check DRY=1`` (and its test) go through every part, table and target of
the report without a GPU. Every result built from them carries ``"fixture": true`` and the
report says so at the top and in every section title.
"""

from __future__ import annotations

FIXTURE = "FIXTURE (dry run, not measured)"

MACHINE = {"GPU": FIXTURE, "triton": FIXTURE, "cuSPARSELt": FIXTURE, "cuda": "fixture",
           "date": FIXTURE}

CORRECTNESS = [
    {"check": "Triton 2:4 gemv", "dtype": "bfloat16", "where": "4096x4096, batch 1",
     "rel_err": 2.0e-3, "tolerance": 1e-2, "ok": True, "note": FIXTURE},
    {"check": "Triton 2:8 gemm", "dtype": "bfloat16", "where": "4096x4096, batch 300",
     "rel_err": 3.0e-3, "tolerance": 1e-2, "ok": True, "note": FIXTURE},
    {"check": "accelerate 2:4 (tensor cores)", "dtype": "bfloat16",
     "where": "gpt_tiny d512 x4 layers, logits of (2, 128)", "rel_err": None,
     "tolerance": 1e-2, "ok": False, "note": f"{FIXTURE}: a failed check as it would show"},
]


def _kernel(shape, batch, kernel, pattern, weight_bytes, time_us, note=FIXTURE):
    out, inp = shape
    return {"shape": list(shape), "batch": batch, "kernel": kernel, "pattern": pattern,
            "weight_bytes": weight_bytes, "act_bytes": batch * (out + inp) * 2,
            "time_us": time_us, "mode": "fixture", "error": 1e-3 if time_us else None,
            "note": note}


_SMALL, _BIG = (4096, 4096), (8192, 8192)
_SMALL_BYTES, _BIG_BYTES = 4096 * 4096 * 2, 8192 * 8192 * 2
KERNELS = [
    _kernel(_SMALL, 1, "dense (cuBLAS)", "dense", _SMALL_BYTES, 10.0),
    _kernel(_SMALL, 1, "2:4 cuSPARSELt (torch)", "2:4", _SMALL_BYTES * 9 // 16, 8.0),
    _kernel(_SMALL, 1, "2:4 CUTLASS (torch)", "2:4", 0, None,
            f"unavailable: {FIXTURE}"),
    _kernel(_SMALL, 1, "2:4 Triton (nmsparse)", "2:4", _SMALL_BYTES * 9 // 16, 6.0),
    _kernel(_SMALL, 1, "1:4 Triton (nmsparse)", "1:4", _SMALL_BYTES * 9 // 32, 3.5),
    _kernel(_SMALL, 1, "2:8 Triton (nmsparse)", "2:8", _SMALL_BYTES * 5 // 16, 4.0),
    _kernel(_BIG, 4096, "dense (cuBLAS)", "dense", _BIG_BYTES, 800.0),
    _kernel(_BIG, 4096, "2:4 cuSPARSELt (torch)", "2:4", _BIG_BYTES * 9 // 16, 640.0),
]

DECODE = [
    {"variant": "dense (cuBLAS)", "pattern": "dense", "layers": "97 dense", "tokens": 128,
     "seconds": 0.50, "mode": "fixture", "note": FIXTURE},
    {"variant": "2:4 tensor cores (accelerate)", "pattern": "2:4", "layers": "97/97 2:4",
     "tokens": 128, "seconds": 0.40, "mode": "fixture", "logit_error": 4e-3, "note": FIXTURE},
    {"variant": "2:8 Triton (swap_linear_layers)", "pattern": "2:8", "layers": "97/97 2:8",
     "tokens": 128, "seconds": 0.25, "mode": "fixture", "logit_error": 6e-3, "note": FIXTURE},
]

_CNN = "small CNN (conv 1-32-64 3x3, linear 9216-128-10)"
_MLP = "MLP 1024-4096-1024-4096-1024"
_VIT = "ViT (vit_tiny dim 384, depth 6, 6 heads, 8x8 patches of 4 px)"


def _step(dense, sparse, refresh, decay):
    return {"dense_ms": dense, "sparse_ms": sparse, "refresh_ms": refresh, "decay_ms": decay,
            "steps": 7, "note": FIXTURE}


OVERHEAD = {
    "eager": {_CNN: _step(10.0, 10.8, 0.5, 0.1), _MLP: _step(20.0, 21.5, 1.0, 0.2),
              _VIT: _step(30.0, 33.0, 2.0, 0.4)},
    "compiled": {_CNN: _step(10.0, 10.3, 0.2, 0.1), _MLP: _step(20.0, 20.6, 0.4, 0.2),
                 _VIT: _step(30.0, 31.2, 0.8, 0.4)},
}
