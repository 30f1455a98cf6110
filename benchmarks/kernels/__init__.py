"""Kernel benchmark: dense vs 2:4 sparse tensor cores vs packed N:M Triton kernels, and decode.

For every weight shape (``OUTxIN``, the ``nn.Linear`` weight's shape) and batch size, in bf16:

* ``dense (cuBLAS)``: ``F.linear`` on the dense weight;
* ``2:4 cuSPARSELt`` / ``2:4 CUTLASS``: PyTorch's semi-structured sparse tensors through
  :class:`nmsparse.kernels.semi_structured.SemiStructuredLinear` (what ``accelerate`` installs);
* ``N:M Triton`` for 2:4, 4:8, 1:4, 2:8: ``nmsparse.kernels.nm_linear`` on
  ``nmsparse.packing.pack`` weights (``NMSPARSE_KERNELS=triton``: no silent fallback).

End to end: greedy decoding of the ``nmsparse.app.models`` ``gpt_1b`` preset (bf16, batch 1)
through ``GPT.decoder`` (static KV cache), dense vs 2:4 (``accelerate`` and Triton) vs 2:8
(Triton), each decode step replayed as one CUDA graph; tokens per second.

Run from the repository root (not installed with nmsparse):

    python -m benchmarks.kernels                   # full run, writes docs/kernels.md
    python -m benchmarks.kernels --quick           # 2 shapes, fewer repeats, 32 tokens
    python -m benchmarks.kernels --shapes 4096x4096 --batches 1,16 --no-decode --no-write

Needs an NVIDIA GPU of compute capability >= 8.0; elsewhere it exits with status 2.

Modules: :mod:`.cli` (options, machine, main), :mod:`.linear` (the Linear-layer runs),
:mod:`.decode` (the decode runs; :func:`.decode.time_decode` also times on the CPU),
:mod:`.timing` (CUDA-event / CUDA-graph timing, L2 rotation), :mod:`.results` (result rows,
metrics, targets, tables) and :mod:`.page` (the Markdown page).
"""
