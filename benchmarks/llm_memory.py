"""Peak memory of ``nmsparse prune`` on a generated Hugging Face Llama of about 1B parameters.

1. (a child process) builds a ``LlamaForCausalLM`` from a TinyLlama-sized config (hidden 2048,
   MLP 5632, 22 blocks, 32 heads, 4 key/value heads, 32,000 ids: 1.10B parameters) with random
   weights directly in bfloat16 and writes it with ``save_pretrained`` (2.2 GB, no tokenizer:
   the byte fallback is used);
2. runs ``nmsparse prune`` on it as a child process for each ``--methods`` (calibration text:
   the standard-library corpus written to a file), sampling the child's resident set size
   (``VmRSS``) every 0.1 s and reading its peak (``ru_maxrss`` of ``wait4``) when it ends;
3. prints a table: weight bytes, peak RSS, their ratio, wall time, the child's CPU time (user +
   system: on a shared machine the wall time mostly measures the others), and the sampled peak
   of each phase (loading, the per-block pruning, writing) as the child's output lines
   delimit them.

    python -m benchmarks.llm_memory --folder /tmp/llama1b            # the committed table
    python -m benchmarks.llm_memory --folder /tmp/llama-small --small # a smoke run

Heavy: about 2.2 GB on disk twice and several GB of memory; run it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

CONFIG_1B = {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
             "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
             "max_position_embeddings": 2048}
CONFIG_SMALL = {"vocab_size": 512, "hidden_size": 128, "intermediate_size": 344,
                "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                "max_position_embeddings": 512}

GENERATE = """
import json, sys, torch, transformers
torch.manual_seed(0)
torch.set_default_dtype(torch.bfloat16)
config = transformers.LlamaConfig(**json.loads(sys.argv[2]), dtype="bfloat16")
model = transformers.LlamaForCausalLM(config)
model.save_pretrained(sys.argv[1])
print(sum(p.numel() for p in model.parameters()))
"""


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure(command: list[str]) -> dict:
    """Run ``command``; its peak RSS, wall time, and the sampled peak per output phase."""
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    samples: list[tuple[float, int]] = []
    lines: list[tuple[float, str]] = []
    done = threading.Event()

    def sample():
        while not done.is_set():
            samples.append((time.perf_counter() - started, _rss(child.pid)))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for line in child.stdout:
        lines.append((time.perf_counter() - started, line.rstrip("\n")))
        print("   ", line.rstrip("\n"), flush=True)
    _, status, usage = os.wait4(child.pid, 0)  # this child's own peak, not the generator's
    code = child.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    sampler.join()
    if code:
        raise SystemExit(f"{command[0]} failed with exit status {code}")
    wall = time.perf_counter() - started

    def peak(begin: float, end: float) -> int:
        return max((rss for t, rss in samples if begin <= t <= end), default=0)

    loaded = next(t for t, text in lines if text.startswith("loaded "))
    pruned = next(t for t, text in lines if " weights pruned in " in text)
    phases = {"load": peak(0, loaded), "prune": peak(loaded, pruned),
              "write": peak(pruned, wall)}
    return {"peak_rss": usage.ru_maxrss * 1024, "sampled_peak": peak(0, wall),
            "wall_seconds": wall, "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "phases": phases}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", required=True, help="where the generated model goes")
    parser.add_argument("--small", action="store_true", help="a small model (smoke run)")
    parser.add_argument("--methods", nargs="+", default=["sparsegpt"])
    parser.add_argument("--calibration", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    config = CONFIG_SMALL if args.small else CONFIG_1B
    python = sys.executable
    if not (folder / "config.json").is_file():
        print(f"generating {folder} ...", flush=True)
        subprocess.run([python, "-c", GENERATE, str(folder), json.dumps(config)], check=True)
    weights = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    text = folder.parent / f"{folder.name}-text.txt"
    if not text.is_file():
        from nmsparse.app.data.text import _source

        text.write_bytes(_source(None)[0])
    nmsparse = Path(python).with_name("nmsparse")
    rows = []
    for method in args.methods:
        out = folder.parent / f"{folder.name}-{method}"
        command = [str(nmsparse), "prune", str(folder), "--method", method, "--pattern", "2:4",
                   "--text-file", str(text), "--calibration", str(args.calibration),
                   "--calibration-batch-size", str(args.calibration), "--seq-len",
                   str(args.seq_len), "--out", str(out), "--threads", str(args.threads)]
        print(" ".join(command), flush=True)
        result = measure(command)
        rows.append({"method": method, **result})
    gib = 2 ** 30
    print(f"\nmodel: {json.dumps(config)}; weights {weights / gib:.2f} GiB (bf16 safetensors)")
    print("| method | weights (GiB) | peak RSS (GiB) | peak / weights | load | prune | write "
          "| wall (s) | CPU (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        phases = row["phases"]
        print(f"| {row['method']} | {weights / gib:.2f} | {row['peak_rss'] / gib:.2f} | "
              f"{row['peak_rss'] / weights:.2f} | "
              + " | ".join(f"{phases.get(k, 0) / gib:.2f}" for k in ("load", "prune", "write"))
              + f" | {row['wall_seconds']:.0f} | {row['cpu_seconds']:.0f} |")
    print(json.dumps({"weights": weights, "config": config, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
