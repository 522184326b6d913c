"""A model checkpoint is a directory: `model.safetensors` + `config.json` (+ tokenizer files).

Loading never unpickles anything, and a checkpoint that does not fit its config (or that came
from another model) is refused with the name of the first tensor that does not fit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from scratchlm.errors import ScratchError
from scratchlm.model.config import ModelConfig
from scratchlm.model.gpt import GPT, tied_weights
from scratchlm.utils import atomic_write_text, save_tensors

FORMAT = "scratchlm-model"
FORMAT_VERSION = 1


def base_tensors(model: GPT, state: dict[str, torch.Tensor] | None = None
                 ) -> dict[str, torch.Tensor]:
    """The base model's tensors of a state dict (default: the model's own): a tied head is
    stored once, as the token embedding, and LoRA adapters are left out (saved apart)."""
    from scratchlm.model.lora import is_adapter

    state = model.state_dict() if state is None else state
    return {k: v for k, v in state.items() if k not in tied_weights(model) and not is_adapter(k)}



def save_model(model: GPT, directory: str | os.PathLike, tokenizer=None,
               state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the model (and tokenizer, if given) into `directory`, each file atomically.
    `state` replaces the model's own tensors (a state dict gathered from sharded ranks).
    LoRA adapters, if attached, go to adapter.safetensors beside the base weights."""
    from scratchlm.model.lora import lora_layers, save_adapter

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_tensors({k: v.detach().contiguous().cpu() for k, v in
                  base_tensors(model, state).items()}, directory / "model.safetensors")
    if lora_layers(model):
        save_adapter(model, directory, state)
    atomic_write_text(directory / "config.json", json.dumps(
        {"format": FORMAT, "version": FORMAT_VERSION, "model": model.config.to_dict()}, indent=2))
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory


def load_config(directory: str | os.PathLike) -> ModelConfig:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise ScratchError(f"{directory}: not a model checkpoint (no config.json); "
                           "check the path")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ScratchError(f"{path}: unreadable ({e}); the checkpoint is corrupt") from None
    if data.get("format") != FORMAT:
        if "model_type" in data:
            raise ScratchError(f"{directory} is a Hugging Face model; convert it first with "
                               f"`scratchlm convert --from-hf {directory} --out DIR`")
        raise ScratchError(f"{path}: not a scratchlm model config (format must be {FORMAT!r})")
    from scratchlm.config import from_dict

    return from_dict(ModelConfig, data["model"], "model")


def check_state(model: GPT, state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse a state dict that does not fit `model`, naming the first tensor that does not."""
    expected = {k: tuple(v.shape) for k, v in base_tensors(model).items()}
    for name, shape in expected.items():
        if name not in state:
            raise ScratchError(f"{source}: tensor {name!r} is missing; the checkpoint is from "
                               "another model or incomplete")
        if tuple(state[name].shape) != shape:
            raise ScratchError(f"{source}: tensor {name!r} has shape {tuple(state[name].shape)} "
                               f"but the config needs {shape}; the checkpoint is from a model "
                               "of another shape")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise ScratchError(f"{source}: unexpected tensor {extra[0]!r}; the checkpoint is from "
                           "another kind of model")


def load_model(directory: str | os.PathLike, device: str | torch.device = "cpu") -> GPT:
    """The GPT saved in `directory` by `save_model`."""
    directory = Path(directory)
    cfg = load_config(directory)
    path = directory / "model.safetensors"
    if not path.is_file():
        raise ScratchError(f"{directory}: model.safetensors is missing; the checkpoint is "
                           "incomplete")
    try:
        state = load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as e:
        raise ScratchError(f"{path}: not a readable safetensors file ({e}); the checkpoint "
                           "is corrupt") from None
    model = GPT(cfg).to(device)
    check_state(model, state, str(path))
    model.load_state_dict(state, strict=not cfg.tie_embeddings)  # a tied head has no entry
    if (directory / "adapter.json").is_file():
        from scratchlm.model.lora import load_adapter

        model = load_adapter(model, directory)  # grown if its tokens' rows need it
    return model


def save_extras(directory: str | os.PathLike, state: dict[str, torch.Tensor]) -> None:
    """Modules trained beside the model (a classification head, a value head), from a state
    dict keyed "NAME.tensor": one NAME.safetensors each."""
    by_name: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        name, rest = key.split(".", 1)
        by_name.setdefault(name, {})[rest] = value.detach().contiguous().cpu()
    for name, tensors in by_name.items():
        save_tensors(tensors, Path(directory) / f"{name}.safetensors")


def load_extras(directory: str | os.PathLike, names: list[str]) -> dict[str, torch.Tensor]:
    """The extras `names` saved by `save_extras`, keyed "NAME.tensor"."""
    state = {}
    for name in names:
        path = Path(directory) / f"{name}.safetensors"
        if not path.is_file():
            raise ScratchError(f"{directory}: {name}.safetensors is missing; the checkpoint "
                               f"holds no {name}")
        state.update({f"{name}.{k}": v for k, v in load_file(str(path)).items()})
    return state
