"""Tiny Hugging Face causal LM folders for the command-line tests, written with
``save_pretrained`` from configs (nothing is downloaded), and a tiny text file.

* ``llama``: a Llama config with a 256-id vocabulary and no tokenizer files, so the byte-level
  fallback tokenizer is used;
* ``gpt2``: GPT-2 (its projections are ``Conv1D``) with a small byte-level BPE tokenizer
  trained here on the text and saved beside it.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")


def write_text(folder: Path) -> Path:
    """About 20 KB of Python source (the standard library's textwrap.py)."""
    source = Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py"
    target = folder / "text.txt"
    target.write_bytes(source.read_bytes())
    return target


def write_llama(folder: Path) -> Path:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def _tokenizer(text: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"], show_progress=False))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer,
                                                eos_token="<|endoftext|>")


def write_gpt2(folder: Path, text: Path) -> Path:
    tokenizer = _tokenizer(text.read_text(encoding="utf-8"))
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2,
                                     n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def llm_folders(tmp_path_factory):
    """``{"text": file, "llama": folder, "gpt2": folder}``, made once per session."""
    root = tmp_path_factory.mktemp("llm")
    text = write_text(root)
    return {"text": text, "llama": write_llama(root / "llama"),
            "gpt2": write_gpt2(root / "gpt2", text)}
