"""Medusa heads in one graph (speccompile.compile.drafters.medusa describes the architecture and the layout):

    h = final_norm(hidden);  for each block: h = h + SiLU(W h + b);  logits_k = W_out_k h
"""
from __future__ import annotations

import numpy as np

from speccompile.compile.config import ModelConfig
from speccompile.compile.graph.linear import int8_product, matmul
from speccompile.compile.graph.norm import RMSNorm
from speccompile.compile.quantize.int8 import SUFFIX_CODES, SUFFIX_SCALES
from speccompile.graphs.builder import GraphBuilder


def medusa_head_count(weights) -> int:
    """The number of heads among graph weights (names medusa.{k}.*)."""
    return len({k.split(".")[1] for k in weights if k.startswith("medusa.")})


def build_medusa(cfg: ModelConfig, weights: dict[str, np.ndarray]) -> GraphBuilder:
    """hidden_in [N, H] (the target's pre-norm hidden state of N sequences: one, or the slots sharing a pass) ->
    logits [K * N, V], next_token [K * N], head-major (head k's row for sequence n at k * N + n). Heads without an
    output matrix of their own share the target's: its int8 head screen when `weights` has it, else its float32
    head (lm_head, or the tied embedding)."""
    g = GraphBuilder("medusa")
    g.input("hidden_in", "float32", ["N", cfg.hidden_size])
    W = {k: g.weight(k, v) for k, v in weights.items()}
    h = RMSNorm(g, cfg.rms_norm_eps)("hidden_in", W["final_norm"])
    logits, shared = [], []
    for k in range(medusa_head_count(weights)):
        x = _residual_blocks(g, W, k, h)
        out = f"medusa.{k}.out"
        if out + SUFFIX_CODES in W:
            logits.append(int8_product(g, x, W[out + SUFFIX_CODES], W.get(out + SUFFIX_SCALES)))
        elif out in W:
            logits.append(g.op("Gemm", [x, W[out]], transB=1)[0])
        else:
            shared.append(x)
    if shared:  # one product for every head, in head order (heads share the target's head all or none)
        rows = g.op("Concat", shared, axis=0)[0] if len(shared) > 1 else shared[0]
        if "head_screen.codes" in W:
            logits = [int8_product(g, rows, W["head_screen.codes"], W.get("head_screen.scales"))]
        else:
            logits = [g.op("Gemm", [rows, W.get("lm_head", W.get("embed"))], transB=1)[0]]
    g.op("Concat", logits, outputs=["logits"], axis=0)
    g.op("ArgMax", ["logits"], outputs=["next_token"], axis=-1, keepdims=0)
    g.output("logits", "float32", ["KN", cfg.vocab_size])
    g.output("next_token", "int64", ["KN"])
    return g


def _residual_blocks(g: GraphBuilder, W: dict[str, str], k: int, x: str) -> str:
    """Head k's blocks: x + SiLU(W x + b), for j = 0, 1, ... while medusa.{k}.{j} exists."""
    j = 0
    while f"medusa.{k}.{j}.b" in W:
        y = g.op("Add", [matmul(g, x, W, f"medusa.{k}.{j}.w"), W[f"medusa.{k}.{j}.b"]])[0]
        x = g.op("Add", [x, g.op("Mul", [y, g.op("Sigmoid", [y])[0]])[0]])[0]
        j += 1
    return x
