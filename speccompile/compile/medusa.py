"""Medusa heads: K parallel heads on the target's last hidden state, head k guessing the token k+2 places ahead
(the target's own head gives the next one). Each head is residual SiLU blocks and an output matrix:

    h = final_norm(hidden);  for each block: h = h + SiLU(W h + b);  logits_k = W_out_k h

Public layout (FasterDecoding/Medusa `medusa_lm_head.safetensors`): `{k}.{j}.linear.weight|bias` for the blocks
and `{k}.{L}.weight` for the output, optionally under a `medusa_head.` prefix.
"""
from __future__ import annotations

import numpy as np

from speccompile.compile.config import ModelConfig
from speccompile.compile.int8 import SUFFIX_CODES, SUFFIX_SCALES, int8_product, matmul
from speccompile.graphs.builder import GraphBuilder

def num_heads(weights: dict) -> int:
    return len({k.split(".")[1] for k in weights if k.startswith("medusa.")})


def build_medusa(cfg: ModelConfig, weights: dict[str, np.ndarray]) -> GraphBuilder:
    """hidden_in [1, H] (the target's pre-norm hidden state) -> logits [K, V], next_token [K]. Heads without an
    output matrix of their own share the target's: its int8 head screen when `weights` has it, else its float32
    head (lm_head, or the tied embedding)."""
    g = GraphBuilder("medusa")
    g.input("hidden_in", "float32", [1, cfg.hidden_size])
    W = {k: g.weight(k, v) for k, v in weights.items()}
    h = g.op("SimplifiedLayerNormalization", ["hidden_in", W["final_norm"]], axis=-1, epsilon=cfg.rms_norm_eps,
             stash_type=1)[0]
    logits, shared = [], []
    for k in range(num_heads(weights)):
        x = h
        j = 0
        while f"medusa.{k}.{j}.b" in W:
            y = g.op("Add", [matmul(g, x, W, f"medusa.{k}.{j}.w"), W[f"medusa.{k}.{j}.b"]])[0]
            x = g.op("Add", [x, g.op("Mul", [y, g.op("Sigmoid", [y])[0]])[0]])[0]
            j += 1
        out = f"medusa.{k}.out"
        if out + SUFFIX_CODES in W:
            logits.append(int8_product(g, x, W[out + SUFFIX_CODES], W[out + SUFFIX_SCALES]))
        elif out in W:
            logits.append(g.op("Gemm", [x, W[out]], transB=1)[0])
        else:
            shared.append(x)
    if shared:  # one product for every head, in head order (heads share the target's head all or none)
        rows = g.op("Concat", shared, axis=0)[0] if len(shared) > 1 else shared[0]
        if "head_screen.codes" in W:
            logits = [int8_product(g, rows, W["head_screen.codes"], W["head_screen.scales"])]
        else:
            logits = [g.op("Gemm", [rows, W.get("lm_head", W.get("embed"))], transB=1)[0]]
    g.op("Concat", logits, outputs=["logits"], axis=0)
    g.op("ArgMax", ["logits"], outputs=["next_token"], axis=-1, keepdims=0)
    g.output("logits", "float32", [num_heads(weights), cfg.vocab_size])
    g.output("next_token", "int64", [num_heads(weights)])
    return g
