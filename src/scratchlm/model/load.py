"""The one place that loads a model and its tokenizer for use: generation, chat, serving,
evaluation, and the stages that start from a trained model (fine-tuning, alignment).

A model may be given as a scratchlm run directory (its final/ model is used), a scratchlm
model directory (final/, a checkpoints/step-N/), or a Hugging Face GPT-2 / Llama directory
(`save_pretrained`); the tokenizer is found beside it (bpe.json, or Hugging Face's
tokenizer.json, or GPT-2's vocab.json + merges.txt) unless given.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from scratchlm.errors import ScratchError
from scratchlm.model.gpt import GPT
from scratchlm.tokenizer import BPETokenizer


def model_dir(path: str | os.PathLike) -> Path:
    """The model directory `path` names: itself, or a run directory's final/."""
    d = Path(path)
    if not d.exists():
        raise ScratchError(f"{d}: no such model directory; check the path")
    if not d.is_dir():
        raise ScratchError(f"{d} is a file; give the directory that holds the model")
    if (d / "config.json").is_file():
        return d
    if (d / "final" / "config.json").is_file():
        return d / "final"
    if (d / "checkpoints").is_dir():
        raise ScratchError(f"{d} is a run that has not finished (no final/); give one of its "
                           f"checkpoints, {d / 'checkpoints'}/step-N, or resume it")
    raise ScratchError(f"{d}: not a model directory (no config.json) nor a run directory "
                       "(no final/); check the path")


def is_hf_dir(directory: Path) -> bool:
    try:
        return "model_type" in json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False


def load_tokenizer(directory: str | os.PathLike) -> BPETokenizer:
    """The tokenizer saved in `directory`, in any of the forms above."""
    d = Path(directory)
    if (d / "bpe.json").is_file():
        return BPETokenizer.load(d)
    if (d / "tokenizer.json").is_file():
        from scratchlm.tokenizer.gpt2 import from_hf_json

        return from_hf_json(d / "tokenizer.json")
    if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
        from scratchlm.tokenizer import from_gpt2

        return from_gpt2(d / "vocab.json", d / "merges.txt")
    raise ScratchError(f"{d}: no tokenizer (bpe.json, tokenizer.json or vocab.json + "
                       "merges.txt) beside the model; pass --tokenizer DIR")


def load_pretrained(path: str | os.PathLike, device: str | torch.device = "cpu",
                    tokenizer: str | os.PathLike | None = None
                    ) -> tuple[GPT, BPETokenizer, Path]:
    """(model, tokenizer, the model directory) for any of the forms above."""
    from scratchlm.model.checkpoint import load_model
    from scratchlm.model.hf import from_hf
    from scratchlm.model.lora import bake

    d = model_dir(path)
    model = from_hf(d).to(device) if is_hf_dir(d) else load_model(d, device)
    bake(model)  # LoRA adapters, if any, folded into the weights: no cost per token
    tok = load_tokenizer(tokenizer or d)
    if tok.vocab_size > model.config.vocab_size:
        raise ScratchError(f"the tokenizer has {tok.vocab_size:,} tokens but the model only "
                           f"{model.config.vocab_size:,}; they do not belong together")
    return model.eval(), tok, d
