"""Int8 weights: block-quantized matrices run by onnxruntime's MatMulNBits (int8 weights, int8 activations).

Drafters may be approximate: a draft only has to be likely, never exact, since the target verifies it. A draft
head's matrices in int8 read a quarter of the bytes, and on a memory-bound CPU a head pass is mostly reading its
weights. The target's own output head uses the same format for its screen (quantize/head_screen.py), where exactness
is restored. The graph side (MatMulNBits nodes) is speccompile.compile.graph.linear.
"""
from __future__ import annotations

import numpy as np


BLOCK = 32  # quantization block along the input dimension (GGUF's Q8_0 block)
SUFFIX_CODES, SUFFIX_SCALES = ".int8", ".int8_scales"


def int8_blocks(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """rows [N, K] (one row per output) -> (codes [N, K/BLOCK, BLOCK] uint8 stored +128, scales [N * K/BLOCK]):
    symmetric, one scale per block = max|block| / 127, so an int8 grid (GGUF Q8_0) is reproduced exactly."""
    N, K = rows.shape
    blocks = rows.reshape(N, K // BLOCK, BLOCK).astype(np.float32)
    scale = np.abs(blocks).max(-1) / np.float32(127)
    scale[scale == 0] = 1.0
    codes = np.clip(np.round(blocks / scale[..., None]), -127, 127)
    return (codes + 128).astype(np.uint8), scale.reshape(-1).astype(np.float32)


def quantize_matrices(weights: dict[str, np.ndarray], keys, layout: str = "kn") -> dict[str, np.ndarray]:
    """Replace each matrix `key` that can be quantized by its int8 codes and scales (key + SUFFIX_*). layout "kn":
    the graph multiplies x @ W (W [K, N], as MatMul weights are stored); "nk": W [N, K] (a Gemm transB head)."""
    out = dict(weights)
    for key in keys:
        w = out.get(key)
        if w is None or w.ndim != 2 or (w.shape[0] if layout == "kn" else w.shape[1]) % BLOCK:
            continue
        codes, scales = int8_blocks(np.ascontiguousarray(w.T if layout == "kn" else w))
        del out[key]
        out[key + SUFFIX_CODES], out[key + SUFFIX_SCALES] = codes, scales
    return out
