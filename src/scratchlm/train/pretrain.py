"""`scratchlm pretrain`: tokenizer -> data -> model -> the training loop, each reused when
already built. Pretraining is one objective of the loop: next-token cross-entropy on windows of
token shards, validated in bits per byte.

RUN/
  config.yaml         the resolved config of this run
  tokenizer/          trained on data.inputs (unless tokenizer.path is given)
  data/               shards prepared from data.inputs (unless data.shards is given)
  checkpoints/step-NNNNNN/, final/, metrics.jsonl, metrics.csv, loss.png, summary.json
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from scratchlm.config import Config, to_dict
from scratchlm.data.builtin import BUILTIN_NAME, split_inputs
from scratchlm.data.loader import TokenLoader, iter_eval_windows, read_manifest
from scratchlm.data.prepare import MANIFEST, prepare, tokenizer_fingerprint
from scratchlm.errors import ScratchError
from scratchlm.eval.perplexity import evaluate_batches, token_byte_lengths
from scratchlm.model.gpt import GPT
from scratchlm.model.logprobs import cross_entropy_sum
from scratchlm.parallel import barrier, init_distributed, print0
from scratchlm.tokenizer import BPETokenizer
from scratchlm.train.objective import Objective
from scratchlm.utils import atomic_write_text

EVAL_BATCH = 8  # validation windows per forward pass


class PretrainObjective(Objective):
    """Next-token prediction on the training shards of `data_dir`; evaluation: loss,
    perplexity and bits per byte on (the first `eval_batches` batches of) its validation
    shards; a sample from <|endoftext|> at each evaluation."""

    name = "pretraining"
    token_level = True

    def __init__(self, data_dir: Path, tokenizer: BPETokenizer, fingerprint: str,
                 block_size: int, vocab_size: int, eval_batches: int,
                 sample_tokens: int) -> None:
        super().__init__()
        self.data_dir, self.tokenizer, self.block_size = Path(data_dir), tokenizer, block_size
        self.eval_batches, self.sample_tokens = eval_batches, sample_tokens
        self.fingerprint = fingerprint
        self.byte_lengths = token_byte_lengths(tokenizer, vocab_size)
        manifest = read_manifest(self.data_dir)
        cfg = manifest.get("config", {})
        asked_for_none = cfg.get("val_fraction", 1) == 0 and not cfg.get("val_inputs")
        self.validate = not asked_for_none
        if self.validate and manifest["tokens_val"] <= block_size:
            # No validation tokens would read as a perfect 0.000 bits per byte.
            raise ScratchError(
                f"{self.data_dir}: the validation split has {manifest['tokens_val']:,} tokens, "
                f"less than one window of {block_size + 1}; raise data.val_fraction, give "
                "data.val_inputs, or set data.val_fraction=0 to train without validation")

    def batches(self, micro_batch: int, seed: int, rank: int, world_size: int) -> TokenLoader:
        return TokenLoader(self.data_dir, "train", self.block_size, micro_batch, seed=seed,
                           rank=rank, world_size=world_size,
                           tokenizer_fingerprint=self.fingerprint)

    def global_batch(self, train) -> int:
        if not train.global_batch_tokens:
            return train.global_batch
        if train.global_batch_tokens % self.block_size:
            raise ScratchError(
                f"train.global_batch_tokens ({train.global_batch_tokens}) must be a multiple "
                f"of micro_batch x block_size x data-parallel ranks (block_size "
                f"{self.block_size})")
        return train.global_batch_tokens // self.block_size

    def token_loss(self, logits: torch.Tensor, targets: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        return cross_entropy_sum(logits, targets)

    def evaluate(self, runtime) -> dict[str, float]:
        if not self.validate:
            return {}
        batches = iter_eval_windows(self.data_dir, self.block_size, EVAL_BATCH,
                                    self.eval_batches or None)
        return evaluate_batches(runtime.logits, batches, self.byte_lengths, runtime.device,
                                runtime.autocast(), runtime.stage_group)

    def sample(self, model: GPT, step: int) -> str:
        from scratchlm.generate import generate_text

        n = min(self.sample_tokens, self.block_size - 1)
        if n <= 0:
            return ""
        was_training = model.training
        text = generate_text(model, self.tokenizer, "<|endoftext|>", n, temperature=0.8,
                             top_k=50, seed=step, stop_at_eot=True)
        model.train(was_training)
        return text


# ------------------------------------------------------------------------------------------------
# building what a run needs


def input_texts(cfg: Config) -> Iterator[str]:
    """The texts of data.inputs ("builtin" = the Shakespeare scenes), for tokenizer training."""
    from scratchlm.data.readers import iter_documents

    paths, builtin = split_inputs(cfg.data.inputs)
    if builtin is not None:
        yield from builtin
    yield from (d.text for d in iter_documents(paths, cfg.data.text_field, cfg.data.separator,
                                               cfg.data.errors))


def _tokenizer_stamp(cfg: Config) -> str:
    return json.dumps({"tokenizer": to_dict(cfg.tokenizer), "inputs": cfg.data.inputs},
                      sort_keys=True)


def check_tokenizer(cfg: Config, out: Path) -> None:
    """Refuse, before anything is written, a run directory whose tokenizer was trained with
    other settings (it would be replaced under the data and checkpoints built on it)."""
    stamp = out / "tokenizer" / "trained_with.json"
    if cfg.tokenizer.path is None and stamp.is_file() and \
            stamp.read_text() != _tokenizer_stamp(cfg):
        raise ScratchError(f"{out / 'tokenizer'} was trained with other tokenizer settings or "
                           "inputs; use another --out, or delete that run to start again")


def ensure_tokenizer(cfg: Config, out: Path, progress: bool = True) -> Path:
    if cfg.tokenizer.path:
        return Path(cfg.tokenizer.path)
    check_tokenizer(cfg, out)
    tok_dir = out / "tokenizer"
    stamp = tok_dir / "trained_with.json"
    if stamp.is_file():
        print0(f"[tokenizer] reusing {tok_dir}")
        return tok_dir
    print(f"[tokenizer] training a {cfg.tokenizer.vocab_size:,}-token byte-level BPE")
    tok = BPETokenizer.train(input_texts(cfg), cfg.tokenizer.vocab_size, cfg.tokenizer.pattern,
                             cfg.tokenizer.special_tokens, errors=cfg.data.errors,
                             progress=progress)
    tok.save(tok_dir)
    atomic_write_text(stamp, _tokenizer_stamp(cfg))
    return tok_dir


def check_data(cfg: Config, out: Path, tok_dir: Path | None = None) -> None:
    """Refuse data inputs the pipeline cannot prepare, and prepared shards in the run directory
    made with another tokenizer or data config: before the tokenizer trains on them."""
    if cfg.data.shards:
        return
    paths, builtin = split_inputs(cfg.data.inputs)
    if builtin is not None and paths:
        raise ScratchError("data.inputs: use either 'builtin' or paths, not both; the "
                           "built-in corpus is prepared on its own")
    data_dir = out / "data"
    if not (data_dir / MANIFEST).is_file():
        return
    manifest = read_manifest(data_dir)
    same_tok = tok_dir is None or \
        manifest["tokenizer"]["fingerprint"] == tokenizer_fingerprint(tok_dir)
    if not same_tok or manifest["config"] != dataclasses.asdict(cfg.data):
        raise ScratchError(f"{data_dir} was prepared with another tokenizer or data config; "
                           "delete it (or use another run directory) to prepare again")


def ensure_data(cfg: Config, out: Path, tok_dir: Path, progress: bool = True) -> Path:
    if cfg.data.shards:
        return Path(cfg.data.shards)
    check_data(cfg, out, tok_dir)
    data_dir = out / "data"
    if (data_dir / MANIFEST).is_file():
        print0(f"[data] reusing {data_dir}")
        return data_dir
    paths, builtin = split_inputs(cfg.data.inputs)
    print("[data] preparing shards")
    prepare(paths, tok_dir, data_dir, cfg.data, progress=progress, documents=builtin,
            documents_name=BUILTIN_NAME)
    return data_dir


def build_model(cfg: Config, tokenizer: BPETokenizer) -> tuple[GPT, Config]:
    """The model, its vocabulary taken from the tokenizer (rounded up if so configured)."""
    m = cfg.train.pad_vocab_multiple
    vocab = -(-tokenizer.vocab_size // m) * m
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))
    torch.manual_seed(cfg.train.seed)
    return GPT(cfg.model), cfg


def run_pretraining(cfg: Config, out: Path, resume: bool = False, progress: bool = True,
                    prepared: tuple[Path, Path] | None = None) -> dict:
    """The whole run; `prepared` = (tokenizer dir, shard dir) when the caller built them."""
    from scratchlm.train.trainer import Trainer, resolve_device, start_run

    if (done := start_run(out, resume, cfg.train.max_steps)) is not None:
        return done
    dist = init_distributed(resolve_device(cfg.train.device), cfg.parallel, cfg.model)
    if prepared is None:
        check_tokenizer(cfg, out)
        check_data(cfg, out)
        # Rank 0 builds the tokenizer and shards; the others wait, then find them built.
        if dist.is_main:
            tok_dir = ensure_tokenizer(cfg, out, progress)
            prepared = tok_dir, ensure_data(cfg, out, tok_dir, progress)
        barrier()
        if not dist.is_main:
            tok_dir = ensure_tokenizer(cfg, out, progress=False)
            prepared = tok_dir, ensure_data(cfg, out, tok_dir, progress=False)
    tok_dir, data_dir = prepared
    tokenizer = BPETokenizer.load(tok_dir)
    model, cfg = build_model(cfg, tokenizer)
    objective = PretrainObjective(data_dir, tokenizer, tokenizer_fingerprint(tok_dir),
                                  cfg.model.block_size,
                                  cfg.model.vocab_size, cfg.train.eval_batches,
                                  cfg.train.sample_tokens)
    print0(model.summary())
    trainer = Trainer(cfg.train, cfg.parallel, model, objective, out, cfg, tokenizer, resume,
                      progress, dist)
    layout = f" (dp {dist.dp} x tp {dist.tp} x pp {dist.pp}, ZeRO-{trainer.runtime.zero})" \
        if dist.world_size > 1 else ""
    print0(f"[train] {trainer.precision} on {trainer.device} x {dist.world_size} process(es)"
           f"{layout}, {trainer.global_batch * cfg.model.block_size:,} tokens per step "
           f"({trainer.accumulation} micro-batch(es) of {cfg.train.micro_batch} x "
           f"{cfg.model.block_size} per data-parallel rank), {trainer.max_steps} steps")
    return trainer.run()
