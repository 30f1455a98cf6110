"""LLM decode and prefill on the CPU: a Llama-shaped Hugging Face model, dense bf16 vs N:M.

    python -m benchmarks.decode                      # 16 x 2048 (0.84B parameters), 2:4
    python -m benchmarks.decode --quick              # 4 layers, batch 1 and 8, short runs
    python -m benchmarks.decode --pattern 2:8 --batches 1,8,32 --repeats 3

The model is ``transformers.LlamaForCausalLM`` built from a config (random weights, nothing
downloaded): by default 16 layers, hidden 2048, intermediate 5632, 32 heads, 4 KV heads,
vocabulary 32000 (0.84B parameters, 1.7 GB in bf16; TinyLlama-1.1B's shape with 16 layers
instead of 22). Every Linear but ``lm_head`` is pruned to the pattern by magnitude; the dense
run uses that pruned model as it is (``nn.Linear``, oneDNN), the sparse run the same model
after :func:`nmsparse.kernels.swap_linear_layers` (``NMLinear``, the CPU kernels, automatic
dispatch), and, where the CPU has AVX512_BF16, the "prepared" run the swapped model after
:func:`nmsparse.kernels.prepare_cpu` (``PreparedNMLinear``: the weights laid out for the CPU
kernel once). The runs alternate, run after run, so a busy machine slows all alike.

* decode: ``model.generate`` with a ``--prompt``-token random prompt (default 32) and
  ``--new-tokens`` (default 32) greedy tokens, batch 1, 8, 32; tokens/s counts new tokens of
  all sequences, over the whole call (prefill of the prompt included);
* prefill: one forward pass over a ``--prefill``-token prompt (default 512), batch 1.

"bandwidth limit" is the speedup a decode step reading only the packed weights at the dense
run's bytes per second would get: (dense bytes of every Linear and ``lm_head``) / (packed bytes
of the swapped layers + ``lm_head``). "same tokens" is the fraction of generated tokens equal
in the dense and the last sparse run (bf16 sums in another order can flip a near tie, after
which a sequence diverges).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: benchmarks/kernels would shadow `kernels`
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch
from torch import nn

from nmsparse.engine.masks import nm_mask
from nmsparse.kernels import NMLinear, prepare_cpu, swap_linear_layers
from nmsparse.tables import format_table

HEAD = ["run", "batch", "dense bf16", "NMLinear", "speedup", "prepared", "speedup",
        "bandwidth limit", "of limit", "same tokens"]


def llama(layers: int, hidden: int, intermediate: int, seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64,
                         num_key_value_heads=max(1, hidden // 512),
                         max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    return model.eval()


def prune_linears(model: nn.Module, n: int, m: int) -> None:
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and not name.endswith("lm_head"):
                module.weight.mul_(nm_mask(module.weight.float(), n, m).to(module.weight.dtype))


def weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes a decode step reads from Linear / NMLinear weights, dense bytes of the same)."""
    read = dense = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            size = module.weight.numel() * module.weight.element_size()
            read += size
            dense += size
        elif isinstance(module, NMLinear):
            read += module.packed.nbytes
            dense += module.packed.dense_nbytes
    return read, dense


def generate(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    return time.perf_counter() - start, out[:, prompt.shape[1]:]


def prefill(model: nn.Module, prompt: torch.Tensor) -> float:
    start = time.perf_counter()
    model(prompt, use_cache=False, logits_to_keep=1)
    return time.perf_counter() - start


def run(layers: int = 16, hidden: int = 2048, intermediate: int = 5632, pattern: str = "2:4",
        batches: tuple[int, ...] = (1, 8, 32), prompt_len: int = 32, new_tokens: int = 32,
        prefill_len: int = 512, repeats: int = 3, log=print) -> tuple[str, list[list[str]]]:
    """Measure; returns (a line describing the model, the table rows)."""
    n, m = map(int, pattern.split(":"))
    dense = llama(layers, hidden, intermediate)
    prune_linears(dense, n, m)
    parameters = sum(p.numel() for p in dense.parameters())
    sparse = copy.deepcopy(dense)
    report = swap_linear_layers(sparse, pattern, exclude="lm_head")
    read_dense, _ = weight_bytes(dense)
    read_sparse, _ = weight_bytes(sparse)
    limit = read_dense / read_sparse
    models = {"dense": dense, "sparse": sparse}
    prepared = copy.deepcopy(sparse)
    if prepare_cpu(prepared).prepared:
        models["prepared"] = prepared
    described = (f"LlamaForCausalLM {layers} layers, hidden {hidden}, intermediate "
                 f"{intermediate} ({parameters / 1e9:.2f}B parameters, bf16, "
                 f"{read_dense / 2**30:.2f} GiB of Linear weights), {pattern} by magnitude, "
                 f"{len(report.swapped)} Linear layers swapped to NMLinear (lm_head dense)"
                 + ("; prepared: the same after prepare_cpu" if "prepared" in models else
                    "; no prepared run (this CPU has no AVX512_BF16)"))
    log(described)
    rows = []
    generator = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for batch in batches:
            prompt = torch.randint(0, 32000, (batch, prompt_len), generator=generator)
            for model in models.values():  # warm-up (and the kernels' build)
                generate(model, prompt, 2)
            times: dict[str, list[float]] = {name: [] for name in models}
            tokens = {}
            for _ in range(repeats):
                for name, model in models.items():
                    seconds, tokens[name] = generate(model, prompt, new_tokens)
                    times[name].append(seconds)
            rate = {name: batch * new_tokens / statistics.median(t) for name, t in times.items()}
            last = "prepared" if "prepared" in models else "sparse"
            same = float((tokens["dense"] == tokens[last]).float().mean())
            cells = []
            for name in ("sparse", "prepared"):
                cells += ([f"{rate[name]:.2f}", f"{rate[name] / rate['dense']:.2f}x"]
                          if name in rate else ["", ""])
            rows.append([f"decode {prompt_len}+{new_tokens} (tokens/s)", batch,
                         f"{rate['dense']:.2f}", *cells, f"{limit:.2f}x",
                         f"{rate[last] / rate['dense'] / limit:.0%}", f"{same:.0%}"])
            log(format_table(HEAD, rows[-1:]))
        if prefill_len:
            prompt = torch.randint(0, 32000, (1, prefill_len), generator=generator)
            for model in models.values():
                prefill(model, prompt)
            times = {name: [] for name in models}
            for _ in range(repeats):
                for name, model in models.items():
                    times[name].append(prefill(model, prompt))
            seconds = {name: statistics.median(t) for name, t in times.items()}
            cells = []
            for name in ("sparse", "prepared"):
                cells += ([f"{seconds[name]:.3f}", f"{seconds['dense'] / seconds[name]:.2f}x"]
                          if name in seconds else ["", ""])
            rows.append([f"prefill {prefill_len} tokens (s)", 1, f"{seconds['dense']:.3f}",
                         *cells, "", "", ""])
            log(format_table(HEAD, rows[-1:]))
    return described, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="4 layers, batches 1 and 8, 8 new tokens, prefill 128, 2 repeats")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--batches", default=None, help="comma-separated, default 1,8,32")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--prefill", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    try:
        batches = tuple(int(b) for b in (args.batches or ("1,8" if args.quick else "1,8,32"))
                        .split(","))
        n, m = map(int, args.pattern.split(":"))
    except ValueError:
        parser.error("--batches takes integers like 1,8,32 and --pattern N:M like 2:4")
    if min(batches) < 1 or not 1 <= n < m:
        parser.error("batches must be >= 1 and the pattern N:M with 1 <= N < M")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("NMSPARSE_KERNELS", "auto")
    run(layers=args.layers or (4 if args.quick else 16), hidden=args.hidden,
        intermediate=args.intermediate, pattern=args.pattern, batches=batches,
        prompt_len=args.prompt, new_tokens=args.new_tokens or (8 if args.quick else 32),
        prefill_len=args.prefill if args.prefill is not None else (128 if args.quick else 512),
        repeats=args.repeats or (2 if args.quick else 3))
    print(f"load average: {', '.join(f'{v:.2f}' for v in os.getloadavg())}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
