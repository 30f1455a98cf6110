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
from pathlib import Path

import torch

from ..oneshot import PRUNERS


def add_prune_command(commands, parse_option) -> argparse.ArgumentParser:
    parser = commands.add_parser("prune", help="one-shot prune a trained run "
                                 "(magnitude, wanda, sparsegpt)")
    parser.add_argument("path", metavar="RUN_DIR|CHECKPOINT")
    parser.add_argument("--pruner", "--method", dest="method", default="sparsegpt",
                        choices=PRUNERS.names(), help="the one-shot pruner (--method is its "
                        "old name; the training method that holds the masks is --then)")
    parser.add_argument("--pattern", default="2:4",
                        help="N:M (keep N of every M) or unstructured:D (default 2:4)")
    parser.add_argument("--calibration", type=int, default=128, metavar="N",
                        help="training samples used as calibration data (default 128)")
    parser.add_argument("--calibration-batch-size", type=int, default=16, metavar="B")
    parser.add_argument("--then", default="fixed", help="method holding the masks in the "
                        "written run: fixed (default) or srste, or any registered method")
    parser.add_argument("--exclude", nargs="+", default=None, metavar="GLOB",
                        help="layers to keep dense, e.g. lm_head")
    parser.add_argument("--option", dest="options", action="append", default=[],
                        type=parse_option, metavar="KEY=VALUE",
                        help="pruning method setting, e.g. blocksize=64 or damp=0.1")
    parser.add_argument("--permute", action="store_true",
                        help="reorder input channels first (function unchanged) so that more "
                        "magnitude survives N:M (nmsparse.channels)")
    parser.add_argument("--out", required=True, help="folder to write the pruned run into")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0, help="which samples calibrate")
    parser.add_argument("--limit-test-batches", type=int, default=None)
    return parser


def calibration_batches(dataset, count: int, batch_size: int, seed: int) -> list:
    """``count`` inputs drawn without replacement with a fixed seed, in batches."""
    if count < 1 or batch_size < 1:
        raise ValueError(f"--calibration and --calibration-batch-size must be >= 1, got "
                         f"{count} and {batch_size}")
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
    from .. import finalize, prune
    from ..data.loader import make_loader
    from ..train import checkpoint, distributed
    from ..train.config import write_json
    from ..train.trainer import evaluate, load_trained

    out = Path(args.out)
    if (out / checkpoint.LATEST).exists():
        raise checkpoint.CheckpointError(f"{str(out)!r} already holds a run; choose another "
                                         "--out")
    device = distributed.pick_device(args.device)
    config, data, model, _ = load_trained(args.path, device, trusted_models=trusted_models)
    finalize(model)  # a sparse run's masks are baked in; pruning starts from its weights
    batches = calibration_batches(data.train, args.calibration, args.calibration_batch_size,
                                  args.seed)
    world = distributed.World(device=device)
    loader = make_loader(data.test, config.batch_size, shuffle=False, seed=config.seed)
    before = evaluate(model, loader, config, world, data.task, args.limit_test_batches)
    result = prune(model, args.pattern, args.method, calibration=batches, then=args.then,
                   exclude=args.exclude, layout=config.layout, permute=args.permute,
                   **dict(args.options))
    after = evaluate(model, loader, config, world, data.task, args.limit_test_batches)
    print(result)
    if result.permutation is not None:
        print(result.permutation)

    config.pattern, config.method, config.out = str(result.pattern), args.then, str(out)
    config.exclude = list(args.exclude or [])
    config.method_options = {}
    report = {
        "source": str(args.path), "method": result.pruner, "pattern": str(result.pattern),
        "then": args.then, "calibration_samples": sum(len(b) for b in batches),
        "calibration_rows": result.calibration_rows, "mode": result.mode,
        "seconds": result.seconds, "before": before, "after": after,
        "permutation": None if result.permutation is None else {
            "kept_before": result.permutation.kept_before,
            "kept_after": result.permutation.kept_after, "total": result.permutation.total,
            "groups": len(result.permutation.groups)},
        "layers": [{"name": layer.name, "shape": list(layer.shape),
                    "density": layer.density, "note": layer.reason}
                   for layer in result.layers],
    }
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.save(out / checkpoint.LATEST, {
        "config": config.to_dict(), "phase": 0, "epoch": 0, "step": 0,
        "model": model.state_dict(), "pruned": report})
    write_json(config, out / "config.json")
    (out / "prune.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    metric = "test_bpb" if "test_bpb" in after else "test_acc"
    print(f"\n{metric}: {before[metric]:.4f} dense -> {after[metric]:.4f} pruned; "
          f"written to {out} (recover with: nmsparse train --init {out})")
    return 0
