"""A preallocated key/value cache: each generated token costs one position, not a full pass.

Keys and values of every layer are written into tensors sized for the whole generation up
front, so decoding never reallocates or concatenates.
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
        """Store k, v (B, n_kv_head, T, hd) after the cached positions; return all keys and
        values so far, (B, n_kv_head, length + T, hd)."""
        T = k.size(2)
        end = self.length + T
        if end > self.max_len:
            raise ScratchError(f"KV cache holds {self.max_len} positions; {end} were asked for")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        self._pending = T
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self) -> None:
        """Commit the positions written by the last forward pass (called once all layers ran)."""
        self.length += self._pending
        self._pending = 0

    def crop(self, length: int) -> None:
        """Forget everything after `length` positions (e.g. to reuse a shared prompt)."""
        self.length = min(self.length, length)
