"""``nmsparse`` command line: thin commands over ``nmsparse.train`` and the core.

Bad input (a flag, a recipe key, a data file, a checkpoint) ends with a one-line error on
stderr and exit status 2, without a traceback unless ``--debug`` is given.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ..train.config import AMP_MODES, FIELDS, OPTIMIZERS, TRAIN_METHODS

EXIT_BAD_INPUT = 2


def _parse_option(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw  # a bare word is a string
    return key.replace("-", "_"), value


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    # Defaults are suppressed: only flags the user typed override the recipe file.
    keep = argparse.SUPPRESS
    what = parser.add_argument_group("what to train")
    what.add_argument("--model", default=keep, help="model name (see 'nmsparse models') or "
                      "package.module:factory (default mlp)")
    what.add_argument("--model-option", dest="model_options", action="append", default=keep,
                      type=_parse_option, metavar="KEY=VALUE",
                      help="model option, repeatable, e.g. width=0.5 or hidden=[512,512]")
    what.add_argument("--data", default=keep, help="data set (see 'nmsparse datasets'; "
                      "default digits)")
    what.add_argument("--data-dir", default=keep, help="where the data set's files are")
    what.add_argument("--text-file", default=keep, help="text corpus (file or folder) for "
                      "--data text")
    what.add_argument("--seq-len", type=int, default=keep, help="sequence length (text)")
    sparse = parser.add_argument_group("sparsity")
    sparse.add_argument("--pattern", default=keep, help="N:M (keep N of every M), or dense "
                        "(default 2:4)")
    sparse.add_argument("--method", choices=TRAIN_METHODS, default=keep,
                        help="srste (default), ste, fixed, or asp (dense train, one-shot "
                        "prune, fixed-mask retrain for the same budget)")
    sparse.add_argument("--decay", type=float, default=keep, help="SR-STE decay (2e-4)")
    sparse.add_argument("--exclude", nargs="+", default=keep, metavar="GLOB",
                        help="layers to keep dense, e.g. fc 'layer1.*'")
    sparse.add_argument("--include", nargs="+", default=keep, metavar="GLOB",
                        help="only these layers are made sparse")
    sparse.add_argument("--layout", choices=("in", "flat"), default=keep,
                        help="grouping axis: in (hardware, default) or flat (the paper's)")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--optimizer", choices=OPTIMIZERS, default=keep)
    optim.add_argument("--lr", type=float, default=keep, help="peak learning rate (0.1)")
    optim.add_argument("--momentum", type=float, default=keep)
    optim.add_argument("--weight-decay", type=float, default=keep)
    optim.add_argument("--warmup-epochs", type=float, default=keep)
    optim.add_argument("--epochs", type=int, default=keep, help="epochs (per phase for asp)")
    optim.add_argument("--batch-size", type=int, default=keep, help="per-process batch size")
    optim.add_argument("--label-smoothing", type=float, default=keep)
    optim.add_argument("--grad-clip", type=float, default=keep)
    optim.add_argument("--amp", choices=AMP_MODES, default=keep)
    run = parser.add_argument_group("run")
    run.add_argument("--recipe", help="TOML or YAML file of settings; flags override it")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR")
    run.add_argument("--out", default=keep, help="run folder (default runs/<name>-<time>)")
    run.add_argument("--seed", type=int, default=keep)
    run.add_argument("--device", default=keep, help="auto (CUDA if present), cpu, cuda[:N]")
    run.add_argument("--num-workers", type=int, default=keep)
    run.add_argument("--log-every", type=int, default=keep, help="steps between log records")
    run.add_argument("--limit-train-batches", type=int, default=keep)
    run.add_argument("--limit-test-batches", type=int, default=keep)
    run.add_argument("--tensorboard", action="store_true", default=keep)
    run.add_argument("--no-plots", dest="plots", action="store_false", default=keep)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nmsparse", description="N:M sparse training from scratch (SR-STE) and tools.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = commands.add_parser("train", help="train a model with a sparsity recipe")
    _add_train_arguments(train)
    evaluate = commands.add_parser("eval", help="re-evaluate a run on its test split")
    evaluate.add_argument("path", metavar="RUN_DIR|CHECKPOINT")
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--data-dir", help="where the data set's files are now")
    summary = commands.add_parser("summary", help="per-layer sparsity, params and MACs")
    summary.add_argument("path", nargs="?", metavar="RUN_DIR|CHECKPOINT")
    summary.add_argument("--model", help="summarise a fresh model instead of a run")
    summary.add_argument("--data", default="digits", help="data set giving the input shape")
    summary.add_argument("--data-dir")
    summary.add_argument("--pattern", default="dense")
    summary.add_argument("--exclude", nargs="+", default=None, metavar="GLOB")
    export = commands.add_parser("export", help="finalized model as safetensors + JSON")
    export.add_argument("path", metavar="RUN_DIR|CHECKPOINT")
    export.add_argument("--out", required=True, help="folder to write the export into")
    export.add_argument("--packed", action="store_true", help="one packed N:M file "
                        "(model.packed.safetensors) instead of dense-with-zeros")
    commands.add_parser("bench", help="moved: the GPU kernel benchmark runs from a source "
                        "checkout, python -m benchmarks.kernels", add_help=False,
                        prefix_chars="\0")
    commands.add_parser("models", help="list the registered models")
    commands.add_parser("datasets", help="list the data sets")
    return parser


def _say(message: str) -> None:
    print(message, flush=True)


def _default_out(config, world) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if world.distributed:  # every rank must agree on the folder
        import torch.distributed as dist

        holder = [stamp]
        dist.broadcast_object_list(holder, src=0)
        stamp = holder[0]
    name = "dense" if config.dense else f"{config.pattern.replace(':', 'of')}-{config.method}"
    return str(Path("runs") / f"{config.data}-{config.model.replace(':', '.')}-{name}-{stamp}")


def _train(args: argparse.Namespace) -> int:
    from ..train import checkpoint, distributed
    from ..train.config import from_dict, resolve
    from ..train.trainer import Run, prepare_run_dir, save_config

    overrides = {name: getattr(args, name) for name in FIELDS if hasattr(args, name)}
    if "model_options" in overrides:
        overrides["model_options"] = dict(overrides["model_options"])
    if args.resume:
        extra = sorted(set(overrides) - {"device", "num_workers"})
        if extra or args.recipe:
            given = ", ".join("--" + e.replace("_", "-") for e in extra) or "--recipe"
            raise ValueError("--resume continues a run with its saved configuration; do not "
                             f"also give {given}")
        payload = checkpoint.load(args.resume)
        config = from_dict({**payload["config"], **overrides, "out": args.resume}).validate()
    else:
        config = resolve(args.recipe, overrides)
    world = distributed.setup(config.device)
    try:
        if config.out is None:
            config.out = _default_out(config, world)
        run = Run(config, world, console=_say if world.main else lambda message: None)
        if world.main:
            run_dir = prepare_run_dir(config, resume=bool(args.resume))
            run.use_run_dir(run_dir)
            save_config(config, run_dir)
            _say(f"run folder: {run_dir}")
            _say(str(run.handle) if run.handle else "dense training (no sparsity)")
        if args.resume:
            run.restore(payload)
            _say(f"resumed at epoch {run.epoch}, step {run.step}")
        result = run.fit()
        if world.main:
            _say("")
            _say(str(run.summary_table))
            metric = (f"test bits/byte {result['test_bpb']:.4f}" if "test_bpb" in result
                      else f"test accuracy {result['test_acc']:.4f}")
            _say(f"\nfinal {metric}  ({result['wall_seconds']:.1f} s training)  "
                 f"results in {config.out}")
    finally:
        distributed.teardown(world)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from ..data.loader import make_loader
    from ..train import distributed
    from ..train.trainer import evaluate, load_trained

    device = distributed.pick_device(args.device)
    config, data, model, _ = load_trained(args.path, device, data_dir=args.data_dir)
    loader = make_loader(data.test, config.batch_size, shuffle=False, seed=config.seed)
    result = evaluate(model, loader, config, distributed.World(device=device), data.task)
    print(json.dumps({"path": str(args.path), **result}))
    return 0


def _summary(args: argparse.Namespace) -> int:
    from .. import sparsify, summary
    from ..data import load_dataset
    from ..models import create_model
    from ..train.trainer import load_trained

    if args.path and args.model:
        raise ValueError("give either a RUN_DIR|CHECKPOINT or --model, not both")
    if args.path:
        _, data, model, _ = load_trained(args.path)
    elif args.model:
        data = load_dataset(args.data, data_dir=args.data_dir)
        model = create_model(args.model, input_shape=data.input_shape,
                             num_classes=data.num_classes, task=data.task)
        if args.pattern != "dense":
            print(sparsify(model, args.pattern, "fixed", exclude=args.exclude), end="\n\n")
    else:
        raise ValueError("give a RUN_DIR|CHECKPOINT, or --model NAME [--data NAME]")
    print(summary(model, data.test[0][0].unsqueeze(0)))
    return 0


def _export(args: argparse.Namespace) -> int:
    from ..train.export import export_run, export_run_packed

    if args.packed:
        written, report = export_run_packed(args.path, Path(args.out))
        print(report)
    else:
        written = export_run(args.path, Path(args.out))
    for path in written:
        print(path)
    return 0


BENCH_MOVED = ("nmsparse bench: the GPU kernel benchmark is not installed with nmsparse; from a "
               "source checkout run `python -m benchmarks.kernels` (same options) or "
               "`make gpu-check OUT=DIR` (docs/gpu.md)")


def _bench(args: argparse.Namespace) -> int:
    # The benchmark lives in benchmarks/ (a study, not library code); the command stays as a
    # pointer so that scripts and habits calling it get told where it went.
    print(BENCH_MOVED, file=sys.stderr)
    return 2


def _models(_: argparse.Namespace) -> int:
    from ..models import list_models

    for name, info in list_models().items():
        print(f"{name:12s} {', '.join(info.tasks):30s} {info.description}")
    return 0


def _datasets(_: argparse.Namespace) -> int:
    from ..data import list_datasets

    for name, description in list_datasets().items():
        print(f"{name:14s} {description}")
    return 0


COMMANDS = {"train": _train, "eval": _eval, "summary": _summary, "export": _export,
            "bench": _bench, "models": _models, "datasets": _datasets}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":  # the benchmark parses its own options
        args.bench_args = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return COMMANDS[args.command](args)
    except (ValueError, OSError) as error:
        if args.debug:
            raise
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"nmsparse {args.command}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("nmsparse: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
