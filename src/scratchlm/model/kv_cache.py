"""A preallocated key/value cache: each generated token costs one position, not a full pass.

Keys and values of every layer are written into tensors sized for the whole generation up
front, so decoding never reallocates or concatenates.

Every row shares one write position (`length`). Rows of different lengths are right-aligned to
it (left padding, masked by the caller); a forward pass of B rows uses the first B rows of the
cache, so a batch whose sequences come and go keeps its live rows first (scratchlm.generate).
"""

from __future__ import annotations

import torch

from scratchlm.errors import ScratchError


class KVCache:
    def __init__(self, n_layer: int, batch: int, n_kv_head: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (n_layer, batch, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0  # positions already cached (the same for every layer)
        self._pending = 0  # positions written by the current forward pass, not yet committed

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_kv_head, T, hd) of the first B rows after the cached positions;
        return all their keys and values so far, (B, n_kv_head, length + T, hd)."""
        B, T = k.size(0), k.size(2)
        end = self.length + T
        if end > self.max_len:
            raise ScratchError(f"KV cache holds {self.max_len} positions; {end} were asked for")
        self.k[layer, :B, :, self.length:end] = k
        self.v[layer, :B, :, self.length:end] = v
        self._pending = T
        return self.k[layer, :B, :, :end], self.v[layer, :B, :, :end]

    def advance(self) -> None:
        """Commit the positions written by the last forward pass (called once all layers ran)."""
        self.length += self._pending
        self._pending = 0

    def crop(self, length: int) -> None:
        """Forget everything after `length` positions (e.g. to reuse a shared prompt)."""
        self.length = min(self.length, length)

    def shift(self, offset: int) -> None:
        """Move every cached position `offset` columns right (> 0: room on the left for a
        longer row to join) or left (< 0: drop columns no live row uses any more)."""
        if offset > 0:
            if self.length + offset > self.max_len:
                raise ScratchError(f"KV cache holds {self.max_len} positions; "
                                   f"{self.length + offset} were asked for")
            for t in (self.k, self.v):  # clone: source and destination overlap
                t[:, :, :, offset:offset + self.length] = t[:, :, :, :self.length].clone()
        elif offset < 0:
            for t in (self.k, self.v):
                t[:, :, :, :self.length + offset] = t[:, :, :, -offset:self.length].clone()
        self.length += offset

    def load_rows(self, first: int, other: KVCache) -> None:
        """Copy all of `other` (b rows of other.length positions) into rows first..first+b-1,
        right-aligned to this cache's length."""
        b, n = other.k.size(1), other.length
        if n > self.length:
            raise ScratchError(f"cannot place {n} cached positions in a cache of {self.length}")
        self.k[:, first:first + b, :, self.length - n:self.length] = other.k[:, :, :, :n]
        self.v[:, first:first + b, :, self.length - n:self.length] = other.v[:, :, :, :n]

    def move_row(self, src: int, dst: int) -> None:
        """Copy row `src` onto row `dst` (a finished row's place goes to a live one)."""
        self.k[:, dst, :, :self.length] = self.k[:, src, :, :self.length]
        self.v[:, dst, :, :self.length] = self.v[:, src, :, :self.length]
