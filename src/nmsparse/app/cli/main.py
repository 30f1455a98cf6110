"""``nmsparse`` command line: thin commands over ``nmsparse.app.train`` and the core.

Bad input (a flag, a recipe key, a data file, a checkpoint, a run folder) ends with a one-line
error on stderr and exit status 2, without a traceback unless ``--debug`` is given (before or
after the command). No command imports code because a file names it: a run whose model is a
``module:factory`` is rebuilt only with ``--trust-model`` (see :mod:`nmsparse.app.models.trust`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from ... import __version__
from ...hf.folder import is_hf_folder
from ...methods import METHODS
from ..train.config import AMP_MODES, FIELDS, OPTIMIZERS
from . import _errors, _notes, llm
from ._errors import EXIT_BAD_INPUT
from .prune import add_prune_command, run_prune


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors on one line (exit status 2 as before)."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {_errors.one_line(message)} (see "
                                  f"{self.prog} --help)\n")


def _parse_option(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw  # a bare word is a string
    return key.replace("-", "_"), value


def _add_common(parser: argparse.ArgumentParser, *, trust: bool = True) -> None:
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks")
    if trust:
        parser.add_argument("--trust-model", action="append", default=[], metavar="MODULE:FN",
                            help="import this model factory when a run or recipe names it "
                            "(never done otherwise; repeatable)")


def _add_threads(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, metavar="N", help="CPU threads for PyTorch "
                        "(default: PyTorch's; 1 is often much faster on a busy machine)")


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
    sparse.add_argument("--method", choices=METHODS.names(), default=keep,
                        help="srste (default), ste, fixed, asp (dense train, one-shot "
                        "prune, fixed-mask retrain for the same budget), or any registered "
                        "method")
    sparse.add_argument("--method-option", dest="method_options", action="append",
                        default=keep, type=_parse_option, metavar="KEY=VALUE",
                        help="method hyperparameter, repeatable, e.g. decay=1e-3")
    sparse.add_argument("--decay", type=float, default=keep,
                        help="shorthand of --method-option decay=X, for methods that take a "
                        "refinement decay (SR-STE: 2e-4)")
    sparse.add_argument("--exclude", nargs="+", default=keep, metavar="GLOB",
                        help="layers to keep dense, e.g. fc 'layer1.*'")
    sparse.add_argument("--include", nargs="+", default=keep, metavar="GLOB",
                        help="only these layers are made sparse")
    sparse.add_argument("--layout", choices=("in", "flat"), default=keep,
                        help="grouping axis: in (hardware, default) or flat (the paper's)")
    sparse.add_argument("--chex-budget", type=float, default=keep, metavar="FRACTION",
                        help="CHEX channel exploration keeping this fraction of the prunable "
                        "channels (with --pattern dense); summary.json gets the exported "
                        "slim model's size")
    sparse.add_argument("--chex-every", type=int, default=keep,
                        help="steps between CHEX explorations (100)")
    sparse.add_argument("--chex-until", type=float, default=keep,
                        help="share of the training steps that CHEX explores (0.5)")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--optimizer", choices=OPTIMIZERS, default=keep,
                       help="sgd (default, with momentum) or adamw")
    optim.add_argument("--lr", type=float, default=keep, help="peak learning rate (0.1)")
    optim.add_argument("--momentum", type=float, default=keep,
                       help="SGD momentum (0.9); ignored by adamw")
    optim.add_argument("--weight-decay", type=float, default=keep,
                       help="weight decay (5e-5)")
    optim.add_argument("--warmup-epochs", type=float, default=keep,
                       help="linear warm-up before the cosine decay, in epochs (1)")
    optim.add_argument("--epochs", type=int, default=keep, help="epochs (per phase for asp)")
    optim.add_argument("--batch-size", type=int, default=keep, help="per-process batch size")
    optim.add_argument("--label-smoothing", type=float, default=keep,
                       help="label smoothing of the cross-entropy, in [0, 1) (0)")
    optim.add_argument("--grad-clip", type=float, default=keep, metavar="NORM",
                       help="clip the gradient norm to NORM (default: no clipping)")
    optim.add_argument("--amp", choices=AMP_MODES, default=keep,
                       help="mixed precision: none (default), bf16 or fp16 (for GPUs)")
    run = parser.add_argument_group("run")
    run.add_argument("--recipe", help="TOML or YAML file of settings; flags override it")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR (with "
                     "--data-dir / --text-file if its data moved)")
    run.add_argument("--init", default=keep, metavar="RUN_DIR|CHECKPOINT",
                     help="start from these weights and masks (a run, or 'nmsparse prune' "
                     "output); its model, data and sparsity settings are the defaults")
    run.add_argument("--out", default=keep, help="run folder (default runs/<name>-<time>)")
    run.add_argument("--seed", type=int, default=keep,
                     help="random seed of the model, data order and augmentation, from 0 to "
                     "2**63 - 1 (0)")
    run.add_argument("--device", default=keep, help="auto (CUDA if present), cpu, cuda[:N]")
    run.add_argument("--num-workers", type=int, default=keep,
                     help="data loader worker processes (0: load in the main process)")
    run.add_argument("--log-every", type=int, default=keep, help="steps between log records")
    run.add_argument("--limit-train-batches", type=int, default=keep, metavar="N",
                     help="train on at most N batches per epoch (quick checks)")
    run.add_argument("--limit-test-batches", type=int, default=keep, metavar="N",
                     help="evaluate on at most N test batches (quick checks)")
    run.add_argument("--tensorboard", action="store_true", default=keep,
                     help="also log to TensorBoard in the run folder (needs tensorboard)")
    run.add_argument("--no-plots", dest="plots", action="store_false", default=keep,
                     help="do not draw the loss and sparsity plots at the end")


TRAIN_EXAMPLES = """\
nmsparse train                                   # 2:4 SR-STE MLP on digits (~10 s)
nmsparse train --data cifar10 --data-dir ~/data --model resnet20 --pattern 1:4
nmsparse train --recipe recipe.toml --lr 0.05    # flags override the recipe file
nmsparse train --resume runs/RUN                 # continue after a crash
nmsparse train --init runs/PRUNED --method fixed --epochs 5   # recover a pruned run"""
EVAL_EXAMPLES = """\
nmsparse eval runs/RUN
nmsparse eval runs/RUN/best.pt --data-dir /new/place/of/the/data"""
SUMMARY_EXAMPLES = """\
nmsparse summary runs/RUN
nmsparse summary --model resnet20 --input-shape 3,32,32 --num-classes 10 --pattern 2:4"""
EXPORT_EXAMPLES = """\
nmsparse export runs/RUN --out exported/            # model.safetensors + model.json
nmsparse export runs/RUN --packed --out packed/     # model.packed.safetensors"""


def _examples(text: str) -> dict[str, Any]:
    """The keyword arguments giving a command an examples epilog, laid out as written."""
    return {"epilog": "examples:\n" + "\n".join("  " + line for line in text.splitlines()),
            "formatter_class": argparse.RawDescriptionHelpFormatter}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="nmsparse", description="N:M sparse training from scratch (SR-STE) and tools.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action="version", version=f"nmsparse {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = commands.add_parser("train", help="train a model with a sparsity recipe",
                                **_examples(TRAIN_EXAMPLES))
    _add_train_arguments(train)
    _add_common(train)
    _add_threads(train)
    evaluate = commands.add_parser("eval", help="re-evaluate a run on its test split",
                                   **_examples(EVAL_EXAMPLES))
    evaluate.add_argument("path", metavar="RUN_DIR|CHECKPOINT",
                          help="a run folder (its latest.pt) or a checkpoint file")
    where = evaluate.add_argument_group("where the run's data and model live now")
    where.add_argument("--data-dir", help="where the data set's files are now")
    where.add_argument("--text-file", help="where the text corpus is now (--data text); "
                       "for a Hugging Face model folder, the text to score")
    where.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, "
                       "cuda[:N]")
    llm.add_evaluation_arguments(evaluate)
    _add_common(evaluate)
    _add_threads(evaluate)
    summary = commands.add_parser("summary", help="per-layer sparsity, params and MACs",
                                  **_examples(SUMMARY_EXAMPLES))
    summary.add_argument("path", nargs="?", metavar="RUN_DIR|CHECKPOINT",
                         help="a run folder or checkpoint (or give --model instead)")
    fresh = summary.add_argument_group("a fresh model instead of a run")
    fresh.add_argument("--model", help="model name or package.module:factory")
    fresh.add_argument("--data", help="data set giving the input shape (default digits)")
    fresh.add_argument("--input-shape", metavar="D,D,...", help="input shape of one sample "
                       "instead of --data, e.g. 3,32,32")
    fresh.add_argument("--num-classes", type=int, help="classes, with --input-shape")
    fresh.add_argument("--data-dir", help="--data's files (or an old run's data: runs record "
                       "their input shape and need none)")
    fresh.add_argument("--pattern", default="dense", help="sparsify the fresh model with "
                       "this N:M pattern first (default dense)")
    fresh.add_argument("--exclude", nargs="+", default=None, metavar="GLOB",
                       help="layers kept dense with --pattern, e.g. fc")
    _add_common(summary)
    export = commands.add_parser("export", help="finalized model as safetensors + JSON",
                                 **_examples(EXPORT_EXAMPLES))
    export.add_argument("path", metavar="RUN_DIR|CHECKPOINT",
                        help="the trained run (a folder or checkpoint) to export")
    output = export.add_argument_group("output")
    output.add_argument("--out", required=True, help="folder to write the export into (new, "
                        "empty, or an earlier export)")
    output.add_argument("--packed", action="store_true", help="one packed N:M file "
                        "(model.packed.safetensors) instead of dense-with-zeros")
    export.add_argument("--data-dir", help="only for runs older than 0.1 that do not record "
                        "their input shape")
    _add_common(export)
    prune = add_prune_command(commands, _parse_option, _examples)
    llm.add_prune_arguments(prune)
    _add_common(prune)
    _add_threads(prune)
    generate = llm.add_generate_command(commands)
    _add_common(generate, trust=False)
    _add_threads(generate)
    _add_common(commands.add_parser("models", help="list the registered models",
                                    **_examples("nmsparse models")), trust=False)
    _add_common(commands.add_parser("datasets", help="list the data sets",
                                    **_examples("nmsparse datasets")), trust=False)
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


class _CurrentFolderPackages:
    """Finds, in the current folder, only the top-level packages of factories the user named
    on the command line (like ``python -m``, a factory may live there). Placed last on
    ``sys.meta_path``: an installed package wins, and no other module is ever looked up in
    the current folder, so a stray ``triton.py`` or ``yaml.py`` there never shadows an
    optional package that is not installed."""

    def __init__(self, folder: str) -> None:
        self.folder, self.names = folder, set()

    def find_spec(self, fullname, path=None, target=None):
        if path is not None or fullname not in self.names:
            return None
        from importlib.machinery import PathFinder

        return PathFinder.find_spec(fullname, [self.folder])


def _trust(args: argparse.Namespace, *given: str) -> list[str]:
    """The factories this command may import: --trust-model and names typed on the command
    line, whose top-level packages may also come from the current folder."""
    from ..models.trust import is_factory_name, split_name

    trusted = [*getattr(args, "trust_model", []), *[name for name in given if name]]
    tops = {split_name(name)[0].split(".")[0] for name in trusted if is_factory_name(name)}
    tops.discard("")
    if tops:
        finder = next((f for f in sys.meta_path if isinstance(f, _CurrentFolderPackages)
                       and f.folder == os.getcwd()), None)
        if finder is None:
            finder = _CurrentFolderPackages(os.getcwd())
            sys.meta_path.append(finder)
        finder.names |= tops
    return trusted


def _threads(args: argparse.Namespace) -> None:
    import torch

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)


def _train(args: argparse.Namespace) -> int:
    overrides = {name: getattr(args, name) for name in FIELDS if hasattr(args, name)}
    for options in ("model_options", "method_options"):
        if options in overrides:
            overrides[options] = dict(overrides[options])
    if "decay" in overrides:  # the shorthand of --method-option decay=
        from ..train.config import with_decay

        overrides["method_options"] = with_decay(overrides.get("method_options", {}),
                                                 overrides.pop("decay"), "--decay")
    if args.resume:  # these may change between sessions; the recipe may not
        extra = sorted(set(overrides) - {"device", "num_workers", "data_dir", "text_file"})
        if extra or args.recipe:
            given = ", ".join("--" + e.replace("_", "-") for e in extra) or "--recipe"
            raise ValueError("--resume continues a run with its saved configuration; do not "
                             f"also give {given} (only --data-dir, --text-file, --device, "
                             "--num-workers, --threads)")
    if os.environ.get("RANK", "0") == "0":  # start-up takes seconds: say something at once
        _say("nmsparse train: setting up (the data and the model) ...")
    _threads(args)
    from ..train import checkpoint, distributed
    from ..train.config import from_dict, resolve
    from ..train.trainer import Run, prepare_run_dir, save_config

    # Only the model typed here is trusted without --trust-model. Trust is decided on the
    # model of the final configuration (recipe, --init run and flags merged), so that a name
    # read from any file is checked (nmsparse.app.models.trust).
    trusted = _trust(args, overrides.get("model", ""))
    if args.resume:
        payload = checkpoint.load(args.resume)
        source = f"the run {args.resume!r}"
        config = from_dict({**payload["config"], **overrides, "out": args.resume},
                           source=source)
    else:
        inherited = {}
        if "init" in overrides:
            from ..train.init import inherited_settings

            inherited = inherited_settings(overrides["init"])
        payload, config = None, resolve(args.recipe, {**inherited, **overrides})
        if "model" in overrides:
            source = "the command line"
        elif "model" in inherited:
            source = f"the --init run {overrides['init']!r}"
        else:
            source = f"recipe {args.recipe!r}" if args.recipe else "the default configuration"
    if config.tensorboard:
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise ValueError("--tensorboard needs the tensorboard package: "
                             "pip install 'nmsparse[tensorboard]'")
    world = distributed.setup(config.device)
    folder = None
    try:
        if world.main:
            _notes.say(_notes.cpu_amp_note(world.device.type, config.amp))
        if config.out is None:
            config.out = _default_out(config, world)
        args.run_folder = config.out  # for the interruption message
        run = Run(config, world, console=_say if world.main else lambda message: None,
                  trusted_models=trusted, source=source, resuming=payload is not None)
        if world.main:
            folder = prepare_run_dir(config, resume=bool(args.resume))
            run.use_run_dir(folder.path)
            save_config(config, folder.path)
            _say(f"run folder: {folder.path}")
            if folder.removed_temp_files:
                _say(f"removed {len(folder.removed_temp_files)} temporary file(s) of an "
                     "interrupted write")
            _say(str(run.handle) if run.handle else "dense training (no sparsity)")
            _notes.say(_notes.busy_machine_note(args.threads is not None))
        if payload is not None:
            run.restore(payload, source)
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
        if folder is not None:
            folder.release()
        run = None  # DDP's reducer holds the process group: free it before the group goes
        distributed.teardown(world)
    return 0


def _eval(args: argparse.Namespace) -> int:
    _threads(args)
    if is_hf_folder(args.path):
        return llm.run_hf_eval(args)
    llm.refuse_model_folder_flags(args)
    from ..data.loader import make_loader
    from ..train import distributed
    from ..train.trainer import evaluate, load_trained

    device = distributed.pick_device(args.device)
    config, data, model, _ = load_trained(args.path, device, data_dir=args.data_dir,
                                          text_file=args.text_file,
                                          trusted_models=_trust(args))
    loader = make_loader(data.test, config.batch_size, shuffle=False, seed=config.seed)
    result = evaluate(model, loader, config, distributed.World(device=device), data.task)
    print(json.dumps({"path": str(args.path), **result}))
    return 0


def _prune(args: argparse.Namespace) -> int:
    _threads(args)
    if is_hf_folder(args.path):
        return llm.run_hf_prune(args)
    llm.refuse_model_folder_flags(args)
    return run_prune(args, trusted_models=_trust(args))


def _generate(args: argparse.Namespace) -> int:
    _threads(args)
    return llm.run_generate(args)


def _shape(text: str) -> tuple[int, ...]:
    parts = [part.strip() for part in text.replace("x", ",").split(",")]
    shape = tuple(int(part) for part in parts if part.isdigit())
    if not shape or len(shape) != len(parts) or min(shape) < 1:
        raise ValueError(f"--input-shape: expected positive integers like 3,32,32, got {text!r}")
    return shape


def _summary(args: argparse.Namespace) -> int:
    from ... import sparsify, summary
    from ..train.config import TrainConfig
    from ..train.trainer import DataInfo, build_model, load_trained

    if args.path and args.model:
        raise ValueError("give either a RUN_DIR|CHECKPOINT or --model, not both")
    if args.path:
        if args.data or args.input_shape or args.num_classes:
            raise ValueError("a run records its data: --data, --input-shape and --num-classes "
                             "are only for --model")
        _, info, model, payload = load_trained(args.path, data_dir=args.data_dir,
                                               trusted_models=_trust(args), with_data=False)
        if args.data_dir and isinstance(info, DataInfo):
            _notes.say("note: --data-dir not needed: the run records its input shape and "
                       "classes")
        example = info.example() if isinstance(info, DataInfo) else info.test[0][0][None]
    elif args.model:
        if args.input_shape:
            if args.data or args.data_dir:
                raise ValueError("give --input-shape or --data, not both")
            if args.num_classes is None or args.num_classes < 1:
                raise ValueError("--input-shape needs --num-classes K (K >= 1)")
            info = DataInfo(_shape(args.input_shape), args.num_classes, "classification")
        else:
            if args.num_classes is not None:
                raise ValueError("--num-classes goes with --input-shape; --data gives both")
            from ..data import load_dataset

            data = load_dataset(args.data or "digits", data_dir=args.data_dir)
            info = DataInfo.of(data)
        config = TrainConfig(model=args.model)
        model = build_model(config, info, _trust(args, args.model))
        if args.pattern != "dense":
            print(sparsify(model, args.pattern, "fixed", exclude=args.exclude), end="\n\n")
        example = info.example()
    else:
        raise ValueError("give a RUN_DIR|CHECKPOINT, or --model NAME [--data NAME | "
                         "--input-shape D,D,.. --num-classes K]")
    print(summary(model, example))
    return 0


def _export(args: argparse.Namespace) -> int:
    from ..train.export import export_run, export_run_packed

    options = {"trusted_models": _trust(args), "data_dir": args.data_dir}
    if args.packed:
        written, report = export_run_packed(args.path, args.out, **options)
        print(report)
        if report.packed_bytes >= report.dense_bytes:
            _notes.say(f"note: packed is not smaller than dense here ({report.packed_bytes:,} "
                       f"vs {report.dense_bytes:,} bytes): the stored positions outweigh the "
                       "pruned values at this density; the dense export is the smaller file")
    else:
        written = export_run(args.path, args.out, **options)
    for path in written:
        print(path)
    return 0


def _models(_: argparse.Namespace) -> int:
    from ...tables import format_table
    from ..models import list_models

    rows = [(name, ", ".join(info.tasks), info.description)
            for name, info in list_models().items()]
    print(format_table(("model", "tasks", "description"), rows))
    return 0


def _datasets(_: argparse.Namespace) -> int:
    from ..data import list_datasets

    for name, description in list_datasets().items():
        print(f"{name:14s} {description}")
    return 0


COMMANDS = {"train": _train, "eval": _eval, "summary": _summary, "export": _export,
            "prune": _prune, "generate": _generate, "models": _models, "datasets": _datasets}


def _interrupted(args: argparse.Namespace, why: str) -> str:
    folder = getattr(args, "run_folder", None)
    if args.command != "train" or folder is None:
        return why
    if (Path(folder) / "latest.pt").is_file():
        return (f"{why}; continue from the last checkpoint with: nmsparse train --resume "
                f"{folder}")
    return f"{why} before the first checkpoint; nothing to resume (start the run again)"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = _errors.catch_sigterm()
    try:
        return COMMANDS[args.command](args)
    except _errors.EXPECTED as error:
        if args.debug:
            raise
        _errors.report(args.command, f"error: {_errors.describe(error)}")
        return EXIT_BAD_INPUT
    except (RuntimeError, MemoryError) as error:
        message = _errors.out_of_memory(error)
        if args.debug or message is None:
            raise
        _errors.report(args.command, f"error: {message}")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        _errors.report(args.command, _interrupted(args, "interrupted"))
        return _errors.EXIT_INTERRUPTED
    except _errors.Terminated:
        _errors.report(args.command, _interrupted(args, "terminated (SIGTERM)"))
        return _errors.EXIT_TERMINATED
    finally:
        _errors.restore_sigterm(previous)


if __name__ == "__main__":
    sys.exit(main())
