"""Token shards: a 64-byte header, then the tokens as little-endian uint16 (or uint32).

Header: magic b"SCRLMTOK", format version (u32), bytes per token (u32), token count (u64),
vocabulary size (u64), zero padding to 64 bytes. Documents are separated by the end-of-text
token, which starts every document. Shards are written to a temporary name and renamed.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from scratchlm.errors import ScratchError
from scratchlm.utils import atomic_path

MAGIC = b"SCRLMTOK"
VERSION = 1
HEADER = struct.Struct("<8sIIQQ")
HEADER_BYTES = 64


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (GPT-2's 50,257 does), else uint32."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def _header(count: int, vocab_size: int) -> bytes:
    itemsize = token_dtype(vocab_size).itemsize
    return HEADER.pack(MAGIC, VERSION, itemsize, count, vocab_size).ljust(HEADER_BYTES, b"\0")


def write_shard(path: str | os.PathLike, tokens: np.ndarray, vocab_size: int) -> None:
    """Write a whole shard at once (atomically)."""
    tokens = np.asarray(tokens)
    if tokens.size and int(tokens.max()) >= vocab_size:
        raise ValueError(f"token id {int(tokens.max())} >= vocab size {vocab_size}")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(_header(tokens.size, vocab_size))
        f.write(tokens.astype(token_dtype(vocab_size), copy=False).tobytes())
        f.flush()
        os.fsync(f.fileno())


class ShardFile:
    """A shard written token by token: the tokens go to `.NAME.partial` behind a blank header;
    `finish()` writes the header and renames the file into place. Memory stays flat however
    large the shard."""

    def __init__(self, path: Path, vocab_size: int, keep: int = 0) -> None:
        """Start `path`'s partial file, or (keep > 0) reopen one and keep its first `keep`
        tokens, dropping whatever was written after them."""
        self.path, self.vocab_size = path, vocab_size
        self.dtype = token_dtype(vocab_size)
        self.partial = self.partial_path(path)
        if keep:
            self.file = open(self.partial, "r+b")
            self.file.truncate(HEADER_BYTES + keep * self.dtype.itemsize)
            self.file.seek(0, os.SEEK_END)
        else:
            self.file = open(self.partial, "w+b")
            self.file.write(b"\0" * HEADER_BYTES)
        self.count = keep

    @staticmethod
    def partial_path(path: Path) -> Path:
        return path.with_name(f".{path.name}.partial")

    def write(self, tokens: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(tokens, dtype=self.dtype).data)  # no copy if ready
        self.count += len(tokens)

    def sync(self) -> None:
        """Make the tokens written so far durable (before a resumable state points at them)."""
        self.file.flush()
        os.fsync(self.file.fileno())

    def finish(self) -> None:
        self.file.seek(0)
        self.file.write(_header(self.count, self.vocab_size))
        self.sync()
        self.file.close()
        os.replace(self.partial, self.path)

    def discard(self) -> None:
        self.file.close()
        self.partial.unlink(missing_ok=True)


def read_header(path: str | os.PathLike) -> tuple[int, int, int]:
    """(bytes per token, token count, vocab size), after checking the file is whole."""
    path = Path(path)
    if not path.is_file():
        raise ScratchError(f"{path}: shard not found; run `scratchlm data prepare` again")
    with path.open("rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES or raw[:8] != MAGIC:
        raise ScratchError(f"{path}: not a scratchlm token shard (bad magic); it is foreign "
                           "or corrupt")
    _, version, itemsize, count, vocab = HEADER.unpack(raw[:HEADER.size])
    if version != VERSION:
        raise ScratchError(f"{path}: shard format version {version}, expected {VERSION}; "
                           "prepare the data again with this scratchlm")
    expected = HEADER_BYTES + itemsize * count
    if path.stat().st_size != expected:
        raise ScratchError(f"{path}: truncated or padded shard ({path.stat().st_size} bytes, "
                           f"header says {expected}); prepare the data again")
    return itemsize, count, vocab


def open_shard(path: str | os.PathLike) -> np.memmap:
    """The shard's tokens, memory-mapped (read lazily, never loaded whole)."""
    itemsize, count, _ = read_header(path)
    dtype = np.dtype("<u2") if itemsize == 2 else np.dtype("<u4")
    if count == 0:
        return np.zeros(0, dtype=dtype)  # np.memmap refuses empty maps
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))
