"""Typed configuration: dataclasses, YAML files that override their defaults, and
`--section.key=value` overrides on the command line.

A field's docstring (the string literal right below it) is its help text. Unknown keys are errors
that suggest the nearest valid key; values of the wrong type are errors that name the field.
The resolved config is saved as YAML next to every artefact a run writes.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import os
import textwrap
import types
import typing
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from scratchlm.data.prepare import DataConfig
from scratchlm.errors import ScratchError
from scratchlm.model.config import ModelConfig

T = TypeVar("T")


# ------------------------------------------------------------------------------------------------
# the sections (later stages add theirs to `Config`)


@dataclass
class TokenizerConfig:
    path: str | None = None
    """An existing tokenizer directory; None = train one on data.inputs into RUN/tokenizer."""
    vocab_size: int = 8192
    """Vocabulary size: 256 byte tokens + learned merges + special tokens."""
    pattern: str = "gpt4"
    """Pre-tokenization regex: "gpt2", "gpt4" (digits in groups of 3) or a regex of one's own."""
    special_tokens: list[str] = field(default_factory=lambda: ["<|endoftext|>"])
    """Special tokens, given ids after the merges; <|endoftext|> separates documents."""


@dataclass
class TrainConfig:
    max_steps: int = 1000
    """Optimizer steps."""
    micro_batch: int = 8
    """Sequences per forward pass on each process."""
    global_batch_tokens: int = 0
    """Tokens per optimizer step over all processes (0 = one micro-batch each); gradient
    accumulation makes up the difference, so it must be a multiple of
    micro_batch * block_size * processes."""
    lr: float = 6e-4
    """Peak learning rate, reached after warmup."""
    min_lr_ratio: float = 0.1
    """The cosine decay ends at lr * min_lr_ratio."""
    warmup_steps: int = 100
    """Steps of linear warmup."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay, on weight matrices only (see train/optim.py)."""
    beta1: float = 0.9
    """AdamW first-moment decay."""
    beta2: float = 0.95
    """AdamW second-moment decay."""
    eps: float = 1e-8
    """AdamW denominator epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = no clipping; the norm is still logged)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """fp32; bf16 or fp16 autocast compute with fp32 weights and optimizer state (fp16 with
    dynamic loss scaling); auto = bf16 on a GPU that supports it, else fp32."""
    compile: bool = False
    """torch.compile the model."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of storing them."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto (cuda if available)."""
    seed: int = 1337
    """Seeds the model init, the data order and dropout."""
    eval_every: int = 100
    """Evaluate on the validation shards every N steps (and at the end); 0 = only at the end."""
    eval_batches: int = 20
    """Validation batches per evaluation."""
    sample_tokens: int = 64
    """Tokens generated as a sample at each evaluation (0 = none)."""
    checkpoint_every: int = 500
    """Write a checkpoint every N steps (and at the end); 0 = only at the end."""
    keep_last: int = 2
    """Checkpoints kept besides the best by validation loss."""
    max_bad_steps: int = 5
    """Stop after this many steps in a row with a non-finite loss or gradient."""
    time_budget_s: float = 0.0
    """Stop after this many seconds of training (0 = no limit); the schedule still assumes
    max_steps."""
    pad_vocab_multiple: int = 1
    """Round the model's vocabulary (taken from the tokenizer) up to a multiple of this."""


@dataclass
class ParallelConfig:
    dp: int = 1
    """Data-parallel groups: each trains on its slice of the global batch. dp x tp x pp must
    equal the number of processes torchrun launches."""
    zero: int = 0
    """ZeRO stage over the data-parallel ranks: 0 = replicas (DDP), 1 = AdamW state sharded,
    2 = and gradients, 3 = and parameters (2 and 3 through FSDP2)."""
    tp: int = 1
    """Tensor-parallel ranks: attention heads and the MLP split across them (Megatron-style,
    DTensor); keep them inside one node."""
    sequence_parallel: bool = True
    """With tp > 1: norms, dropout and the residual stream sharded along the sequence too, so
    their activations are 1/tp each."""
    pp: int = 1
    """Pipeline stages: the blocks split into pp consecutive groups, one per rank; each
    optimizer step's micro-batches flow through them."""
    pp_schedule: Literal["1f1b", "gpipe"] = "1f1b"
    """Pipeline schedule: 1f1b (one forward, one backward: fewer activations held) or gpipe
    (all forwards, then all backwards)."""


@dataclass
class Config:
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """Tokenizer training."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data preparation: reading, filters, dedup, shards."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model shape (see scratchlm.model.config.PRESETS); vocab_size comes from the tokenizer."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Pretraining."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """How a run is spread over processes launched by torchrun."""


# ------------------------------------------------------------------------------------------------
# help text


@cache
def field_docs(cls: type) -> dict[str, str]:
    """{field name: docstring} read from the class source (attribute docstrings, PEP 257)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _as_typed(value: Any) -> str:
    """A value as one would type it after --key= (YAML: null, [a, b], 0.0006)."""
    if isinstance(value, tuple):
        value = list(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("...").strip()


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every leaf field, for `--help` style listings."""
    rows = []
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    default = cls()
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            rows += describe(hints[f.name], key + ".")
        else:
            rows.append((key, _as_typed(getattr(default, f.name)), docs.get(f.name, "")))
    return rows


# ------------------------------------------------------------------------------------------------
# building a config from plain data


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`, converting where it is lossless."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ScratchError(f"config {where}: expected a mapping of {tp.__name__} keys, "
                               f"got {value!r}")
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arm in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arm, where)
            except ScratchError as e:
                errors.append(str(e))
        raise ScratchError(errors[0] if len(errors) == 1 else
                           f"config {where}: {value!r} fits none of {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ScratchError(f"config {where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ScratchError(f"config {where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return out if origin is list else tuple(out)
    if origin is dict:
        if not isinstance(value, dict):
            raise ScratchError(f"config {where}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1] if args else Any, f"{where}.{k}")
                for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ScratchError(f"config {where}: expected {_type_name(tp)}, got {value!r} "
                       f"({type(value).__name__})")


def _unknown_key(key: str, valid: list[str], where: str) -> ScratchError:
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"did you mean '{where}{near[0]}'?" if near else f"valid keys: {', '.join(valid)}"
    return ScratchError(f"unknown config key '{where}{key}'; {hint}")


def from_dict(cls: type[T], data: dict, where: str = "") -> T:
    """Build dataclass `cls` from nested plain data, checking every key and type."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    prefix = f"{where}." if where else ""
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown_key(str(key), names, prefix)
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


# ------------------------------------------------------------------------------------------------
# YAML files and command-line overrides


def _field_type(cls: type, dotted: str) -> Any:
    """The annotation of a dotted key, with a did-you-mean error for a typo anywhere in it."""
    tp: Any = cls
    walked = ""
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(tp):
            raise ScratchError(f"config key '{dotted}': '{walked.rstrip('.')}' has no sub-keys")
        hints = typing.get_type_hints(tp)
        if part not in hints:
            raise _unknown_key(part, list(hints), walked)
        tp = hints[part]
        walked += part + "."
    return tp


def parse_override(arg: str, cls: type) -> tuple[str, Any]:
    """`--section.key=value` -> ("section.key", value). The value is read as YAML (numbers,
    booleans, lists like [a, b]) unless the field is a string, which takes the text as is."""
    body = arg[2:] if arg.startswith("--") else arg
    if "=" not in body:
        raise ScratchError(f"override {arg!r} must look like --section.key=value")
    key, raw = body.split("=", 1)
    tp = _field_type(cls, key)
    if tp is str:
        return key, raw
    try:
        return key, yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        return key, raw


def _set_dotted(data: dict, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for p in parents:
        node = data.setdefault(p, {})
        if not isinstance(node, dict):
            raise ScratchError(f"config key '{key}': '{p}' is not a section")
        data = node
    data[last] = value


def load_config(
    cls: type[T] = Config,  # type: ignore[assignment]
    path: str | os.PathLike | None = None,
    overrides: list[str] = (),  # type: ignore[assignment]
) -> T:
    """Defaults of `cls`, then the YAML file at `path`, then each `--section.key=value`."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ScratchError(f"config file {path} not found; see configs/ for the recipes")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark else ""
            raise ScratchError(f"config file {path} is not valid YAML{at}; fix its syntax"
                               ) from None
        if not isinstance(data, dict):
            raise ScratchError(f"config file {path} must be a mapping of sections")
    for arg in overrides:
        _set_dotted(data, *parse_override(arg, cls))
    return from_dict(cls, data)


def save_config(cfg: Any, path: str | os.PathLike) -> Path:
    from scratchlm.utils import atomic_write_text

    return atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
