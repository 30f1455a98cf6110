"""Seconds per transformer block of ``nmsparse.prune(..., "sparsegpt")`` at the 1.1B Llama widths.

A ``LlamaForCausalLM`` with the TinyLlama block shape (hidden 2048, MLP 5632, 32 heads, 4
key/value heads; ``--layers`` blocks, 2 by default: every block costs the same) is built from a
config with random weights in bfloat16, nothing downloaded, and pruned to 2:4 with SparseGPT
on one calibration batch of 4 x 128 random token ids (the memory benchmark's calibration size),
the head left dense. Printed per block: wall seconds, this process's CPU seconds (user +
system; with ``--threads 1`` the CPU seconds hardly depend on what else the machine runs, the
wall seconds do) and the load average.

    python -m benchmarks.sparsegpt_blocks --threads 1

To compare code versions, point ``PYTHONPATH`` at each version's ``src`` (e.g. a ``git
archive`` of the older commit) and run them one right after the other on the same machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=128, help="tokens per sequence (128)")
    args = parser.parse_args(argv)
    import torch
    import transformers

    import nmsparse

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=2048,
                                      intermediate_size=5632, num_hidden_layers=args.layers,
                                      num_attention_heads=32, num_key_value_heads=4,
                                      max_position_embeddings=2048)
    torch.set_default_dtype(torch.bfloat16)
    model = transformers.LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, config.vocab_size, (4, args.tokens), generator=generator)]
    print(f"nmsparse from {os.path.dirname(nmsparse.__file__)}; {args.threads} thread(s); "
          f"{sum(p.numel() for p in model.parameters()):,} parameters", flush=True)
    last = [time.perf_counter(), time.process_time()]

    def progress(done, total, unit):
        wall, cpu = time.perf_counter(), time.process_time()
        print(f"{unit} {done}/{total}: {wall - last[0]:.1f} s wall, {cpu - last[1]:.1f} s CPU, "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)
        last[:] = [wall, cpu]

    nmsparse.prune(model, "2:4", "sparsegpt", calibration=batches, exclude="lm_head",
                   then=None, progress=progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
