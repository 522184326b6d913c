"""LoRA (Hu et al. 2021): a frozen linear layer W plus a trained low-rank update,
y = W x + (alpha / r) * B A x, with A (r, in) and B (out, r), B initialised to zero so training
starts from the base model exactly.

Adapters are attached from outside: each target `nn.Linear` gets a `lora` submodule (A, B,
dropout) and a forward hook that adds its update, so the base weights keep their names and
the adapters are the parameters named "*.lora.a" / "*.lora.b". `merge` folds B A into W for
inference (one matmul per layer, as before) and `unmerge` takes it out again; both are exact
up to float rounding. Adapters save alone (adapter.safetensors + adapter.json, a few hundred
KB) and load on the base model; `save_peft` writes Hugging Face `peft`'s format.

Tokens added for a prompt template (scratchlm.model.resize) have no trained rows to freeze:
`train_token_rows` gives them their own small parameters ("token_rows.emb", and
"token_rows.head" for an untied head) spliced into the embedding and the head, saved and
loaded with the adapters, while the base vocabulary's rows stay frozen exactly.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from scratchlm.config import LORA_TARGETS, LoRAConfig
from scratchlm.errors import ScratchError
from scratchlm.model.dropout import Dropout
from scratchlm.model.gpt import GPT, tied_weights
from scratchlm.utils import atomic_write_text, save_tensors

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter.safetensors", "adapter.json"

# Target groups (LORA_TARGETS): which linear layers of a block (and the head) take adapters.
GROUPS = {
    "attn": ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.proj"],
    "q": ["attn.q_proj"], "k": ["attn.k_proj"], "v": ["attn.v_proj"], "o": ["attn.proj"],
    "mlp": ["mlp.gate", "mlp.up", "mlp.fc", "mlp.proj"],
    "head": [],
}
assert set(GROUPS) == set(LORA_TARGETS)


class LoRA(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        # A as a linear layer's default init (Kaiming-uniform, a = sqrt(5)); B zero.
        nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))
        self.scale = alpha / rank
        self.drop = Dropout(dropout)
        self.merged = False

    def delta(self) -> torch.Tensor:
        """The update to W, (out, in)."""
        return (self.b @ self.a) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.drop(x) @ self.a.t() @ self.b.t()) * self.scale  # (..., out)


def _add_update(linear: nn.Linear, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    if linear.lora.merged:
        return output
    return output + linear.lora(inputs[0]).to(output.dtype)


def target_modules(model: GPT, targets: list[str]) -> dict[str, nn.Linear]:
    """{name: linear layer} that `targets` name in `model`."""
    # In a fixed order (never a set's): adapters draw their initial A from the RNG in this
    # order, which must be the same in every process (FSDP ranks initialise their own).
    suffixes = list(dict.fromkeys(s for t in targets for s in GROUPS[t]))
    found = {f"blocks.{i}.{s}": block.get_submodule(s) for i, block in model.blocks.items()
             for s in suffixes if _has(block, s)}
    if "head" in targets:
        if tied_weights(model):
            raise ScratchError("lora.targets: the head is tied to the embedding, so it cannot "
                               "take its own adapter; leave 'head' out")
        found["lm_head"] = model.lm_head
    if not found:
        raise ScratchError(f"lora.targets {targets} name no layer of this model; choose from "
                           f"{', '.join(GROUPS)}")
    return found


def _has(block: nn.Module, name: str) -> bool:
    try:
        return isinstance(block.get_submodule(name), nn.Linear)
    except AttributeError:
        return False


class TokenRows(nn.Module):
    """Trained rows for the ids [start, start + count) of a frozen model: `emb` (count, n_embd)
    replaces those rows of the token embedding (and so of a tied head), `head` (count, n_embd)
    those of an untied head. Both start as the model's own rows, so training starts from the
    model exactly.

    Why separate parameters rather than the whole embedding with its gradient masked: AdamW
    state then covers count x n_embd numbers, not vocab x n_embd, and the base rows cannot move
    at all (AdamW's decoupled weight decay would shrink them even under a zero gradient), so
    they stay bitwise the base's and the base saves unchanged beside the adapters."""

    def __init__(self, model: GPT, start: int, count: int) -> None:
        super().__init__()
        self.start, self.count = start, count
        rows = slice(start, start + count)
        self.emb = nn.Parameter(model.tok_emb.weight[rows].detach().clone())
        self.head = None if tied_weights(model) else \
            nn.Parameter(model.lm_head.weight[rows].detach().clone())
        # The frozen head rows the head's own matmul uses; the hook adds (head - base) x on
        # top, which is right whether a head adapter is merged into the weight or not.
        # Not saved: they are the base's.
        self.register_buffer("head_base", model.lm_head.weight[rows].detach().clone(),
                             persistent=False)

    def head_rows(self) -> torch.Tensor:
        return self.emb if self.head is None else self.head

    def splice_embedding(self, emb: nn.Embedding, inputs: tuple, output: torch.Tensor
                         ) -> torch.Tensor:
        idx = inputs[0]  # (B, T) ids -> output (B, T, n_embd)
        new = (idx >= self.start) & (idx < self.start + self.count)
        rows = self.emb[(idx - self.start).clamp(0, self.count - 1)]  # (B, T, n_embd)
        return torch.where(new[..., None], rows.to(output.dtype), output)

    def splice_head(self, head: nn.Linear, inputs: tuple, output: torch.Tensor
                    ) -> torch.Tensor:
        # output (B, T, vocab); its new columns move from base-row logits to trained-row ones.
        # In place: no second (B, T, vocab) tensor (the head's matmul does not keep its output
        # for backward, so autograd allows it).
        diff = (self.head_rows().float() - self.head_base.float()).to(inputs[0].dtype)
        output[..., self.start:self.start + self.count] += F.linear(inputs[0], diff).to(
            output.dtype)
        return output


def train_token_rows(model: GPT, ids: list[int]) -> GPT:
    """Let the rows of the added tokens `ids` (consecutive, as `resize.add_special_tokens`
    gives them) train beside the adapters of a frozen model, in place (see TokenRows)."""
    start, count = min(ids), len(ids)
    if sorted(ids) != list(range(start, start + count)) or \
            start + count > model.config.vocab_size:
        raise ScratchError(f"token ids {ids} are not consecutive rows of the model's "
                           "vocabulary; add them with scratchlm.model.resize")
    model.token_rows = rows = TokenRows(model, start, count)
    model.token_hooks = [model.tok_emb.register_forward_hook(rows.splice_embedding),
                         model.lm_head.register_forward_hook(rows.splice_head)]
    return model


def token_rows(model: nn.Module) -> TokenRows | None:
    return getattr(model, "token_rows", None)


@torch.no_grad()
def _fold_token_rows(model: GPT) -> None:
    """Write the trained rows into the embedding and head and remove them (a plain model)."""
    rows = token_rows(model)
    if rows is None:
        return
    span = slice(rows.start, rows.start + rows.count)
    model.tok_emb.weight[span] = rows.emb.to(model.tok_emb.weight.dtype)
    if rows.head is not None:  # plus whatever a merged head adapter added to the base rows
        w = model.lm_head.weight
        w[span] = (rows.head + (w[span] - rows.head_base)).to(w.dtype)
    for hook in model.token_hooks:
        hook.remove()
    del model.token_rows, model.token_hooks


def apply_lora(model: GPT, cfg: LoRAConfig) -> GPT:
    """Freeze `model` and attach adapters to the layers `cfg.targets` names, in place."""
    model.requires_grad_(False)
    for linear in target_modules(model, cfg.targets).values():
        linear.lora = LoRA(linear, cfg.rank, cfg.alpha, cfg.dropout)
        linear.lora_hook = linear.register_forward_hook(_add_update)
    model.lora_config = cfg
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRA]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRA)}


@torch.no_grad()
def merge(model: GPT) -> GPT:
    """Fold every adapter into its layer's weight (inference: no extra matmuls)."""
    for name, lora in lora_layers(model).items():
        if not lora.merged:
            model.get_submodule(name.removesuffix(".lora")).weight += lora.delta()
            lora.merged = True
    return model


@torch.no_grad()
def unmerge(model: GPT) -> GPT:
    for name, lora in lora_layers(model).items():
        if lora.merged:
            model.get_submodule(name.removesuffix(".lora")).weight -= lora.delta()
            lora.merged = False
    return model


def bake(model: GPT) -> GPT:
    """Merge every adapter into its weight and remove the adapters: a plain model again
    (peft's merge_and_unload), e.g. as the base of a later stage."""
    merge(model)
    _fold_token_rows(model)
    for name in lora_layers(model):
        linear = model.get_submodule(name.removesuffix(".lora"))
        linear.lora_hook.remove()
        del linear.lora, linear.lora_hook
    if hasattr(model, "lora_config"):
        del model.lora_config
    # The base unfrozen again (apply_lora froze it): whoever uses the plain model
    # (a later stage) decides what trains.
    model.requires_grad_(True)
    return model


def is_adapter(name: str) -> bool:
    """Saved with the adapters (not the base): LoRA's A and B and added tokens' rows."""
    return ".lora." in name or name.startswith(("lora.", "token_rows.")) \
        or ".token_rows." in name


def base_rows(model: GPT, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Base tensors (tok_emb.weight, an untied lm_head.weight among them) with the added
    tokens' trained rows written in: the base that `peft` adapters (`save_peft`) go on, as
    the Hugging Face export writes it (`hf.state_to_hf`)."""
    rows = token_rows(model)
    if rows is None:
        return tensors
    span = slice(rows.start, rows.start + rows.count)
    out = dict(tensors)
    for name, trained in [("tok_emb.weight", rows.emb), ("lm_head.weight", rows.head)]:
        if trained is not None and name in out:
            out[name] = out[name].clone()
            out[name][span] = trained.detach().to(out[name].dtype)
    return out


def save_adapter(model: GPT, directory: str | os.PathLike,
                 state: dict[str, torch.Tensor] | None = None) -> None:
    """adapter.safetensors (the adapters alone) + adapter.json (their config)."""
    source = state if state is not None else model.state_dict()
    tensors = {k: v.detach().contiguous().cpu() for k, v in source.items() if is_adapter(k)}
    save_tensors(tensors, Path(directory) / ADAPTER_WEIGHTS)
    meta = {"format": "scratchlm-lora", "version": 1, **asdict(model.lora_config)}
    if (rows := token_rows(model)) is not None:  # the vocabulary the base must have
        meta["token_rows"] = {"start": rows.start, "count": rows.count,
                              "vocab_size": model.config.vocab_size}
    atomic_write_text(Path(directory) / ADAPTER_CONFIG, json.dumps(meta, indent=2))


def load_adapter(model: GPT, directory: str | os.PathLike) -> GPT:
    """Attach and load the adapters saved in `directory` onto `model` (its base), in place;
    returns the model, a new one grown to the adapter's vocabulary if the adapter trained rows
    of tokens that `model` lacks (use the returned model)."""
    from safetensors.torch import load_file

    d = Path(directory)
    try:
        meta = json.loads((d / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        tensors = load_file(str(d / ADAPTER_WEIGHTS))
    except (OSError, json.JSONDecodeError) as e:
        raise ScratchError(f"{d}: unreadable LoRA adapter ({e}); the directory is "
                           "damaged") from None
    tokens = meta.get("token_rows")
    cfg = LoRAConfig(**{k: v for k, v in meta.items()
                        if k not in ("format", "version", "token_rows")})
    if tokens and model.config.vocab_size < tokens["vocab_size"] and not lora_layers(model):
        from scratchlm.model.resize import grow

        model = grow(model, tokens["vocab_size"])
    if not lora_layers(model):
        apply_lora(model, cfg)
    if tokens and token_rows(model) is None:
        train_token_rows(model, list(range(tokens["start"], tokens["start"] + tokens["count"])))
    expected = {k: v.shape for k, v in model.state_dict().items() if is_adapter(k)}
    if set(expected) != set(tensors) or any(tensors[k].shape != s for k, s in expected.items()):
        raise ScratchError(f"{d}: the adapter does not fit this model (another base or "
                           "another LoRA config)")
    model.load_state_dict(tensors, strict=False)
    return model


def save_peft(model: GPT, directory: str | os.PathLike) -> Path:
    """The adapters in Hugging Face `peft`'s format (adapter_config.json +
    adapter_model.safetensors), for `PeftModel.from_pretrained` on the model's Hugging Face
    export (`scratchlm.model.hf.save_hf`)."""
    from scratchlm.model.hf import family, hf_linear_name

    cfg, d = model.lora_config, Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    gpt2 = family(model.config) == "gpt2"
    if gpt2:
        raise ScratchError("peft export is for Llama-family models: GPT-2 fuses q, k and v "
                           "into one Conv1D, which separate q/k/v adapters cannot map onto")
    tensors, modules = {}, set()
    for name, lora in lora_layers(model).items():
        hf = hf_linear_name(model.config, name.removesuffix(".lora"))
        modules.add(hf.rsplit(".", 1)[-1])
        tensors[f"base_model.model.{hf}.lora_A.weight"] = lora.a.detach().contiguous().cpu()
        tensors[f"base_model.model.{hf}.lora_B.weight"] = lora.b.detach().contiguous().cpu()
    save_tensors(tensors, d / "adapter_model.safetensors")
    atomic_write_text(d / "adapter_config.json", json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.rank,
        "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
        "target_modules": sorted(modules), "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "base_model_name_or_path": None}, indent=2))
    return d
