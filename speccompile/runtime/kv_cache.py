"""The static KV cache: allocated once, bound to the graph as both past and present, never copied per step.

Roll back is a length change: slots past `length` are stale and the fused attention kernel never reads them
(it reads `seqlens_k + 1` rows), so the next step simply overwrites them.
"""
from __future__ import annotations

import numpy as np


class KVCache:
    """K and V per layer, [num_layers, batch, num_kv_heads, max_seq_len, head_dim]: batch sequence slots (a batched
    graph's cache, runtime/batch_engine.py), each with its own committed length in its `slot` view."""

    def __init__(self, num_layers: int, num_kv_heads: int, max_seq_len: int, head_dim: int, batch: int = 1,
                 arrays: tuple[np.ndarray, np.ndarray] | None = None):
        shape = (num_layers, batch, num_kv_heads, max_seq_len, head_dim)
        # np.zeros maps zero pages lazily: slots never used cost no memory
        self.key, self.value = arrays if arrays is not None else (np.zeros(shape, np.float32),
                                                                  np.zeros(shape, np.float32))
        self.max_seq_len = max_seq_len
        self.length = 0  # committed tokens whose K/V are valid (of slot 0 where batch > 1: see `slot`)

    @property
    def batch(self) -> int:
        return self.key.shape[1]

    def slot(self, b: int) -> "KVCache":
        """Slot b as a one-sequence cache sharing this one's memory, with a length of its own (an engine bound to
        it writes into slot b of the batched cache)."""
        return KVCache(self.key.shape[0], self.key.shape[2], self.max_seq_len, self.key.shape[4],
                       arrays=(self.key[:, b:b + 1], self.value[:, b:b + 1]))

    @property
    def nbytes(self) -> int:
        return self.key.nbytes + self.value.nbytes

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.max_seq_len:
            raise ValueError(f"cache length {length} out of range")
        self.length = length

    def compact(self, src_slots: np.ndarray, dst_start: int) -> None:
        """Move the K/V of slots `src_slots` (an accepted tree path) to `dst_start, dst_start+1, ...`."""
        n = len(src_slots)
        if n and not np.array_equal(src_slots, np.arange(dst_start, dst_start + n)):
            # fancy indexing materialises the gathered rows first, so overlapping moves are safe
            self.key[:, :, :, dst_start:dst_start + n] = self.key[:, :, :, src_slots]
            self.value[:, :, :, dst_start:dst_start + n] = self.value[:, :, :, src_slots]
