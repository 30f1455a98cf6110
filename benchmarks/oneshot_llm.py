"""One-shot pruning of two small byte-level language models, magnitude vs Wanda vs RIA vs
SparseGPT, at 2:4 and 4:8, with and without channel permutation, over calibration seeds.

The models are trained here, dense, on the Python standard library sources (the corpus of
``nmsparse train --data text``; first 90 % of the bytes for training and calibration, last
10 % held out):

* ``gpt``: the project's byte-level GPT (:class:`nmsparse.app.models.gpt.GPT`);
* ``llama``: a transformers ``LlamaForCausalLM`` built from a config with a 256-id (byte)
  vocabulary, saved with ``save_pretrained`` and read back the way ``nmsparse prune`` reads a
  folder (so it is the command line's road, with the byte fallback tokenizer).

Each pruned model is scored with :func:`nmsparse.hf.perplexity.perplexity` (the code behind
``nmsparse eval``) on the first ``--eval-bytes`` of the held-out bytes, in disjoint windows of
``--seq-len``. A unigram model (byte frequencies of the training part, add-one smoothed) is
the floor a trained model must clearly beat.

Permutation (:mod:`nmsparse.channels.permute`) depends on the weights only, not on the
calibration data or the pruner, so it is computed once per model and pattern and every
pruner then runs on the permuted copy; this equals ``prune(..., permute=True)``, which the
script checks once (``permute_check`` in the JSON).

    python -m benchmarks.oneshot_llm                        # the committed table
    python -m benchmarks.oneshot_llm --quick                # a smoke run (seconds)

(Run it as a module from the repository root: as a script, benchmarks/kernels/ would shadow
the ``kernels`` package that transformers imports.)

Writes the table into docs/oneshot.md between its ``oneshot-llm`` markers and the raw numbers
into docs/oneshot_llm.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import nmsparse
from nmsparse.app.cli.llm_text import calibration_batches, split
from nmsparse.channels.permute import permute_model
from nmsparse.hf.folder import load_causal_lm
from nmsparse.hf.perplexity import perplexity
from nmsparse.machine import cpu_model
from nmsparse.oneshot.targets import find_targets

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["magnitude", "wanda", "ria", "sparsegpt"]
PATTERNS = ["2:4", "4:8"]
BEGIN, END = "<!-- oneshot-llm:begin -->", "<!-- oneshot-llm:end -->"


class Logits(nn.Module):
    """The project's GPT behind the Hugging Face call ``model(input_ids=...).logits``."""

    def __init__(self, gpt: nn.Module) -> None:
        super().__init__()
        self.gpt = gpt

    def forward(self, input_ids, use_cache=False):
        return type("Output", (), {"logits": self.gpt(input_ids)})


def build(kind: str, seq_len: int, width: int, layers: int) -> nn.Module:
    torch.manual_seed(0)
    if kind == "gpt":
        from nmsparse.app.models.gpt import GPT

        return Logits(GPT(vocab_size=256, max_seq_len=seq_len, n_layer=layers, n_head=4,
                          d_model=width))
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=width, intermediate_size=width * 8 // 3 // 8 * 8,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=seq_len, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config)


def train(model: nn.Module, ids: torch.Tensor, steps: int, batch: int, seq_len: int,
          lr: float) -> tuple[float, float]:
    """Plain AdamW with a cosine schedule on random windows; returns (seconds, last loss)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(
        (step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))))
    generator = torch.Generator().manual_seed(1234)
    model.train()
    started, loss = time.perf_counter(), float("nan")
    for step in range(steps):
        starts = torch.randint(0, len(ids) - seq_len - 1, (batch,), generator=generator)
        window = torch.stack([ids[s:s + seq_len + 1] for s in starts.tolist()])
        logits = model(input_ids=window[:, :-1]).logits
        loss_t = F.cross_entropy(logits.reshape(-1, 256), window[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss_t.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        loss = float(loss_t.detach())
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            print(f"  step {step + 1}/{steps}: loss {loss / math.log(2):.3f} bits/byte "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    model.eval()
    return time.perf_counter() - started, loss


def unigram_bits(train_ids: torch.Tensor, test_ids: torch.Tensor) -> float:
    counts = torch.bincount(train_ids, minlength=256).double() + 1
    return float(-(counts / counts.sum()).log2()[test_ids].mean())


def score(model, ids, seq_len) -> dict:
    result = perplexity(model, ids, seq_len, seq_len, byte_count=len, batch_size=8)
    return {"perplexity": result.perplexity, "bits_per_byte": result.bits_per_byte}


def run_model(kind: str, args, train_ids, test_ids, folder: Path) -> dict:
    print(f"{kind}: training", flush=True)
    model = build(kind, args.seq_len, args.width, args.layers)
    params = sum(p.numel() for p in model.parameters())
    seconds, _ = train(model, train_ids, args.steps, args.batch, args.seq_len, args.lr)
    head = "gpt.lm_head" if kind == "gpt" else "lm_head"
    if kind == "llama":  # from here on, the folder as the command line reads it
        model.save_pretrained(folder / "llama")
        if args.save_llama:
            model.save_pretrained(args.save_llama)
        model = load_causal_lm(folder / "llama", "float32")
    dense = score(model, test_ids, args.seq_len)
    print(f"{kind}: dense {dense}", flush=True)
    if args.train_only:
        return {"kind": kind, "parameters": params, "train_seconds": seconds, "dense": dense}
    rows = []
    permuted = {}
    for pattern in PATTERNS:
        copy_ = copy.deepcopy(model)
        batches = calibration_batches(train_ids, 1, args.seq_len, 1, 0)
        weights = {t.name for t in find_targets(copy_) if not t.name.startswith(head + ".")}

        started = time.perf_counter()
        report = permute_model(copy_, pattern, batches[0], weights)
        permuted[pattern] = (copy_, time.perf_counter() - started, report)
    for method in METHODS:
        for pattern in PATTERNS:
            for permute in (False, True):
                for seed in range(args.seeds):
                    start = permuted[pattern][0] if permute else model
                    pruned = copy.deepcopy(start)
                    batches = calibration_batches(train_ids, args.calibration, args.seq_len,
                                                  16, seed)
                    result = nmsparse.prune(pruned, pattern, method, calibration=batches,
                                            then=None, exclude=[head])
                    row = {"method": method, "pattern": pattern, "permute": permute,
                           "seed": seed, "seconds": result.seconds,
                           "pruned": sum(layer.pruned for layer in result.layers),
                           **score(pruned, test_ids, args.seq_len)}
                    rows.append(row)
                    print(f"{kind}: {row}", flush=True)
    # once: the shared permutation equals prune(permute=True)
    check = copy.deepcopy(model)
    nmsparse.prune(check, "2:4", "wanda", then=None, exclude=[head], permute=True,
                   calibration=calibration_batches(train_ids, args.calibration, args.seq_len,
                                                   16, 0))
    direct = score(check, test_ids, args.seq_len)["perplexity"]
    shared = next(r["perplexity"] for r in rows if r["method"] == "wanda" and r["permute"]
                  and r["pattern"] == "2:4" and r["seed"] == 0)
    return {"kind": kind, "parameters": params, "train_seconds": seconds, "dense": dense,
            "rows": rows, "permute_check": {"direct": direct, "shared": shared},
            "permutation": {p: {"seconds": permuted[p][1],
                                "kept_before": permuted[p][2].kept_before,
                                "kept_after": permuted[p][2].kept_after,
                                "total": permuted[p][2].total} for p in PATTERNS}}


def _cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(results: dict, args, command: str) -> str:
    lines = [BEGIN, "<!-- generated by benchmarks/oneshot_llm.py from measured numbers "
             "(oneshot_llm.json) -->", ""]
    lines.append(f"- Corpus: {results['corpus']}; unigram model (train byte frequencies): "
                 f"**{results['unigram_bits']:.3f}** bits per byte, perplexity "
                 f"{2 ** results['unigram_bits']:.2f}.")
    lines.append(f"- Training (each model, dense): {args.steps} AdamW steps of {args.batch} x "
                 f"{args.seq_len} bytes, peak lr {args.lr}, warm-up then cosine; width "
                 f"{args.width}, {args.layers} blocks, 4 heads.")
    lines.append(f"- Calibration: {args.calibration} windows of {args.seq_len} bytes from the "
                 f"training part, seeds 0..{args.seeds - 1}; every block Linear pruned, the "
                 "head kept dense. Evaluation: perplexity per byte on the first "
                 f"{results['eval_bytes']} held-out bytes, disjoint windows of {args.seq_len}.")
    lines.append(f"- Machine: {results['machine']}. Command: `{command}`.")
    for model in results["models"]:
        lines += ["", f"**{model['kind']}** ({model['parameters']:,} parameters, trained in "
                  f"{model['train_seconds']:.0f} s): dense perplexity "
                  f"**{model['dense']['perplexity']:.3f}** "
                  f"({model['dense']['bits_per_byte']:.3f} bits per byte). One-shot "
                  f"perplexity, mean ± sd over {args.seeds} calibration seeds:", ""]
        lines.append("| method | permute | " + " | ".join(PATTERNS) + " |")
        lines.append("|---|---|" + "---:|" * len(PATTERNS))
        for method in METHODS:
            for permute in (False, True):
                cells = [_cell([r["perplexity"] for r in model["rows"]
                                if r["method"] == method and r["pattern"] == p
                                and r["permute"] == permute]) for p in PATTERNS]
                lines.append(f"| {method} | {'yes' if permute else 'no'} | "
                             + " | ".join(cells) + " |")
        perm = model["permutation"]
        lines.append("")
        lines.append("Permutation kept magnitude: " + "; ".join(
            f"{p}: {perm[p]['kept_before'] / perm[p]['total']:.2%} -> "
            f"{perm[p]['kept_after'] / perm[p]['total']:.2%}" for p in PATTERNS)
            + f". Shared permutation vs `prune(permute=True)` (wanda 2:4, seed 0): "
            f"{model['permute_check']['shared']:.4f} vs {model['permute_check']['direct']:.4f}.")
    lines += ["", END]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--width", type=int, default=96)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--calibration", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--eval-bytes", type=int, default=32768)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="+", default=["gpt", "llama"])
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny everything")
    parser.add_argument("--save-llama", metavar="DIR", help="also save the trained Llama "
                        "here (a model folder for the nmsparse commands)")
    parser.add_argument("--train-only", action="store_true", help="train and score the dense "
                        "models, prune nothing, write no table")
    parser.add_argument("--out", default=str(ROOT / "docs" / "oneshot.md"))
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.width, args.calibration, args.seeds = 20, 32, 4, 2
        args.eval_bytes, args.seq_len = 2048, 32
    torch.set_num_threads(args.threads)
    corpus = read_text_stdlib()
    train_bytes, test_bytes = split(corpus[0])
    train_ids = torch.frombuffer(bytearray(train_bytes), dtype=torch.uint8).long()
    test_ids = torch.frombuffer(bytearray(test_bytes[:args.eval_bytes]), dtype=torch.uint8).long()
    results = {"corpus": corpus[1], "unigram_bits": unigram_bits(train_ids, test_ids),
               "eval_bytes": len(test_ids),
               "machine": f"{cpu_model()}, torch {torch.__version__}, {args.threads} thread(s), "
                          f"Python {platform.python_version()} (2 shared cores, loaded)",
               "args": vars(args), "models": []}
    with tempfile.TemporaryDirectory() as folder:
        for kind in args.models:
            results["models"].append(run_model(kind, args, train_ids, test_ids, Path(folder)))
    if args.train_only:
        print(json.dumps(results["models"], indent=2))
        return 0
    command = "python -m benchmarks.oneshot_llm " + " ".join(argv or sys.argv[1:])
    text = table(results, args, command.strip())
    print(text)
    out = Path(args.out)
    (out.parent / "oneshot_llm.json").write_text(json.dumps(results, indent=2) + "\n")
    if out.exists() and BEGIN in out.read_text():
        page = out.read_text()
        head, _, rest = page.partition(BEGIN)
        _, _, tail = rest.partition(END)
        out.write_text(head + text + tail)
    return 0


def read_text_stdlib() -> tuple[bytes, str]:
    """The standard-library corpus of ``--data text`` (first 8 MiB of its ``*.py``)."""
    from nmsparse.app.data.text import _source

    return _source(None)


if __name__ == "__main__":
    sys.exit(main())
