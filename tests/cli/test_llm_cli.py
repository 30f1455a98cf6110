"""prune -> eval -> load_pretrained -> generate on Hugging Face folders (tiny Llama with the
byte fallback tokenizer, tiny GPT-2 with Conv1D and its own tokenizer), end to end."""

from __future__ import annotations

import json

import pytest
import torch
from llm_folders import llm_folders  # noqa: F401  (the session fixture)

import nmsparse
from nmsparse.app.cli import llm_text as hf_text
from nmsparse.app.cli.main import main
from nmsparse.export.packed import load_packed
from nmsparse.kernels import NMLinear, PreparedNMLinear
from nmsparse.patterns import parse_pattern

transformers = pytest.importorskip("transformers")

COMMON = ["--calibration", "4", "--calibration-batch-size", "2", "--seq-len", "32",
          "--window", "32", "--seed", "3"]
CASES = {"llama": ("sparsegpt", "2:4"), "gpt2": ("ria", "4:8")}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _close(a, b, tolerance=2e-2):
    """Equal within bf16 rounding, relative to the logits' scale."""
    return float((a - b).abs().max()) <= tolerance * float(b.abs().max())


def _live_pruned(source, text, method, pattern):
    """The same prune through the Python API, its masks held live by sparsify."""
    model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    tokenizer = hf_text.load_tokenizer(source, model.config.vocab_size)
    batches = hf_text.calibration_batches(
        tokenizer.encode(hf_text.split(text.read_bytes())[0]), 4, 32, 2, 3)
    nmsparse.prune(model, pattern, method, calibration=batches, exclude=["lm_head"])
    return model.eval(), tokenizer


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prune_eval_load_and_generate(arch, llm_folders, tmp_path, capsys):  # noqa: F811
    source, text = llm_folders[arch], llm_folders["text"]
    method, spec = CASES[arch]
    out = tmp_path / "pruned"
    assert main(["prune", str(source), "--method", method, "--pattern", spec, "--text-file",
                 str(text), "--eval-text", str(text), "--dtype", "bfloat16", "--packed",
                 "--out", str(out), *COMMON]) == 0
    printed = capsys.readouterr().out
    assert "pruned block 1/2" in printed and "pruned block 2/2" in printed
    assert "dense:  perplexity" in printed and "pruned: perplexity" in printed
    report = json.loads((out / "prune.json").read_text())
    copied = {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    assert copied == (arch == "gpt2")  # the Llama folder has none: byte fallback
    assert report["tokenizer"].startswith("bytes") == (arch == "llama")
    assert report["pattern"] == spec and report["mode"] == "sequential blocks"
    assert report["calibration"]["rows"] == 4 * 32
    # one block's input for the calibration set, in bf16 (4 x 32 tokens x 32 features x 2
    # bytes), plus one batch's output while it replaces its input: never a copy per block
    assert 4 * 32 * 32 * 2 <= report["peak_cached_bytes"] <= 6 * 32 * 32 * 2

    # eval prints the same numbers for the pruned and the dense folder
    for folder, key in ((out, "after"), (source, "before")):
        assert main(["eval", str(folder), "--text-file", str(text), "--window", "32",
                     "--dtype", "bfloat16"]) == 0
        scored = json.loads(capsys.readouterr().out)
        assert scored["perplexity"] == pytest.approx(report[key]["perplexity"], rel=1e-6)
        assert scored["bits_per_byte"] == pytest.approx(report[key]["bits_per_byte"],
                                                        rel=1e-6)
    assert report["after"]["perplexity"] != report["before"]["perplexity"]

    # plain transformers reads the folder: zeros baked in, the head dense
    plain = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert plain.dtype == torch.bfloat16
    masks = nmsparse.saved_masks(out / "masks.safetensors")
    pruned_names = [layer["name"] for layer in report["layers"] if layer["density"]]
    assert sorted(masks) == sorted(pruned_names)
    assert len(masks) == {"llama": 14, "gpt2": 8}[arch]
    state = plain.state_dict()
    pattern = parse_pattern(spec)
    for name, mask in masks.items():
        weight = state[name].float()
        assert torch.all(weight[~mask] == 0)
        assert pattern.violations(weight.t() if arch == "gpt2" else weight).ok
    assert "lm_head.weight" not in masks
    packed = load_packed(out / "model.packed.safetensors")
    assert all(torch.equal(packed[key], state[key]) for key in packed if key in state)

    # the live sparse model, the reloaded folder and the swapped model agree
    live, tokenizer = _live_pruned(source, text, method, spec)
    handle = nmsparse.handles_of(live)[0]
    assert all(torch.equal(handle[name].mask, mask) for name, mask in masks.items())
    ids = tokenizer.encode(b"def wrap(text, width=70):\n    return")[None]
    reference = _logits(plain, ids)
    assert _close(_logits(live, ids), reference)
    swapped = nmsparse.load_pretrained(out, device="cpu")  # bf16 on AVX512_BF16: prepared
    assert sum(isinstance(m, (NMLinear, PreparedNMLinear)) for m in swapped.modules()) \
        == len(masks)
    assert _close(_logits(swapped, ids), reference)

    assert main(["generate", str(out), "--prompt", "def wrap(", "--max-new-tokens", "6",
                 "--compare-dense", "--device", "cpu", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert f"{len(masks)} Linear layer(s) swapped to NMLinear {spec}" in printed
    assert printed.count("tokens/s") == 2 and "sparse: " in printed and "dense: " in printed


@pytest.mark.cuda
def test_load_pretrained_puts_2to4_on_the_tensor_cores(llm_folders, tmp_path):  # noqa: F811
    from nmsparse.kernels import SemiStructuredLinear

    out = tmp_path / "pruned"
    assert main(["prune", str(llm_folders["llama"]), "--method", "magnitude", "--dtype",
                 "bfloat16", "--out", str(out)]) == 0
    plain = transformers.AutoModelForCausalLM.from_pretrained(out).eval().to("cuda")
    model = nmsparse.load_pretrained(out)
    assert next(model.parameters()).device.type == "cuda"
    assert any(isinstance(m, SemiStructuredLinear) for m in model.modules())
    ids = torch.arange(1, 33, device="cuda")[None]
    assert _close(_logits(model, ids), _logits(plain, ids))


@pytest.mark.cuda
@pytest.mark.parametrize(("spec", "dtype"), [("4:8", "bfloat16"), ("2:4", "float32")])
def test_load_pretrained_on_a_gpu_swaps_other_patterns_onto_nm_linear(
        spec, dtype, llm_folders, tmp_path, capsys):  # noqa: F811
    # Not 2:4 in bf16/fp16: the tensor cores do not take it, so every N:M layer becomes an
    # NMLinear on the GPU (Triton when installed, else torch); generate runs there too.
    from nmsparse.kernels import SemiStructuredLinear

    out = tmp_path / "pruned"
    assert main(["prune", str(llm_folders["llama"]), "--method", "sparsegpt", "--pattern", spec,
                 "--text-file", str(llm_folders["text"]), "--dtype", dtype, "--device", "cuda",
                 "--out", str(out), *COMMON[:6]]) == 0
    masks = nmsparse.saved_masks(out / "masks.safetensors")
    plain = transformers.AutoModelForCausalLM.from_pretrained(out).eval().to("cuda")
    model = nmsparse.load_pretrained(out)
    assert next(model.parameters()).device.type == "cuda"
    assert sum(isinstance(m, NMLinear) for m in model.modules()) == len(masks) == 14
    assert not any(isinstance(m, SemiStructuredLinear) for m in model.modules())
    ids = torch.arange(1, 33, device="cuda")[None]
    assert _close(_logits(model, ids), _logits(plain, ids))
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "def wrap(", "--max-new-tokens", "4",
                 "--device", "cuda"]) == 0
    assert "tokens/s" in capsys.readouterr().out
