"""A pretend GPU for the benchmarks' plumbing tests on the CPU: CUDA-event timing replaced by
fixed numbers, 2:4 compression by the identity (CUTLASS reported unusable), accelerate's
device checks by the CPU. Checks that rows, errors and reports come out right; no speed."""

from __future__ import annotations

import torch


def install_fake_gpu(monkeypatch) -> None:
    from benchmarks.kernels import decode, timing
    from nmsparse.kernels import semi_structured as ss

    monkeypatch.setenv("NMSPARSE_KERNELS", "torch")  # the exact fallback, not the CPU kernels
    monkeypatch.setattr(timing, "time_calls", lambda calls, **kw: (10.0 / len(calls), "fake"))
    monkeypatch.setattr(timing, "l2_cache_bytes", lambda: 2**16)
    monkeypatch.setattr(decode, "time_decode", lambda model, tokens, mode: (0.5, "fake"))
    errors = {"cutlass": "cutlass failed on FakeGPU: sm8x only"}
    monkeypatch.setattr(ss, "backend_error", lambda b, d=None, t=None: errors.get(b))
    monkeypatch.setattr(ss, "to_semi_structured", lambda weight, backend: weight)
    plan = ss._plan
    monkeypatch.setattr(ss, "_require_cuda", lambda model: [torch.device("cpu")])
    monkeypatch.setattr(ss, "_plan", lambda *args, devices: plan(*args, devices=False))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "FakeGPU")
