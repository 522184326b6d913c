"""Training checkpoints: everything needed to continue a run exactly.

DIR/checkpoints/step-NNNNNN/
  model.safetensors, config.json, bpe.json, tokenizer.json   the model checkpoint (model/)
  NAME.safetensors                                           the objective's extras (a head)
  run.yaml                                                   the resolved run config
  optimizer.safetensors + optimizer.json                     AdamW moments and step counts
  rng.safetensors                                            torch RNG states (CPU, CUDA)
  trainer_state.json                                         step, tokens, loader, best, scaler

A checkpoint is written into a temporary directory that is renamed into place when complete,
so a run killed mid-write leaves the previous checkpoints untouched. Nothing is unpickled.

Model and optimizer state are gathered whole, keyed by parameter name, through
torch.distributed.checkpoint's state-dict API (a plain model gives the same), and pipeline
stages' and ZeRO-1 ranks' parts merged by name: so a checkpoint is the same whatever the layout
that wrote it (one process, DDP, ZeRO-1/2/3, tensor or pipeline parallel over N ranks), and
loads under any other (gather-to-rank-0; rank 0 writes; every rank reads and keeps its part).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from scratchlm.config import save_config
from scratchlm.errors import ScratchError
from scratchlm.model.checkpoint import load_config as load_model_config
from scratchlm.model.checkpoint import load_extras, save_extras, save_model
from scratchlm.model.gpt import GPT, tied_weights
from scratchlm.model.lora import ADAPTER_WEIGHTS, lora_layers
from scratchlm.parallel import gather_to_first
from scratchlm.parallel.zero1 import ZeroOneOptimizer
from scratchlm.train.objective import TrainModule
from scratchlm.utils import atomic_write_text, save_tensors

STATE = "trainer_state.json"


def step_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:06d}"


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a temporary or half-written one is skipped)."""
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if p.is_dir() and (p / STATE).is_file())


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole, on rank 0 only
_WHOLE_HERE = StateDictOptions(full_state_dict=True)  # whole, on every rank
PREFIX = "model."  # a TrainModule's names for the model's parameters


def gather_model_state(module: TrainModule, stage_group: dist.ProcessGroup | None = None
                       ) -> tuple[dict, dict]:
    """(the whole model state dict, the objective's extras) on rank 0 ({} elsewhere). A
    collective under FSDP, tensor or pipeline parallelism: every rank must call it.
    `stage_group` holds the pipeline stages, each with its own part of the model, merged here
    by name."""
    extras = get_model_state_dict(module.extras, options=_FULL)
    if stage_group is None:
        return get_model_state_dict(module.model, options=_FULL), extras
    part = {k: v.detach().cpu() for k, v in
            get_model_state_dict(module.model, options=_WHOLE_HERE).items()}
    return {k: v for p in gather_to_first(part, stage_group) for k, v in p.items()}, extras


def gather_state(module: TrainModule, opt: torch.optim.Optimizer,
                 stage_group: dist.ProcessGroup | None = None) -> tuple[dict, dict, dict]:
    """Whole model, extras and optimizer state dicts, as above; optimizer state is keyed by
    the TrainModule's parameter names ("model.*", "extras.*")."""
    model_state, extras = gather_model_state(module, stage_group)
    if isinstance(opt, ZeroOneOptimizer):
        return model_state, extras, opt.gather_state_dict(module)
    if stage_group is None:
        return model_state, extras, get_optimizer_state_dict(module, opt, options=_FULL)
    parts = gather_to_first(get_optimizer_state_dict(module, opt, options=_WHOLE_HERE),
                            stage_group)
    if not parts:
        return model_state, extras, {}
    state = {k: v for p in parts for k, v in p["state"].items()}
    groups = [{**g, "params": [n for p in parts for n in p["param_groups"][i]["params"]]}
              for i, g in enumerate(parts[0]["param_groups"])]
    for head in tied_weights(module.model):  # the last stage's copy equals the embedding's
        state.pop(PREFIX + head, None)
        for g in groups:
            g["params"] = [n for n in g["params"] if n != PREFIX + head]
    return model_state, extras, {"state": state, "param_groups": groups}


def _for_stage(model: GPT, model_state: dict, opt_state: dict) -> tuple[dict, dict]:
    """The part of whole state dicts that a pipeline stage holds."""
    names = set(model.state_dict())
    opt_state = {"state": dict(opt_state["state"]),
                 "param_groups": [dict(g) for g in opt_state["param_groups"]]}
    for head, emb in tied_weights(model).items():
        if head in names and emb not in names:  # the last stage's copy of the tied embedding
            head, emb = PREFIX + head, PREFIX + emb
            opt_state["state"][head] = opt_state["state"].get(emb, {})
            for g in opt_state["param_groups"]:
                g["params"] = [head if n == emb else n for n in g["params"]]
    held = {PREFIX + n for n in names}
    opt_state["state"] = {k: v for k, v in opt_state["state"].items() if k in held}
    for g in opt_state["param_groups"]:
        g["params"] = [n for n in g["params"] if n in held]
    return {k: v for k, v in model_state.items() if k in names}, opt_state


def _optimizer_tensors(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {f"{name}::{k}": v.detach().contiguous().cpu()
               for name, state in sd["state"].items() for k, v in state.items()
               if isinstance(v, torch.Tensor)}
    meta = {"param_groups": sd["param_groups"],
            "scalars": {name: {k: v for k, v in s.items() if not isinstance(v, torch.Tensor)}
                        for name, s in sd["state"].items()}}
    return tensors, meta


def save_checkpoint(out: Path, step: int, module: TrainModule, states: tuple[dict, dict, dict],
                    tokenizer, run_cfg, state: dict) -> Path:
    """Write on rank 0, from the gathered (model, extras, optimizer) states (`gather_state`)."""
    model_state, extras, opt_state = states
    final = step_dir(out, step)
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(module.model, tmp, tokenizer, state=model_state)
    save_extras(tmp, extras)
    save_config(run_cfg, tmp / "run.yaml")
    tensors, meta = _optimizer_tensors(opt_state)
    save_tensors(tensors, tmp / "optimizer.safetensors")
    atomic_write_text(tmp / "optimizer.json", json.dumps(meta))
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_tensors(rng, tmp / "rng.safetensors")
    atomic_write_text(tmp / STATE, json.dumps(state, indent=2))  # last: marks it complete
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def load_checkpoint(path: Path, module: TrainModule, opt: torch.optim.Optimizer) -> dict:
    """Restore model, extras, optimizer and RNG state in place; returns the trainer state.
    Refuses a checkpoint of another model or a damaged one with a ScratchError."""
    model = module.model
    saved = load_model_config(path)
    if saved != model.config:
        diff = [f"{k} {getattr(saved, k)!r} vs {getattr(model.config, k)!r}"
                for k in model.config.to_dict() if getattr(saved, k) != getattr(model.config, k)]
        raise ScratchError(f"{path} is a checkpoint of another model ({', '.join(diff[:3])})")
    try:
        state = json.loads((path / STATE).read_text())
        model_state = load_file(str(path / "model.safetensors"))
        adapters = load_file(str(path / ADAPTER_WEIGHTS)) if lora_layers(model) else {}
        extras = load_extras(path, list(module.extras))
        opt_tensors = load_file(str(path / "optimizer.safetensors"))
        opt_meta = json.loads((path / "optimizer.json").read_text())
        rng = load_file(str(path / "rng.safetensors"))
    except (OSError, SafetensorError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ScratchError(f"{path}: damaged checkpoint ({type(e).__name__}: {e})") from None
    from scratchlm.model.checkpoint import check_state

    with torch.device("meta"):  # the whole model's tensor shapes, whatever part this rank has
        check_state(GPT(model.config), model_state, str(path / "model.safetensors"))
    model_state.update(adapters)
    for head, emb in tied_weights(model).items():  # stored once; the state-dict API wants both
        model_state[head] = model_state[emb]
    opt_state: dict = {"param_groups": opt_meta["param_groups"],
                       "state": {name: dict(s) for name, s in opt_meta["scalars"].items()}}
    for key, tensor in opt_tensors.items():
        name, field = key.split("::", 1)
        opt_state["state"].setdefault(name, {})[field] = tensor
    if len(model.blocks) < model.config.n_layer:  # a pipeline stage
        model_state, opt_state = _for_stage(model, model_state, opt_state)
    try:
        set_model_state_dict(model, model_state, options=_FULL)
        set_model_state_dict(module.extras, extras, options=_FULL)
        if isinstance(opt, ZeroOneOptimizer):
            opt.load_full_state_dict(module, opt_state)
        else:
            set_optimizer_state_dict(module, opt, opt_state, options=_FULL)
    except (ValueError, KeyError, RuntimeError) as e:
        raise ScratchError(f"{path}: saved model or optimizer state does not fit this model "
                           f"({e})") from None
    torch.set_rng_state(rng["cpu"])
    cuda = [rng[k] for k in sorted(rng) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    return state


def prune(out: Path, keep_last: int, keep: set[int]) -> None:
    """Delete all but the newest `keep_last` checkpoints and those whose step is in `keep`."""
    ckpts = list_checkpoints(out)
    for path in ckpts[:-keep_last] if keep_last > 0 else ckpts:
        if int(path.name.split("-")[1]) not in keep:
            shutil.rmtree(path, ignore_errors=True)
