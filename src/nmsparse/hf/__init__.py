"""Hugging Face causal LMs from local folders: load (no downloads, no remote code), text and
tokenizer, perplexity, the pruned folder, and :func:`load_pretrained` onto the N:M kernels.

Nothing here imports transformers until a function needs it.
"""

from .perplexity import Perplexity, perplexity
from .pretrained import load_pretrained

__all__ = ["Perplexity", "load_pretrained", "perplexity"]
