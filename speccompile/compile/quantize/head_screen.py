"""The tensors of the exact greedy head's int8 screen (the graph and the bound it certifies:
speccompile.compile.graph.head_screen)."""
from __future__ import annotations

import numpy as np

from speccompile.compile.quantize.int8 import BLOCK, int8_blocks


def quantize_head(w: np.ndarray) -> dict[str, np.ndarray]:
    """The screen's tensors for the head w [V, H]: int8 codes with one scale per block (int8.int8_blocks), the
    blocks' L1 norms [H/BLOCK, V] for the bound, and the grid's error per row when it is not exact. A GGUF Q8_0
    head dequantized to float32 lies on this grid exactly."""
    V, H = w.shape
    codes, scales = int8_blocks(w)
    blocks = w.reshape(V, H // BLOCK, BLOCK).astype(np.float32)
    out = {"head_screen.codes": codes, "head_screen.scales": scales,
           "head_screen.l1": np.ascontiguousarray(np.abs(blocks).sum(-1).T, np.float32)}
    grid = (codes.astype(np.float32) - 128) * scales.reshape(V, -1, 1)
    err = np.linalg.norm((blocks - grid).reshape(V, H).astype(np.float64), axis=1)
    if err.any():
        out["head_screen.err"] = (err * (1 + 1e-6)).astype(np.float32)
    return out
