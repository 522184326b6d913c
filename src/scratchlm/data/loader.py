"""Training batches: shuffled, split across ranks, resumable; from token shards (pretraining)
or from a list of examples (the fine-tuning and alignment stages).

The shards of a split are cut into non-overlapping windows of block_size + 1 tokens (inputs and
the targets one to the right); documents are packed back to back, separated by the end-of-text
token. Each epoch visits every window (or example) once in a seeded random order. A step draws
the next `batch_size * world_size` of that order, and rank r takes its own contiguous slice, so
the global batch is the one a single process would draw. `state_dict()` is the position in
the order, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from scratchlm.data.shards import open_shard
from scratchlm.errors import ScratchError


def read_manifest(data_dir: str | os.PathLike) -> dict:
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise ScratchError(f"{data_dir}: no manifest.json; prepare the data first with "
                           "`scratchlm data prepare` (an interrupted run resumes there)")
    return json.loads(path.read_text(encoding="utf-8"))


class EpochOrder:
    """Items 0..n-1 in a seeded random order, a new one each epoch. Each step takes the next
    `per_rank * world_size` items of the order and rank r its own contiguous slice of them, so
    the global batch is the one a single process would draw; an epoch ends when a whole
    global batch no longer fits (the rest waits for a later epoch's order). `state_dict()` is
    the position in the order, so a resumed run draws exactly what it would have drawn."""

    def __init__(self, n: int, per_rank: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        self.n, self.per_rank, self.seed = n, per_rank, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.pos = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def next(self) -> np.ndarray:
        """This rank's items of the next step."""
        global_batch = self.per_rank * self.world_size
        if self.pos + global_batch > self.n:  # not enough left: start a new epoch
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._permutation()
        start = self.pos + self.rank * self.per_rank
        self.pos += global_batch
        return self._order[start:start + self.per_rank]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "n": self.n}

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != self.n or state["seed"] != self.seed:
            raise ScratchError("the loader state belongs to other data (or another seed or "
                               "block size); resume with the data the run started with")
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._permutation()


class TokenLoader:
    """Pretraining batches: windows of block_size + 1 tokens from a split's shards (inputs
    and the targets one to the right), drawn in an EpochOrder."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str,
        block_size: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        tokenizer_fingerprint: str | None = None,
    ) -> None:
        manifest = read_manifest(data_dir)
        if tokenizer_fingerprint and manifest["tokenizer"]["fingerprint"] != tokenizer_fingerprint:
            raise ScratchError(f"{data_dir} was tokenized with another tokenizer (fingerprint "
                               f"{manifest['tokenizer']['fingerprint']}, this one "
                               f"{tokenizer_fingerprint}); prepare the data with this tokenizer")
        files = [Path(data_dir) / s["file"] for s in manifest["shards"] if s["split"] == split]
        self.shards = [open_shard(f) for f in files]
        self.block_size = block_size
        self.vocab_size = manifest["tokenizer"]["vocab_size"]
        # window w of shard s starts at token w * block_size
        per_shard = [max(0, (len(s) - 1) // block_size) for s in self.shards]
        self.offsets = np.concatenate([[0], np.cumsum(per_shard)])
        self.n_windows = int(self.offsets[-1])
        if self.n_windows < batch_size * world_size:
            raise ScratchError(
                f"{data_dir}: the {split} split has {self.n_windows} windows of "
                f"{block_size + 1} tokens, fewer than one global batch of "
                f"{batch_size * world_size}; use more data, a smaller batch or block size")
        self.order = EpochOrder(self.n_windows, batch_size, seed, rank, world_size)

    def _window(self, w: int) -> np.ndarray:
        s = int(np.searchsorted(self.offsets, w, side="right")) - 1
        start = (w - int(self.offsets[s])) * self.block_size
        return self.shards[s][start:start + self.block_size + 1]

    def next_batch(self) -> dict[str, torch.Tensor]:
        """This rank's {"idx": inputs, "targets": the next tokens}, each (batch_size,
        block_size) int64."""
        rows = np.stack([self._window(int(w)) for w in self.order.next()]).astype(np.int64)
        batch = torch.from_numpy(rows)  # (batch_size, block_size + 1)
        return {"idx": batch[:, :-1], "targets": batch[:, 1:]}

    def state_dict(self) -> dict:
        return self.order.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state)


class ExampleLoader:
    """Batches of examples (classification, SFT, preference pairs): `collate` turns this
    rank's examples of a step into a batch of tensors."""

    def __init__(self, examples: Sequence, collate: Callable[[list], dict], batch_size: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if len(examples) < batch_size * world_size:
            raise ScratchError(f"{len(examples)} training examples are fewer than one global "
                               f"batch of {batch_size * world_size}; use more data or a "
                               "smaller train.micro_batch")
        self.examples, self.collate = examples, collate
        self.order = EpochOrder(len(examples), batch_size, seed, rank, world_size)

    def next_batch(self) -> dict:
        return self.collate([self.examples[int(i)] for i in self.order.next()])

    def state_dict(self) -> dict:
        return self.order.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state)


def iter_eval_windows(data_dir: str | os.PathLike, block_size: int, batch_size: int,
                      max_batches: int | None = None, split: str = "val"
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The split's windows in order (no shuffling), for evaluation that is the same each time."""
    manifest = read_manifest(data_dir)
    files = [Path(data_dir) / s["file"] for s in manifest["shards"] if s["split"] == split]
    rows: list[np.ndarray] = []
    n = 0
    for f in files:
        tokens = open_shard(f)
        for start in range(0, len(tokens) - block_size, block_size):
            rows.append(tokens[start:start + block_size + 1].astype(np.int64))
            if len(rows) == batch_size:
                batch = torch.from_numpy(np.stack(rows))
                yield batch[:, :-1], batch[:, 1:]
                rows, n = [], n + 1
                if max_batches is not None and n >= max_batches:
                    return
    if rows:
        batch = torch.from_numpy(np.stack(rows))
        yield batch[:, :-1], batch[:, 1:]
