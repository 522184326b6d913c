"""`scratchlm pretrain`: tokenizer -> data -> model -> Trainer, each reused when already built.

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

from scratchlm.config import Config, save_config, to_dict
from scratchlm.data.loader import read_manifest
from scratchlm.data.prepare import MANIFEST, prepare, tokenizer_fingerprint
from scratchlm.errors import ScratchError
from scratchlm.model.gpt import GPT
from scratchlm.parallel import barrier, init_distributed, print0
from scratchlm.tokenizer import BPETokenizer
from scratchlm.utils import atomic_write_text


def input_texts(cfg: Config) -> Iterator[str]:
    """The texts of data.inputs ("builtin" = the Shakespeare scenes), for tokenizer training."""
    from scratchlm.data.builtin import iter_scenes
    from scratchlm.data.readers import iter_documents

    for item in cfg.data.inputs:
        if item == "builtin":
            yield from (s.text for s in iter_scenes())
        else:
            yield from (d.text for d in iter_documents([item], cfg.data.text_field,
                                                       cfg.data.separator, cfg.data.errors))


def ensure_tokenizer(cfg: Config, out: Path, progress: bool = True) -> Path:
    if cfg.tokenizer.path:
        return Path(cfg.tokenizer.path)
    tok_dir = out / "tokenizer"
    stamp = tok_dir / "trained_with.json"
    wanted = json.dumps({"tokenizer": to_dict(cfg.tokenizer), "inputs": cfg.data.inputs},
                        sort_keys=True)
    if stamp.is_file() and stamp.read_text() == wanted:
        print0(f"[tokenizer] reusing {tok_dir}")
        return tok_dir
    print(f"[tokenizer] training a {cfg.tokenizer.vocab_size:,}-token byte-level BPE")
    tok = BPETokenizer.train(input_texts(cfg), cfg.tokenizer.vocab_size, cfg.tokenizer.pattern,
                             cfg.tokenizer.special_tokens, errors=cfg.data.errors,
                             progress=progress)
    tok.save(tok_dir)
    atomic_write_text(stamp, wanted)
    return tok_dir


def ensure_data(cfg: Config, out: Path, tok_dir: Path, progress: bool = True) -> Path:
    if cfg.data.shards:
        return Path(cfg.data.shards)
    data_dir = out / "data"
    if (data_dir / MANIFEST).is_file():
        manifest = read_manifest(data_dir)
        if manifest["tokenizer"]["fingerprint"] == tokenizer_fingerprint(tok_dir) and \
                manifest["config"] == dataclasses.asdict(cfg.data):
            print0(f"[data] reusing {data_dir}")
            return data_dir
        raise ScratchError(f"{data_dir} was prepared with another tokenizer or data config; "
                           "delete it (or use another run directory) to prepare again")
    paths = [p for p in cfg.data.inputs if p != "builtin"]
    documents = None
    if "builtin" in cfg.data.inputs:
        if paths:
            raise ScratchError("data.inputs: use either 'builtin' or paths, not both")
        from scratchlm.data.builtin import iter_scenes

        documents = (s.text for s in iter_scenes())
    print("[data] preparing shards")
    prepare(paths, tok_dir, data_dir, cfg.data, progress=progress, documents=documents,
            documents_name="builtin:shakespeare")
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
    from scratchlm.train.trainer import Trainer, resolve_device

    dist = init_distributed(resolve_device(cfg.train.device), cfg.parallel, cfg.model)
    out.mkdir(parents=True, exist_ok=True)
    if not resume and (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
        raise ScratchError(f"{out} already has checkpoints; pass --resume to continue that "
                           "run, or choose another --out")
    if prepared is None:
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
    if dist.is_main:
        save_config(cfg, out / "config.yaml")
    print0(model.summary())
    trainer = Trainer(cfg, model, tokenizer, data_dir, out, tokenizer_fingerprint(tok_dir), resume,
                      progress, dist)
    layout = f" (dp {dist.dp} x tp {dist.tp} x pp {dist.pp}, ZeRO-{trainer.zero})" \
        if dist.world_size > 1 else ""
    print0(f"[train] {trainer.precision} on {trainer.device} x {dist.world_size} process(es)"
           f"{layout}, "
           f"{trainer.tokens_per_step:,} tokens per step ({trainer.accumulation} micro-batch(es) "
           f"of {cfg.train.micro_batch} x {cfg.model.block_size} per data-parallel rank), "
           f"{cfg.train.max_steps} steps")
    return trainer.run()
