"""End-to-end decode: greedy tokens/s of an ``nmsparse.app.models`` GPT, dense vs N:M kernels.

Decoding itself is the model's (``GPT.decoder``, a static KV cache); this module times it
(:func:`time_decode`: CUDA-graph replays on a GPU, eager steps on the CPU) and builds the
dense, 2:4 and 2:8 variants of one model (:func:`run_decode`).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import nmsparse
from nmsparse.app.models import create_model
from nmsparse.kernels import accelerate, swap_linear_layers

from . import timing
from .results import DecodeResult, format_decode_table

DTYPE = torch.bfloat16


def time_decode(model: nn.Module, tokens: int, mode: str = "graph", repeats: int = 3,
                warmup: int = 3) -> tuple[float, str]:
    """Median seconds to generate ``tokens`` tokens greedily from token 0, and the timing
    used: ``"graph"`` (each step one CUDA-graph replay; CUDA only) or ``"eager"``."""
    decoder = model.decoder(max(tokens, 2))  # a graph capture runs two steps
    cuda = decoder.token.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    run: Callable[[], object] = decoder.step
    used = "eager"
    with torch.no_grad():
        decoder.reset()
        for _ in range(min(warmup, decoder.max_len)):  # compiles Triton, starts cuSPARSELt
            decoder.step()
        sync()
        if mode == "graph" and cuda:
            decoder.reset()
            run, used = timing.capture_graph(decoder.step)
        elif mode == "graph":
            used = "eager (no CUDA graphs off the GPU)"
        samples = []
        for _ in range(repeats):
            decoder.reset()
            sync()
            start = time.perf_counter()
            for _ in range(tokens):
                run()
            sync()
            samples.append(time.perf_counter() - start)
    return statistics.median(samples), used


def first_logits(model: nn.Module) -> torch.Tensor:
    """Logits of the first decode step from token 0, in float32."""
    decoder = model.decoder(1)
    decoder.reset()
    with torch.no_grad():
        return decoder.step().float()


def run_decode(args: argparse.Namespace, log: Callable[[str], None] = print,
               device: str = "cuda", model_name: str = "gpt_1b",
               options: dict | None = None,
               progress: Callable[[list[DecodeResult]], None] | None = None,
               ) -> list[DecodeResult]:
    """Dense, 2:4 (``accelerate`` and Triton) and 2:8 (Triton) decode of one random model;
    ``args`` gives ``seed``, ``decode_tokens`` and ``timing``; ``progress`` gets the results
    so far after each new one."""
    torch.manual_seed(args.seed)
    with torch.device(device):  # gpt_1b: ~4.8 GB of fp32 weights, built where it runs
        base = create_model(model_name, input_shape=(1024,), num_classes=256,
                            task="language_model", **(options or {}))
    base = base.to(DTYPE).eval()
    total = sum(isinstance(m, nn.Linear) for m in base.modules())
    results: list[DecodeResult] = []

    def add(result: DecodeResult) -> None:
        results.append(result)
        log(format_decode_table(results).splitlines()[-1])
        if progress:
            progress(results)

    def measure(result: DecodeResult, model: nn.Module, reference: torch.Tensor | None) -> None:
        try:
            if reference is not None:
                result.logit_error = timing.relative_error(first_logits(model), reference)
            result.seconds, result.mode = time_decode(model, args.decode_tokens, args.timing)
        except Exception as exc:  # noqa: BLE001
            result.note = f"failed: {timing.short_error(exc)}"
        add(result)

    measure(DecodeResult("dense (cuBLAS)", "dense", f"{total} dense", args.decode_tokens,
                         model=model_name), base, None)

    def via_accelerate(model: nn.Module) -> int:
        return len(accelerate(model).converted)

    def via_triton(pattern: str) -> Callable[[nn.Module], int]:
        return lambda model: len(swap_linear_layers(model, pattern).swapped)

    variants = {"2:4": [("2:4 tensor cores (accelerate)", via_accelerate),
                        ("2:4 Triton (swap_linear_layers)", via_triton("2:4"))],
                "2:8": [("2:8 Triton (swap_linear_layers)", via_triton("2:8"))]}
    for pattern, conversions in variants.items():
        pruned = copy.deepcopy(base)
        nmsparse.sparsify(pruned, pattern, "fixed")
        nmsparse.finalize(pruned)
        reference = first_logits(pruned)
        for label, convert in conversions:
            result = DecodeResult(label, pattern, "-", args.decode_tokens, model=model_name)
            model = copy.deepcopy(pruned)
            try:
                result.layers = f"{convert(model)}/{total} {pattern}"
            except Exception as exc:  # noqa: BLE001
                result.note = f"conversion failed: {timing.short_error(exc)}"
                add(result)
                continue
            measure(result, model, reference)
            del model
            timing.empty_cache()
        del pruned
        timing.empty_cache()
    return results
