"""Byte-level BPE tokenizer, written from scratch, with GPT-2 import and fast backends."""

from scratchlm.tokenizer.bpe import GPT2_PATTERN, GPT4_PATTERN, BPETokenizer
from scratchlm.tokenizer.gpt2 import from_gpt2, save_gpt2, tiktoken_gpt2

__all__ = ["BPETokenizer", "GPT2_PATTERN", "GPT4_PATTERN", "from_gpt2", "save_gpt2",
           "tiktoken_gpt2"]
