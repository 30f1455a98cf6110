"""The command line for Hugging Face causal LM folders: ``prune``, ``eval`` and ``generate``.

``nmsparse prune DIR`` and ``nmsparse eval DIR`` take this road when ``DIR`` is a Hugging Face
model folder (its ``config.json`` names a ``model_type``; :mod:`nmsparse.hf.folder`) and the
run-folder road otherwise. ``generate`` is for model folders only.

* ``prune DIR --out PRUNED``: calibration text from ``--text-file`` (``--calibration N``
  windows of ``--seq-len`` tokens from its first 90 %, seed ``--seed``), pruned block by block
  with one progress line per block, ``--eval-text FILE`` evaluated before and after (the last
  10 % of it, or all of it with ``--all-text``), written as :func:`nmsparse.hf.folder.
  write_pruned` writes (``--packed`` adds the packed file). The head (``lm_head``) stays
  dense unless ``--exclude`` names what to keep dense instead.
* ``eval DIR --text-file FILE``: perplexity and bits per byte (:mod:`nmsparse.hf.perplexity`)
  as one JSON line.
* ``generate DIR --prompt TEXT``: greedy decoding on the N:M kernels
  (:func:`nmsparse.load_pretrained`), the text and tokens/s; ``--compare-dense`` also decodes
  with the plain dense model read from the same folder.

Every input is checked before anything is written; a failure leaves no output folder.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from ...hf.folder import DTYPES

DEFAULT_SEQ_LEN = 512
HF_ONLY = ("text_file", "seq_len", "dtype", "packed", "eval_text", "window", "stride",
           "all_text")


def add_evaluation_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Hugging Face model folders: evaluation")
    group.add_argument("--window", type=int, default=None, metavar="W", help="tokens per "
                       f"evaluation window (default {DEFAULT_SEQ_LEN}, at most the model's "
                       "context)")
    group.add_argument("--stride", type=int, default=None, metavar="S", help="tokens between "
                       "window starts (default: the window, disjoint windows)")
    group.add_argument("--all-text", action="store_true", default=None,
                       help="evaluate all of the text, not only its last 10 %% (held out)")
    group.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                       help="load the weights in this dtype (default auto: the folder's)")


def add_prune_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags ``prune`` takes for a Hugging Face folder (beside the run-folder ones)."""
    group = parser.add_argument_group("Hugging Face model folders")
    group.add_argument("--text-file", default=None, metavar="FILE|DIR", help="calibration "
                       "text (the first 90 %% is used), as for train --data text")
    group.add_argument("--seq-len", type=int, default=None, metavar="L", help="tokens per "
                       f"calibration sequence (default {DEFAULT_SEQ_LEN}, at most the model's "
                       "context)")
    group.add_argument("--eval-text", default=None, metavar="FILE|DIR", help="print "
                       "perplexity on this text before and after pruning")
    group.add_argument("--packed", action="store_true", default=None,
                       help="also write model.packed.safetensors")
    add_evaluation_arguments(parser)


def refuse_model_folder_flags(args: argparse.Namespace, what: str = "a run folder") -> None:
    given = [name for name in HF_ONLY if getattr(args, name, None) is not None
             and not (name == "text_file" and args.command == "eval")]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise ValueError(f"{flags}: only for Hugging Face model folders; {args.path!r} is "
                         f"{what}")


def _context(config: Any) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _length(given: int | None, config: Any, flag: str) -> int:
    context = _context(config)
    if given is None:
        return min(DEFAULT_SEQ_LEN, context or DEFAULT_SEQ_LEN)
    if given < 2:
        raise ValueError(f"{flag} must be >= 2, got {given}")
    if context is not None and given > context:
        raise ValueError(f"{flag} {given} is longer than the model's context ({context} "
                         "tokens)")
    return given


def _eval_ids(path: str, tokenizer, all_text: bool, window: int, stride: int):
    from ...hf.perplexity import window_starts
    from . import llm_text as text

    corpus = text.read_text(path)
    held_out = corpus if all_text else text.split(corpus)[1]
    ids = tokenizer.encode(held_out)
    try:
        window_starts(len(ids), window, stride)
    except ValueError as error:
        part = "" if all_text else " (its last 10 %, held out; --all-text reads all of it)"
        raise ValueError(f"{path}{part}: {error}") from None
    return ids


def _evaluate(model, ids, tokenizer, window: int, stride: int):
    from ...hf.perplexity import perplexity

    return perplexity(model, ids, window, stride, byte_count=tokenizer.byte_count)


class _BlockLines:
    """One line per pruned block with the elapsed time (a live bar on a terminal)."""

    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty()
        self.started = time.perf_counter()

    def __call__(self, done: int, total: int, unit: str) -> None:
        seconds = time.perf_counter() - self.started
        if self.live:
            bar = "#" * (20 * done // total) + "." * (20 - 20 * done // total)
            self.stream.write(f"\rpruning [{bar}] {unit} {done}/{total}, {seconds:.1f} s")
            if done == total:
                self.stream.write("\n")
        else:
            self.stream.write(f"pruned {unit} {done}/{total}, {seconds:.1f} s elapsed\n")
        self.stream.flush()


def _quiet_transformers() -> None:
    """No tqdm bars from transformers' loading and saving: this command prints its own."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def run_hf_prune(args: argparse.Namespace) -> int:
    from ... import prune
    from ...hf import folder as folders
    from ...oneshot import PRUNERS
    from ...patterns import parse_pattern
    from ..train import distributed
    from ..train import run_dir as run_folders
    from . import llm_text as text

    source = args.path
    if args.then != "fixed" or args.limit_test_batches is not None:
        raise ValueError("--then and --limit-test-batches are for run folders; a pruned "
                         "model folder holds the finalized weights and masks.safetensors")
    config = folders.check_folder(source)
    _quiet_transformers()
    pattern = parse_pattern(args.pattern)
    pruner = PRUNERS.get(args.method)
    needs_text = pruner.statistic is not None or args.permute
    if needs_text and args.text_file is None:
        raise ValueError(f"{args.method}{' with --permute' if args.permute else ''} needs "
                         "calibration text: give --text-file FILE")
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(source, local_files_only=True,
                                           trust_remote_code=False)
    tokenizer = text.load_tokenizer(source, int(getattr(hf_config, "vocab_size", 0) or 0))
    seq_len = _length(args.seq_len, hf_config, "--seq-len")
    window = _length(args.window, hf_config, "--window")
    stride = window if args.stride is None else args.stride
    batches = []
    if args.text_file is not None:
        calibration_text = text.split(text.read_text(args.text_file))[0]
        batches = text.calibration_batches(tokenizer.encode(calibration_text),
                                           args.calibration, seq_len,
                                           args.calibration_batch_size, args.seed)
    eval_ids = (None if args.eval_text is None else
                _eval_ids(args.eval_text, tokenizer, bool(args.all_text), window, stride))
    device = distributed.pick_device(args.device)
    claimed = run_folders.claim(args.out, "export")
    try:
        started = time.perf_counter()
        model = folders.load_causal_lm(source, args.dtype or "auto", device)
        print(f"loaded {source}: {config['model_type']}, "
              f"{sum(p.numel() for p in model.parameters()):,} parameters, "
              f"{str(next(model.parameters()).dtype).removeprefix('torch.')}, tokenizer "
              f"{tokenizer.name} ({time.perf_counter() - started:.1f} s)", flush=True)
        before = after = None
        if eval_ids is not None:
            before = _evaluate(model, eval_ids, tokenizer, window, stride)
            print(f"dense:  {before}", flush=True)
        head = folders.output_head(model)
        exclude = args.exclude if args.exclude is not None else ([head] if head else None)
        result = prune(model, pattern, args.method, calibration=batches or None, then=None,
                       exclude=exclude, permute=args.permute, progress=_BlockLines(),
                       **dict(args.options))
        print(result)
        if result.permutation is not None:
            print(result.permutation)
        if eval_ids is not None:
            after = _evaluate(model, eval_ids, tokenizer, window, stride)
            print(f"pruned: {after}", flush=True)
        report = _report(args, result, tokenizer, seq_len, exclude, before, after, model)
        packed = None
        if args.packed:
            from ...export.packed import save_packed

            def packed(target: Path):
                written = save_packed(model, target, pattern, exclude=exclude,
                                      metadata={"source": str(source)})
                written.path = str(Path(args.out) / target.name)  # where it will be
                print(written)
        written = folders.write_pruned(model, claimed.path, source=source, masks=result.masks,
                                       report=report, packed=packed,
                                       release_masks=result.masks.clear)
    except BaseException:
        claimed.abandon()
        raise
    claimed.release()
    print(f"written to {args.out}: {', '.join(sorted(p.name for p in written))}")
    return 0


def _report(args, result, tokenizer, seq_len, exclude, before, after, model) -> dict:
    return {
        "source": str(args.path), "method": result.pruner, "pattern": str(result.pattern),
        "options": dict(args.options), "permute": bool(args.permute),
        "exclude": list(exclude or []), "tokenizer": tokenizer.name,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "calibration": {"text": args.text_file, "sequences": args.calibration,
                        "seq_len": seq_len, "seed": args.seed,
                        "rows": result.calibration_rows},
        "mode": result.mode, "seconds": result.seconds,
        "peak_cached_bytes": result.peak_cached_bytes,
        "eval_text": args.eval_text,
        "before": None if before is None else before.as_dict(),
        "after": None if after is None else after.as_dict(),
        "layers": [{"name": layer.name, "shape": list(layer.shape), "density": layer.density,
                    "note": layer.reason} for layer in result.layers],
    }


def run_hf_eval(args: argparse.Namespace) -> int:
    import json

    from ...hf import folder as folders
    from ..train import distributed
    from . import llm_text as text

    if args.data_dir is not None:
        raise ValueError("--data-dir is for run folders; give the text with --text-file")
    if args.text_file is None:
        raise ValueError("evaluating a model folder needs --text-file FILE (its last 10 % is "
                         "scored; --all-text scores all of it)")
    folders.check_folder(args.path)
    _quiet_transformers()
    model = folders.load_causal_lm(args.path, args.dtype or "auto",
                                   distributed.pick_device(args.device))
    tokenizer = text.load_tokenizer(args.path, int(getattr(model.config, "vocab_size", 0)))
    window = _length(args.window, model.config, "--window")
    stride = window if args.stride is None else args.stride
    ids = _eval_ids(args.text_file, tokenizer, bool(args.all_text), window, stride)
    result = _evaluate(model, ids, tokenizer, window, stride)
    print(json.dumps({"path": str(args.path), "text": str(args.text_file),
                      "held_out": not args.all_text, **result.as_dict()}))
    return 0


GENERATE_EXAMPLES = """\
nmsparse generate pruned-llm --prompt "def main(" --max-new-tokens 64
nmsparse generate pruned-llm --prompt "import os" --compare-dense  # tokens/s of both"""


def add_generate_command(commands) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "generate", help="greedy text generation from a pruned model folder on the N:M "
        "kernels, with tokens/s", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n" + "\n".join("  " + line for line in GENERATE_EXAMPLES.splitlines()))
    parser.add_argument("path", metavar="MODEL_DIR",
                        help="a Hugging Face model folder written by nmsparse prune")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=32, metavar="N",
                        help="tokens to generate (default 32)")
    parser.add_argument("--compare-dense", action="store_true",
                        help="also generate with the plain dense model read from the folder")
    parser.add_argument("--pattern", default=None, help="the folder's N:M pattern when it has "
                        "no prune.json (written by nmsparse prune)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="auto",
                        help="load the weights in this dtype (default auto: the folder's)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, "
                        "cuda[:N]")
    return parser


def _generate(model, tokenizer, prompt_ids, max_new_tokens: int) -> tuple[list[int], float]:
    import torch

    device = next(model.parameters()).device
    inputs = prompt_ids.unsqueeze(0).to(device)
    settings = {"do_sample": False, "attention_mask": torch.ones_like(inputs),
                "pad_token_id": getattr(model.generation_config, "pad_token_id", None)
                or getattr(model.generation_config, "eos_token_id", None) or 0}
    with torch.no_grad():
        model.generate(inputs, max_new_tokens=2, **settings)  # warm-up (kernel load, caches)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        output = model.generate(inputs, max_new_tokens=max_new_tokens, **settings)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
    return output[0, inputs.shape[1]:].tolist(), seconds


def _show(label: str, tokens: list[int], seconds: float, tokenizer) -> None:
    rate = len(tokens) / seconds if seconds > 0 else float("inf")
    print(f"{label}: {tokenizer.decode(tokens)!r}")
    print(f"  {len(tokens)} new tokens in {seconds:.2f} s: {rate:.1f} tokens/s", flush=True)


def run_generate(args: argparse.Namespace) -> int:
    from ...hf import folder as folders
    from ...hf.pretrained import load_sparse
    from ..train import distributed
    from . import llm_text as text

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.prompt:
        raise ValueError("--prompt is empty: give some text to continue")
    folders.check_folder(args.path)
    _quiet_transformers()
    device = distributed.pick_device(args.device)
    model, report = load_sparse(args.path, dtype=args.dtype, device=device,
                                pattern=args.pattern)
    tokenizer = text.load_tokenizer(args.path, int(getattr(model.config, "vocab_size", 0)))
    prompt_ids = tokenizer.encode(args.prompt.encode("utf-8"))
    if report is None:
        print(f"{args.path}: the pattern is not N:M; generating with the dense layers")
    else:
        print(f"{report.__str__().splitlines()[0]} ({device.type})")
    sparse_tokens, seconds = _generate(model, tokenizer, prompt_ids, args.max_new_tokens)
    _show("sparse", sparse_tokens, seconds, tokenizer)
    if args.compare_dense:
        del model
        dense = folders.load_causal_lm(args.path, args.dtype, device)
        dense_tokens, dense_seconds = _generate(dense, tokenizer, prompt_ids,
                                                args.max_new_tokens)
        _show("dense", dense_tokens, dense_seconds, tokenizer)
        same = "the same tokens" if dense_tokens == sparse_tokens else "different tokens"
        print(f"sparse and dense generated {same}; speed-up "
              f"{(dense_seconds / len(dense_tokens)) / (seconds / len(sparse_tokens)):.2f}x")
    return 0
