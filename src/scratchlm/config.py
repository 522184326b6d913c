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
import math
import os
import textwrap
import types
import typing
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from scratchlm.data.config import DataConfig
from scratchlm.errors import ScratchError
from scratchlm.model.config import ModelConfig

T = TypeVar("T")


# ------------------------------------------------------------------------------------------------
# sections shared by the stages


def _require(ok: bool, message: str) -> None:
    """A config value out of its range: refused where the config is built, before any work."""
    if not ok:
        raise ScratchError(f"config {message}")


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

    def __post_init__(self) -> None:
        _require(self.vocab_size >= 256 + len(self.special_tokens),
                 f"tokenizer.vocab_size must be at least 256 (the byte tokens) + the special "
                 f"tokens, got {self.vocab_size}")
        _require(all(self.special_tokens), "tokenizer.special_tokens: a special token cannot "
                 "be empty")


# The recipes travel with the package; configs/ at the top of the repository links here.
RECIPES = Path(__file__).resolve().parent / "configs"


def resolve_recipe(name: str | None) -> Path | None:
    """A config path as given, or a recipe name from the project's configs/ directory."""
    if name is None:
        return None
    path = Path(name)
    if path.is_file() or path.suffix in (".yaml", ".yml"):
        return path
    recipe = RECIPES / f"{name}.yaml"
    if recipe.is_file():
        return recipe
    known = sorted(p.stem for p in recipe.parent.glob("*.yaml"))
    raise ScratchError(f"no config file {name!r} and no recipe of that name; recipes: "
                       f"{', '.join(known)}")


@dataclass
class TrainConfig:
    """The one training loop and its optimizer, the same for every stage (stages differ in
    their defaults)."""

    max_steps: int = 1000
    """Optimizer steps (see also epochs)."""
    epochs: float = 0.0
    """For stages trained on a set of examples: passes over the training set; when > 0 it
    sets max_steps (rounded up). A max_steps given without epochs sets a stage's default
    epochs to 0."""
    micro_batch: int = 8
    """Sequences (or examples) per forward pass on each process."""
    global_batch: int = 0
    """Sequences (or examples) per optimizer step over all processes (0 = one micro-batch on
    each); gradient accumulation makes up the difference."""
    global_batch_tokens: int = 0
    """Pretraining: tokens per optimizer step over all processes, instead of global_batch; a
    multiple of micro_batch * block_size * data-parallel processes."""
    lr: float = 6e-4
    """Peak learning rate, reached after warmup."""
    min_lr_ratio: float = 0.1
    """The decay (cosine, or wsd's cool-down) ends at lr * min_lr_ratio."""
    warmup_steps: int = 100
    """Optimizer steps of linear warmup, counted in steps under a time budget too (see
    warmup_fraction)."""
    warmup_fraction: float = 0.0
    """Warm-up as a share of the run instead of warmup_steps, when > 0: of max_steps, or of
    time_budget_s when that is set."""
    schedule: Literal["cosine", "wsd"] = "cosine"
    """cosine: warm-up, then cosine decay over the rest of the run. wsd (warmup-stable-decay):
    warm-up, the peak held, then a cool-down over the last decay_fraction of the run."""
    decay_fraction: float = 0.2
    """wsd: the share of the run (of max_steps, or of time_budget_s) spent cooling down."""
    decay_shape: Literal["linear", "cosine"] = "linear"
    """wsd: the cool-down's shape down to lr * min_lr_ratio, a straight line or half a cosine."""
    optimizer: Literal["adamw", "muon"] = "adamw"
    """adamw: AdamW for every parameter. muon: Muon (orthogonalised momentum, train/muon.py)
    for the blocks' weight matrices, AdamW for embeddings, head, norms and biases."""
    muon_lr: float = 0.02
    """optimizer=muon: peak learning rate of the Muon-trained matrices (same schedule as lr)."""
    muon_momentum: float = 0.95
    """optimizer=muon: Muon's (Nesterov) momentum."""
    embedding_lr: float = 0.0
    """Peak learning rate of the token and position embeddings (a tied head with them);
    0 = lr."""
    head_lr: float = 0.0
    """Peak learning rate of an untied output head; 0 = lr."""
    layer_decay: float = 1.0
    """Layer-wise learning-rate decay (ULMFiT's discriminative fine-tuning; ELECTRA, BEiT):
    block i of n_layer trains at its lr x layer_decay^(n_layer - i), the embeddings at
    layer_decay^(n_layer + 1); the final norm, the head and a stage's own modules at their
    lr. 1 = off."""
    weight_decay: float = 0.1
    """Decoupled weight decay (AdamW's, and Muon's with muon_lr), on weight matrices only
    (see train/optim.py)."""
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
    """Evaluate on the validation data every N steps (and at the end); 0 = only at the end."""
    eval_batches: int = 20
    """Validation batches per evaluation (0 = all of the validation data)."""
    sample_tokens: int = 64
    """Tokens generated as a sample at each evaluation (0 = none)."""
    checkpoint_every: int = 500
    """Write a checkpoint every N steps (and at the end); 0 = only at the end."""
    keep_last: int = 2
    """Checkpoints kept besides the best by validation loss."""
    keep_best: bool = False
    """End with the weights of the evaluation with the lowest validation loss, not the last
    step's (early stopping's choice; HF Trainer's load_best_model_at_end): each evaluation
    that improves writes a checkpoint, and the best one's weights become final/ and are the
    ones a stage's last metrics (its test split) read."""
    max_bad_steps: int = 5
    """Stop after this many steps in a row with a non-finite loss or gradient."""
    time_budget_s: float = 0.0
    """Stop after this many seconds of training (0 = no limit). The schedule then follows the
    clock: its position is the larger of steps / max_steps and seconds / time_budget_s, so a
    slower machine still cools down within the budget (max_steps is a cap); a warm-up of
    warmup_steps still counts steps, one of warmup_fraction a share of the budget."""
    pad_vocab_multiple: int = 1
    """Round the model's vocabulary (taken from the tokenizer) up to a multiple of this."""

    def __post_init__(self) -> None:
        positive = ["max_steps", "micro_batch", "lr", "max_bad_steps", "pad_vocab_multiple",
                    "beta1", "beta2", "eps"]
        for name in positive:
            _require(getattr(self, name) > 0, f"train.{name} must be > 0, got "
                     f"{getattr(self, name)}")
        at_least_zero = ["epochs", "global_batch", "global_batch_tokens", "warmup_steps",
                         "weight_decay", "grad_clip", "eval_every", "eval_batches",
                         "sample_tokens", "checkpoint_every", "keep_last", "time_budget_s",
                         "min_lr_ratio"]
        for name in at_least_zero:
            _require(getattr(self, name) >= 0, f"train.{name} must be >= 0, got "
                     f"{getattr(self, name)}")
        _require(self.beta1 < 1 and self.beta2 < 1, "train.beta1 and train.beta2 must be < 1")
        _require(self.min_lr_ratio <= 1, f"train.min_lr_ratio must be at most 1, got "
                 f"{self.min_lr_ratio}")
        _require(all(math.isfinite(getattr(self, n)) for n in ("lr", "eps", "grad_clip")),
                 "train.lr, train.eps and train.grad_clip must be finite numbers")
        _require(not (self.global_batch and self.global_batch_tokens),
                 "train: give global_batch or global_batch_tokens, not both")
        _require(self.muon_lr > 0 and 0 <= self.muon_momentum < 1
                 and self.embedding_lr >= 0 and self.head_lr >= 0,
                 "train.muon_lr must be > 0, train.muon_momentum in [0, 1), "
                 "train.embedding_lr and train.head_lr >= 0 (0 = lr)")
        _require(0 < self.layer_decay <= 1, f"train.layer_decay must be in (0, 1] (1 = off), "
                 f"got {self.layer_decay}")
        _require(0 <= self.warmup_fraction < 1 and 0 < self.decay_fraction <= 1,
                 f"train.warmup_fraction must be in [0, 1) and train.decay_fraction in (0, 1], "
                 f"got {self.warmup_fraction} and {self.decay_fraction}")
        _require(self.schedule != "wsd" or self.warmup_fraction + self.decay_fraction <= 1,
                 "train: warmup_fraction + decay_fraction must be at most 1 (the warm-up ends "
                 "before the cool-down starts)")


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

    def __post_init__(self) -> None:
        _require(min(self.dp, self.tp, self.pp) >= 1,
                 "parallel.dp, parallel.tp and parallel.pp must be at least 1")
        _require(self.zero in (0, 1, 2, 3), f"parallel.zero must be 0, 1, 2 or 3, got "
                 f"{self.zero}")


LORA_TARGETS = ("attn", "q", "k", "v", "o", "mlp", "head")


@dataclass
class LoRAConfig:
    rank: int = 0
    """Rank r of the update (0 = no LoRA: full fine-tuning)."""
    alpha: float = 16.0
    """Scale of the update: alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapters' input."""
    targets: list[str] = field(default_factory=lambda: ["attn"])
    """Layers that take adapters: attn (q, k, v, o), q, k, v, o, mlp, head."""

    def __post_init__(self) -> None:
        _require(self.rank >= 0, f"lora.rank must be >= 0, got {self.rank}")
        _require(self.alpha > 0, f"lora.alpha must be > 0, got {self.alpha}")
        _require(0 <= self.dropout < 1, f"lora.dropout must be in [0, 1), got {self.dropout}")
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        _require(not bad, f"lora.targets: {bad[0]!r} names no layer; choose from "
                 f"{', '.join(LORA_TARGETS)}" if bad else "")
        _require(not self.rank or bool(self.targets),
                 "lora.targets is empty; name the layers to adapt")


# ------------------------------------------------------------------------------------------------
# one config per stage: its own section, the shared loop and layout


@dataclass
class Config:
    """`scratchlm pretrain` (and `demo`)."""

    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """Tokenizer training."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data preparation: reading, filters, dedup, shards."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model shape (see scratchlm.model.config.PRESETS); vocab_size comes from the tokenizer."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The training loop and optimizer."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """How a run is spread over processes launched by torchrun."""


PretrainConfig = Config


@dataclass
class ClassifySection:
    model: str = ""
    """The model to start from: a scratchlm run directory (its final/), a model directory, or
    a Hugging Face GPT-2 / Llama directory (save_pretrained)."""
    tokenizer: str | None = None
    """Tokenizer directory when it is not saved beside the model."""
    data: str | None = None
    """One labelled file split into train/val/test by `split`, or builtin:genre (the genre of
    a Shakespeare scene, split by play)."""
    train_file: str | None = None
    """Training examples (with val_file and test_file, instead of data)."""
    val_file: str | None = None
    """Validation examples."""
    test_file: str | None = None
    """Test examples (optional)."""
    text_field: str = "text"
    """Field (JSONL), column (parquet, CSV/TSV with a header) holding the text."""
    label_field: str = "label"
    """Field or column holding the label."""
    columns: list[str] | None = None
    """Column names of a CSV/TSV file without a header row (a headerless two-column file is
    read as [label, text], the SMS Spam Collection's form)."""
    split: list[float] = field(default_factory=lambda: [0.7, 0.1, 0.2])
    """Train / validation / test fractions of `data`, shuffled with `seed`."""
    seed: int = 123
    """Seed of the split and of undersampling."""
    balance: Literal["none", "undersample"] = "none"
    """undersample: drop examples of the larger classes at random until every class has as
    many as the smallest (before splitting), the book's protocol for SMS spam."""
    max_length: int | None = None
    """Most tokens of an example (longer ones are cut at the end, counted and reported);
    None = the model's context."""
    pooling: Literal["last", "mean", "max"] = "last"
    """The sequence summary the head reads: the last real token's hidden state, or the mean or
    each channel's max over real tokens."""
    trainable: Literal["head", "last", "all"] = "last"
    """What trains: the head only; the last `last_blocks` blocks + final norm + head (the
    book's recipe); or everything."""
    last_blocks: int = 1
    """Blocks trained with trainable=last."""
    lm_weight: float = 0.0
    """Weight of an auxiliary language-model loss on each example's own text, added to the
    classification loss (GPT-1, Radford et al. 2018, used 0.5); 0 = off. Validation and test
    losses stay the classification loss alone."""
    dropout: float | None = None
    """Dropout while fine-tuning, at every dropout of the model (attention's included); None
    keeps the rate the model was pretrained with (its config's)."""

    def __post_init__(self) -> None:
        _require(len(self.split) == 3 and all(f >= 0 for f in self.split)
                 and abs(sum(self.split) - 1) < 1e-6 and self.split[0] > 0,
                 f"classify.split must be three fractions summing to 1 (train > 0), got "
                 f"{self.split}")
        _require(self.max_length is None or self.max_length > 1,
                 f"classify.max_length must be > 1, got {self.max_length}")
        _require(self.last_blocks >= 1, f"classify.last_blocks must be >= 1, got "
                 f"{self.last_blocks}")
        _require(self.lm_weight >= 0, f"classify.lm_weight must be >= 0, got {self.lm_weight}")
        _require(self.dropout is None or 0 <= self.dropout < 1,
                 f"classify.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class ClassifyConfig:
    """`scratchlm finetune classify`."""

    classify: ClassifySection = field(default_factory=ClassifySection)
    """The task: data, labels, head and what trains."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_steps=1000, epochs=5, micro_batch=8, lr=5e-5, warmup_steps=10, weight_decay=0.1,
        eval_every=50, eval_batches=0, sample_tokens=0, checkpoint_every=0, keep_last=1))
    """The training loop and optimizer."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA adapters instead of full fine-tuning (rank > 0): the base frozen, adapters and
    the head train."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Data-parallel layouts (DDP, ZeRO-1/2/3) over processes launched by torchrun."""


@dataclass
class SFTSection:
    model: str = ""
    """The model to start from: a scratchlm run directory (its final/), a model directory, or
    a Hugging Face GPT-2 / Llama directory."""
    tokenizer: str | None = None
    """Tokenizer directory when it is not saved beside the model."""
    data: str = ""
    """Instruction data: an Alpaca JSON/JSONL file (instruction, input, output), a chat JSONL
    file ({"messages": [...]}), or builtin:speaker, builtin:continue, builtin:genre."""
    val_data: str | None = None
    """A separate validation file (then `data` is split into train and test only)."""
    template: Literal["alpaca", "chat"] = "alpaca"
    """Prompt template: alpaca (the book's), or chat (role tokens, added to the tokenizer)."""
    split: list[float] = field(default_factory=lambda: [0.85, 0.05, 0.10])
    """Train / validation / test fractions of `data` (the book's 85/5/10), shuffled with
    `seed`; built-in tasks are split by play instead."""
    seed: int = 123
    """Seed of the split."""
    max_length: int | None = None
    """Most tokens of an example (or a packed block); None = the model's context."""
    too_long: Literal["cut", "drop", "error"] = "cut"
    """An example longer than max_length: cut at the end (counted and reported; one whose
    response is cut away entirely is dropped), dropped (counted), or an error."""
    train_on_prompt: bool = False
    """Put the loss on the prompt's tokens too, not only on the response's."""
    packing: bool = False
    """Pack several examples into each sequence of max_length tokens (less padding; an
    example may attend to the ones before it in its block)."""
    eval_examples: int = 100
    """Test examples to answer by greedy generation at the end (0 = all)."""
    max_new_tokens: int = 96
    """Most tokens of a generated answer."""
    dropout: float | None = None
    """Dropout while fine-tuning, at every dropout of the model (attention's included); None
    keeps the rate the model was pretrained with (its config's)."""

    def __post_init__(self) -> None:
        _require(len(self.split) == 3 and all(f >= 0 for f in self.split)
                 and abs(sum(self.split) - 1) < 1e-6 and self.split[0] > 0,
                 f"sft.split must be three fractions summing to 1 (train > 0), got "
                 f"{self.split}")
        _require(self.dropout is None or 0 <= self.dropout < 1,
                 f"sft.dropout must be in [0, 1), got {self.dropout}")
        _require(self.max_length is None or self.max_length > 1,
                 f"sft.max_length must be > 1, got {self.max_length}")
        _require(self.eval_examples >= 0 and self.max_new_tokens > 0,
                 "sft.eval_examples must be >= 0 and sft.max_new_tokens > 0")


@dataclass
class SFTConfig:
    """`scratchlm finetune sft`."""

    sft: SFTSection = field(default_factory=SFTSection)
    """The task: data, template, collation."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_steps=1000, epochs=2, micro_batch=8, lr=5e-5, warmup_steps=10, weight_decay=0.1,
        eval_every=50, eval_batches=0, sample_tokens=0, checkpoint_every=0, keep_last=1))
    """The training loop and optimizer."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA adapters instead of full fine-tuning (rank > 0)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Layouts over processes launched by torchrun (tensor and pipeline parallelism without
    LoRA only)."""


# ------------------------------------------------------------------------------------------------
# alignment: reward model, DPO, PPO, GRPO (scratchlm.align)


def _check_split(section: str, split: list[float]) -> None:
    _require(len(split) == 3 and all(f >= 0 for f in split) and abs(sum(split) - 1) < 1e-6
             and split[0] > 0, f"{section}.split must be three fractions summing to 1 "
             f"(train > 0), got {split}")


@dataclass
class RewardSection:
    model: str = ""
    """The model to start from (an SFT model, usually): a run directory, a model directory
    or a Hugging Face directory."""
    tokenizer: str | None = None
    """Tokenizer directory when it is not saved beside the model."""
    data: str = ""
    """Preference pairs (JSON/JSONL: {prompt, chosen, rejected}, chat messages, or Alpaca
    {instruction, input, chosen, rejected}), or builtin:continue / builtin:speaker."""
    template: Literal["alpaca", "chat"] | None = None
    """Prompt template; None = the model's own (its template.json), else alpaca."""
    split: list[float] = field(default_factory=lambda: [0.85, 0.05, 0.10])
    """Train / validation / test fractions of a file, shuffled with `seed` (built-in sets are
    split by play)."""
    seed: int = 123
    """Seed of the split."""
    identical: Literal["error", "drop"] = "error"
    """A pair whose chosen and rejected responses are the same text: an error, or dropped
    (and counted)."""
    max_length: int | None = None
    """Most tokens of prompt + response; None = the model's context."""
    max_prompt_length: int | None = None
    """A longer sequence first loses the start of its prompt, down to this many tokens (None
    = half of max_length); then the end of its response."""
    trainable: Literal["head", "last", "all"] = "all"
    """What trains: the head only; the last `last_blocks` blocks + final norm + head; or
    everything."""
    last_blocks: int = 1
    """Blocks trained with trainable=last."""
    center_rewards: float = 0.0
    """Weight of a penalty on the squared sum of a pair's rewards, which keeps scores centred
    on zero (TRL's center_rewards_coefficient; Eisenstein et al. 2023 use 0.01)."""

    def __post_init__(self) -> None:
        _check_split("reward", self.split)
        _require(self.max_length is None or self.max_length > 2,
                 f"reward.max_length must be > 2, got {self.max_length}")
        _require(self.last_blocks >= 1 and self.center_rewards >= 0,
                 "reward.last_blocks must be >= 1 and reward.center_rewards >= 0")


@dataclass
class RewardConfig:
    """`scratchlm align reward`."""

    reward: RewardSection = field(default_factory=RewardSection)
    """The data and the reward head."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_steps=1000, epochs=1, micro_batch=8, lr=5e-5, warmup_steps=10, weight_decay=0.0,
        eval_every=50, eval_batches=0, sample_tokens=0, checkpoint_every=0, keep_last=1))
    """The training loop and optimizer (micro_batch and global_batch count pairs)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Data-parallel layouts (DDP, ZeRO-1/2/3) over processes launched by torchrun."""


@dataclass
class DPOSection:
    model: str = ""
    """The policy to start from (an SFT model, usually); also the reference unless
    ref_model names another."""
    tokenizer: str | None = None
    """Tokenizer directory when it is not saved beside the model."""
    ref_model: str | None = None
    """The reference model; None = the starting model. It must share the policy's
    tokenizer."""
    data: str = ""
    """Preference pairs, as for `align reward`."""
    template: Literal["alpaca", "chat"] | None = None
    """Prompt template; None = the model's own (its template.json), else alpaca."""
    split: list[float] = field(default_factory=lambda: [0.85, 0.05, 0.10])
    """Train / validation / test fractions of a file, shuffled with `seed`."""
    seed: int = 123
    """Seed of the split."""
    identical: Literal["error", "drop"] = "error"
    """A pair whose chosen and rejected responses are the same text: an error, or dropped."""
    max_length: int | None = None
    """Most tokens of prompt + response; None = the model's context."""
    max_prompt_length: int | None = None
    """A longer sequence first loses the start of its prompt, down to this many tokens (None
    = half of max_length); then the end of its response."""
    beta: float = 0.1
    """β: how far the policy may move from the reference (the DPO paper's and TRL's 0.1);
    IPO's τ with loss=ipo."""
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    """sigmoid: DPO's -log σ(β Δ) (Rafailov et al. 2023); ipo: (Δ/length - 1/(2β))² (Azar
    et al. 2023), on per-token log-ratios as TRL computes it."""
    label_smoothing: float = 0.0
    """ε of conservative DPO: the labels are flipped with probability ε (sigmoid loss)."""
    reduction: Literal["sum", "mean"] = "sum"
    """A response's log-probability: the sum over its tokens (the DPO paper, TRL) or their
    mean (the book's chapter); see the README."""
    reference: Literal["precomputed", "live"] = "precomputed"
    """precomputed: the reference's log-probs of every pair once, before training (no second
    model held); live: the reference model runs beside the policy at each step."""
    sample_prompts: int = 5
    """Held-out prompts answered (greedy) before and after training, for responses.md."""
    max_new_tokens: int = 64
    """Most tokens of those answers."""

    def __post_init__(self) -> None:
        _check_split("dpo", self.split)
        _require(self.max_length is None or self.max_length > 2,
                 f"dpo.max_length must be > 2, got {self.max_length}")
        _require(self.beta > 0, f"dpo.beta must be > 0, got {self.beta}")
        _require(0 <= self.label_smoothing < 0.5,
                 f"dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        _require(self.sample_prompts >= 0 and self.max_new_tokens > 0,
                 "dpo.sample_prompts must be >= 0 and dpo.max_new_tokens > 0")


@dataclass
class DPOConfig:
    """`scratchlm align dpo`."""

    dpo: DPOSection = field(default_factory=DPOSection)
    """The data, the loss and the reference."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_steps=1000, epochs=1, micro_batch=4, lr=5e-6, warmup_steps=10, weight_decay=0.0,
        eval_every=50, eval_batches=0, sample_tokens=0, checkpoint_every=0, keep_last=1))
    """The training loop and optimizer (micro_batch and global_batch count pairs)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Data-parallel layouts (DDP, ZeRO-1/2/3) over processes launched by torchrun."""


@dataclass
class RolloutSection:
    batch: int = 32
    """Prompts sampled per rollout, over all processes (GRPO samples num_generations responses
    for each)."""
    max_new_tokens: int = 32
    """Most tokens of a sampled response."""
    temperature: float = 1.0
    """Sampling temperature of rollouts (and of the held-out evaluation's samples)."""
    top_k: int | None = None
    """Sample among the k most likely tokens only (None = all)."""
    top_p: float | None = None
    """Nucleus sampling threshold (None = off)."""
    max_prompt_length: int | None = None
    """Most prompt tokens (longer prompts lose their start); None = the context less
    max_new_tokens."""
    eval_prompts: int = 64
    """Held-out prompts answered at each evaluation (0 = all of them)."""
    missing_eos_penalty: float = 0.0
    """Subtracted from the score of a response that did not end (cut at max_new_tokens)."""

    def __post_init__(self) -> None:
        _require(self.batch > 0 and self.max_new_tokens > 0 and self.temperature > 0,
                 "rollout.batch and rollout.max_new_tokens must be > 0 and "
                 "rollout.temperature > 0 (rollouts are sampled)")
        _require(self.eval_prompts >= 0 and self.missing_eos_penalty >= 0,
                 "rollout.eval_prompts and rollout.missing_eos_penalty must be >= 0")


@dataclass
class PPOSection:
    model: str = ""
    """The policy to start from (an SFT model, usually); also the frozen reference unless
    ref_model names another."""
    tokenizer: str | None = None
    """Tokenizer directory when it is not saved beside the model."""
    ref_model: str | None = None
    """The reference model of the KL penalty; None = the starting model. It must share the
    policy's tokenizer."""
    data: str = ""
    """Prompts: JSONL {prompt} (a string or chat messages) or {messages}, a preference or
    Alpaca file (their prompts), or builtin:continue / builtin:speaker / builtin:genre."""
    reward_model: str | None = None
    """A reward model trained by `align reward` that scores each response at its end."""
    reward: str | None = None
    """Instead of a reward model: module:function or path/file.py:function, called as
    fn(prompt, response) -> float; or builtin:thou, builtin:verse."""
    template: Literal["alpaca", "chat"] | None = None
    """Prompt template; None = the model's own (its template.json), else alpaca."""
    split: list[float] = field(default_factory=lambda: [0.85, 0.05, 0.10])
    """Train / validation / test fractions of a file's prompts, shuffled with `seed`."""
    seed: int = 123
    """Seed of the split."""
    epochs: int = 4
    """Passes over each rollout (minibatches of train.global_batch responses)."""
    kl_coef: float = 0.05
    """β of the per-token KL penalty against the reference (the initial value when adaptive)."""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """Per-token KL estimate: k1 = log π - log π_ref; k3 = (r - 1) - log r, r = π_ref / π."""
    adaptive_kl: bool = False
    """Adapt kl_coef after each rollout towards kl_target (Ziegler et al. 2019)."""
    kl_target: float = 6.0
    """Target KL per response (nats) of the adaptive controller."""
    kl_horizon: int = 10000
    """Horizon of the adaptive controller, in responses."""
    gamma: float = 1.0
    """Discount of GAE."""
    lam: float = 0.95
    """λ of GAE."""
    cliprange: float = 0.2
    """ε of the clipped policy loss."""
    cliprange_value: float = 0.2
    """Clip range of the value loss around the rollout's values."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    entropy_coef: float = 0.0
    """Weight of an entropy bonus (0 = none; entropy is logged either way)."""
    whiten_rewards: bool = False
    """Whiten the per-token rewards over the rollout (scale only, mean kept) before GAE."""

    def __post_init__(self) -> None:
        _check_split("ppo", self.split)
        _require(self.epochs >= 1 and self.kl_coef >= 0 and self.kl_target > 0
                 and self.kl_horizon > 0, "ppo.epochs must be >= 1, ppo.kl_coef >= 0, "
                 "ppo.kl_target and ppo.kl_horizon > 0")
        _require(0 < self.gamma <= 1 and 0 <= self.lam <= 1,
                 "ppo.gamma must be in (0, 1] and ppo.lam in [0, 1]")
        _require(self.cliprange > 0 and self.cliprange_value > 0 and self.vf_coef >= 0,
                 "ppo.cliprange and ppo.cliprange_value must be > 0, ppo.vf_coef >= 0")


_RL_TRAIN = dict(max_steps=200, micro_batch=8, lr=1e-5, min_lr_ratio=1.0, warmup_steps=0,
                 weight_decay=0.0, eval_every=20, eval_batches=0, sample_tokens=0,
                 checkpoint_every=0, keep_last=1)


@dataclass
class PPOConfig:
    """`scratchlm align ppo`."""

    ppo: PPOSection = field(default_factory=PPOSection)
    """Model, prompts, reward and the PPO update."""
    rollout: RolloutSection = field(default_factory=RolloutSection)
    """How responses are sampled."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(**_RL_TRAIN))
    """The training loop and optimizer (global_batch: responses per minibatch)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Data parallelism (DDP, ZeRO-1) over processes launched by torchrun."""


@dataclass
class GRPOSection:
    model: str = ""
    """The policy to start from; also the frozen reference unless ref_model names another."""
    tokenizer: str | None = None
    """Tokenizer directory when it is not saved beside the model."""
    ref_model: str | None = None
    """The reference model of the KL term; None = the starting model."""
    data: str = ""
    """Prompts, as for `align ppo`."""
    reward_model: str | None = None
    """A reward model trained by `align reward`."""
    reward: str | None = None
    """Instead of a reward model: module:function, path/file.py:function, builtin:thou or
    builtin:verse."""
    template: Literal["alpaca", "chat"] | None = None
    """Prompt template; None = the model's own (its template.json), else alpaca."""
    split: list[float] = field(default_factory=lambda: [0.85, 0.05, 0.10])
    """Train / validation / test fractions of a file's prompts, shuffled with `seed`."""
    seed: int = 123
    """Seed of the split."""
    num_generations: int = 4
    """Responses sampled per prompt: a group, whose rewards give each other's baseline."""
    beta: float = 0.04
    """Weight of the KL term (k3 estimate) against the reference (DeepSeekMath's 0.04; TRL
    now defaults to 0)."""
    epsilon: float = 0.2
    """Lower clip of the probability ratio, 1 - ε."""
    epsilon_high: float | None = None
    """Upper clip, 1 + ε_high (DAPO's clip-higher); None = epsilon."""
    loss_type: Literal["dapo", "grpo", "dr_grpo"] = "dapo"
    """How token losses are averaged, as TRL names them: dapo, over every response token of
    the global batch (TRL's default); grpo, per response then over responses; dr_grpo, over
    responses x max_new_tokens."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Divide advantages by the group's reward std (GRPO), the batch's, or not at all
    (Dr. GRPO)."""
    epochs: int = 1
    """Passes over each rollout (TRL's num_iterations, μ)."""

    def __post_init__(self) -> None:
        _check_split("grpo", self.split)
        _require(self.num_generations >= 2, f"grpo.num_generations must be >= 2 (a group "
                 f"is its own baseline), got {self.num_generations}")
        _require(self.beta >= 0 and self.epsilon > 0 and self.epochs >= 1
                 and (self.epsilon_high is None or self.epsilon_high > 0),
                 "grpo.beta must be >= 0, grpo.epsilon and grpo.epsilon_high > 0, "
                 "grpo.epochs >= 1")


@dataclass
class GRPOConfig:
    """`scratchlm align grpo`."""

    grpo: GRPOSection = field(default_factory=GRPOSection)
    """Model, prompts, reward and the GRPO update."""
    rollout: RolloutSection = field(default_factory=RolloutSection)
    """How responses are sampled."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(**_RL_TRAIN))
    """The training loop and optimizer (global_batch: responses per minibatch)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Data parallelism (DDP, ZeRO-1) over processes launched by torchrun."""


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


def describe(cls: type, prefix: str = "", default: Any = None) -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every leaf field, for `--help` style listings. A
    section's defaults are those its parent gives it (a stage's own train defaults)."""
    rows = []
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    default = cls() if default is None else default
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            rows += describe(hints[f.name], key + ".", getattr(default, f.name))
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


def _changed(value: Any, reference: Any) -> dict:
    """The fields of dataclass `value` that differ from `reference`'s, nested sections
    compared field by field."""
    out = {}
    for f in dataclasses.fields(value):
        mine, theirs = getattr(value, f.name), getattr(reference, f.name)
        if dataclasses.is_dataclass(mine):
            if inner := _changed(mine, theirs):
                out[f.name] = inner
        elif mine != theirs:
            out[f.name] = mine
    return out


def _merge(base: dict, top: dict) -> dict:
    return {**base, **{k: _merge(base[k], v) if isinstance(v, dict) and
                       isinstance(base.get(k), dict) else v for k, v in top.items()}}


@cache
def _section_defaults(cls: type, name: str) -> dict:
    """What a stage's config sets differently in one of its sections (the loop's defaults for
    fine-tuning, say), so that overriding one key keeps the stage's other defaults."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
        return {}
    value = f.default_factory()  # type: ignore[misc]
    return _changed(value, type(value)()) if dataclasses.is_dataclass(value) else {}


def from_dict(cls: type[T], data: dict, where: str = "") -> T:
    """Build dataclass `cls` from nested plain data, checking every key and type."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    prefix = f"{where}." if where else ""
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown_key(str(key), names, prefix)
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            value = _merge(_section_defaults(cls, key), value)
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
    booleans, lists like [a, b]) unless the field is a string (or a string or null), which
    takes the text as is."""
    body = arg[2:] if arg.startswith("--") else arg
    if "=" not in body:
        raise ScratchError(f"override {arg!r} must look like --section.key=value")
    key, raw = body.split("=", 1)
    tp = _field_type(cls, key)
    if tp is str:
        return key, raw
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and \
            set(typing.get_args(tp)) == {str, type(None)}:
        # A string-or-null field takes the text as given ("\n\n", "---", "1e3" stay text);
        # only the word null means None.
        return key, None if raw == "null" else raw
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
    train = data.get("train")
    if isinstance(train, dict) and "max_steps" in train and "epochs" not in train:
        # Steps asked for and epochs not: the run is max_steps long, whatever number of
        # epochs the stage defaults to (as max_steps overrides epochs in HF's Trainer).
        train["epochs"] = 0
    return from_dict(cls, data)


def save_config(cfg: Any, path: str | os.PathLike) -> Path:
    from scratchlm.utils import atomic_write_text

    return atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
