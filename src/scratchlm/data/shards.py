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


def write_shard(path: str | os.PathLike, tokens: np.ndarray, vocab_size: int) -> None:
    dtype = token_dtype(vocab_size)
    tokens = np.asarray(tokens)
    if tokens.size and int(tokens.max()) >= vocab_size:
        raise ValueError(f"token id {int(tokens.max())} >= vocab size {vocab_size}")
    header = HEADER.pack(MAGIC, VERSION, dtype.itemsize, tokens.size, vocab_size)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(header.ljust(HEADER_BYTES, b"\0"))
        f.write(tokens.astype(dtype, copy=False).tobytes())
        f.flush()
        os.fsync(f.fileno())


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
