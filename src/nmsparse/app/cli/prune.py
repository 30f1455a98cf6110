"""``nmsparse prune RUN``: one-shot pruning of a trained run (magnitude, Wanda, SparseGPT).

Reads the run's model (masks of a sparse run are baked in first), draws ``--calibration``
training samples with a fixed seed, prunes, evaluates on the test split before and after, and
writes ``--out``: ``latest.pt`` (a checkpoint that ``nmsparse eval``, ``export``, ``summary``
and ``nmsparse train --init`` read; the masks are held by the ``--then`` method),
``config.json`` and ``prune.json`` (what was done, per layer, and the test metrics). Nothing
is written if anything fails before the end.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ...oneshot import PRUNERS

PRUNE_EXAMPLES = """\
nmsparse prune runs/DENSE --out runs/pruned                 # SparseGPT 2:4, 128 samples
nmsparse prune runs/DENSE --method wanda --pattern 4:8 --out runs/wanda
nmsparse prune runs/DENSE --method magnitude --permute --out runs/permuted
nmsparse train --init runs/pruned --method fixed --epochs 5  # then recover by training
nmsparse prune llm/ --pruner sparsegpt --text-file corpus.txt --out llm-2of4  # HF folder"""


def add_prune_command(commands, parse_option, examples) -> argparse.ArgumentParser:
    parser = commands.add_parser("prune", help="one-shot prune a trained run "
                                 f"({', '.join(PRUNERS.names())}), or a Hugging Face model folder",
                                 **examples(PRUNE_EXAMPLES))
    parser.add_argument("path", metavar="RUN_DIR|CHECKPOINT|HF_DIR",
                        help="the trained run (a folder or checkpoint), or a Hugging Face "
                        "causal LM folder (config.json + safetensors), to prune")
    how = parser.add_argument_group("how to prune")
    how.add_argument("--pruner", "--method", dest="method", default="sparsegpt",
                     choices=PRUNERS.names(), help="the one-shot pruner (default sparsegpt; "
                     "--method is its old name; the training method that holds the masks is "
                     "--then)")
    how.add_argument("--pattern", default="2:4",
                     help="N:M (keep N of every M) or unstructured:D (default 2:4)")
    how.add_argument("--exclude", nargs="+", default=None, metavar="GLOB",
                     help="layers to keep dense, e.g. lm_head")
    how.add_argument("--option", dest="options", action="append", default=[],
                     type=parse_option, metavar="KEY=VALUE",
                     help="pruning method setting, e.g. blocksize=64 or damp=0.1")
    how.add_argument("--permute", action="store_true",
                     help="reorder input channels first (function unchanged) so that more "
                     "magnitude survives N:M (nmsparse.channels)")
    how.add_argument("--then", default="fixed", help="method holding the masks in the "
                     "written run: fixed (default) or srste, or any registered method")
    data = parser.add_argument_group("calibration and evaluation")
    data.add_argument("--calibration", type=int, default=128, metavar="N",
                      help="training samples used as calibration data (default 128)")
    data.add_argument("--calibration-batch-size", type=int, default=16, metavar="B",
                      help="samples per calibration batch (default 16)")
    data.add_argument("--seed", type=int, default=0, help="which samples calibrate (0)")
    data.add_argument("--limit-test-batches", type=int, default=None, metavar="N",
                      help="evaluate before and after on at most N test batches")
    data.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, "
                      "cuda[:N]")
    output = parser.add_argument_group("output")
    output.add_argument("--out", required=True, help="run folder to write the pruned run into "
                        "(new, empty or an nmsparse run folder holding no run)")
    return parser


def calibration_batches(dataset, count: int, batch_size: int, seed: int) -> list:
    """``count`` inputs drawn without replacement with a fixed seed, in batches."""
    if count < 1 or batch_size < 1:
        raise ValueError(f"--calibration and --calibration-batch-size must be >= 1, got "
                         f"{count} and {batch_size}")
    from ..train.config import check_seed

    check_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randperm(len(dataset), generator=generator)[:count]
    batches = []
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        if hasattr(dataset, "get_batch"):
            inputs = dataset.get_batch(chunk, generator=generator)[0]
        else:
            inputs = torch.stack([dataset[int(i)][0] for i in chunk])
        batches.append(inputs)
    return batches


def run_prune(args: argparse.Namespace, trusted_models=()) -> int:
    from ... import finalize, prune
    from ...atomic import write_files
    from ..data.loader import make_loader
    from ..train import checkpoint, distributed, run_dir
    from ..train.config import config_json
    from ..train.trainer import evaluate, load_trained

    started = time.perf_counter()

    def say(what: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {what}", flush=True)

    # The same gate as train and export: a new, empty or nmsparse run folder holding no run,
    # no links, held by this process only (run_dir.claim); claimed first, so a concurrent
    # prune into the same folder is refused before minutes of work.
    folder = run_dir.claim(args.out, "run")
    try:
        device = distributed.pick_device(args.device)
        config, data, model, _ = load_trained(args.path, device, trusted_models=trusted_models)
        finalize(model)  # a sparse run's masks are baked in; pruning starts from its weights
        batches = calibration_batches(data.train, args.calibration,
                                      args.calibration_batch_size, args.seed)
        world = distributed.World(device=device)
        loader = make_loader(data.test, config.batch_size, shuffle=False, seed=config.seed)
        say("evaluating the model before pruning on the test split ...")
        before = evaluate(model, loader, config, world, data.task, args.limit_test_batches)
        say(f"pruning with {args.method} to {args.pattern} "
            f"({sum(len(b) for b in batches)} calibration samples) ...")
        result = prune(model, args.pattern, args.method, calibration=batches, then=args.then,
                       exclude=args.exclude, layout=config.layout, permute=args.permute,
                       progress=lambda done, total, unit: say(f"pruned {unit} {done}/{total}"),
                       **dict(args.options))
        say("evaluating the pruned model on the test split ...")
        after = evaluate(model, loader, config, world, data.task, args.limit_test_batches)
        say("done")
        print(result)
        if result.permutation is not None:
            print(result.permutation)

        config.pattern, config.method, config.out = (str(result.pattern), args.then,
                                                     str(folder.path))
        config.exclude = list(args.exclude or [])
        config.method_options = {}
        report = {
            "source": str(args.path), "method": result.pruner, "pattern": str(result.pattern),
            "then": args.then, "calibration_samples": sum(len(b) for b in batches),
            "calibration_rows": result.calibration_rows, "mode": result.mode,
            "seconds": result.seconds, "before": before, "after": after,
            "permutation": None if result.permutation is None else {
                "kept_before": result.permutation.kept_before,
                "kept_after": result.permutation.kept_after,
                "total": result.permutation.total,
                "groups": len(result.permutation.groups)},
            "layers": [{"name": layer.name, "shape": list(layer.shape),
                        "density": layer.density, "note": layer.reason}
                       for layer in result.layers],
        }
        # all or nothing, latest.pt last: a folder with a checkpoint always has the rest
        write_files(folder.path, {
            "config.json": config_json(config),
            "prune.json": (json.dumps(report, indent=2) + "\n").encode("utf-8"),
            checkpoint.LATEST: checkpoint.to_bytes({
                "config": config.to_dict(), "phase": 0, "epoch": 0, "step": 0,
                "model": model.state_dict(), "pruned": report})})
    except BaseException:
        folder.abandon()
        raise
    folder.release()
    out = folder.path
    metric = "test_bpb" if "test_bpb" in after else "test_acc"
    print(f"\n{metric}: {before[metric]:.4f} dense -> {after[metric]:.4f} pruned; "
          f"written to {out} (recover with: nmsparse train --init {out})")
    return 0
