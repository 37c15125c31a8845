"""The static KV cache: allocated once, bound to the graph as both past and present, never copied per step.

Roll back is a length change: slots past `length` are stale and the fused attention kernel never reads them
(it reads `seqlens_k + 1` rows), so the next step simply overwrites them.
"""
from __future__ import annotations

import numpy as np


class KVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, max_seq_len: int, head_dim: int):
        shape = (num_layers, 1, num_kv_heads, max_seq_len, head_dim)
        self.key = np.zeros(shape, np.float32)
        self.value = np.zeros(shape, np.float32)
        self.max_seq_len = max_seq_len
        self.length = 0  # committed tokens whose K/V are valid

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
