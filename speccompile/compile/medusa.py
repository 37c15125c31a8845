"""Medusa heads: K parallel heads on the target's last hidden state, head k guessing the token k+2 places ahead
(the target's own head gives the next one). Each head is residual SiLU blocks and an output matrix:

    h = final_norm(hidden);  for each block: h = h + SiLU(W h + b);  logits_k = W_out_k h

Public layout (FasterDecoding/Medusa `medusa_lm_head.safetensors`): `{k}.{j}.linear.weight|bias` for the blocks
and `{k}.{L}.weight` for the output, optionally under a `medusa_head.` prefix.
"""
from __future__ import annotations

import os
import re

import numpy as np

from speccompile.compile.config import ModelConfig
from speccompile.errors import CheckpointError
from speccompile.compile.int8 import SUFFIX_CODES, SUFFIX_SCALES, int8_product, matmul, quantize_matrices
from speccompile.graphs.builder import GraphBuilder

_NAME = re.compile(r"^(?:medusa_head\.)?(\d+)\.(\d+)\.(linear\.weight|linear\.bias|weight)$")


def load_medusa(path: str, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Read Medusa heads from safetensors; returns graph weights medusa.{k}.{j}.w|b and medusa.{k}.out."""
    from speccompile.compile.sources import read_safetensors, refuse_pickle
    refuse_pickle(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"Medusa heads not found: {path}")
    raw = read_safetensors(path)
    heads: dict[int, dict[int, dict[str, np.ndarray]]] = {}
    for k, v in raw.items():
        m = _NAME.match(k)
        if m:
            heads.setdefault(int(m.group(1)), {}).setdefault(int(m.group(2)), {})[m.group(3)] = v
    if not heads or sorted(heads) != list(range(len(heads))):
        raise CheckpointError(f"{path}: no Medusa heads ({{k}}.{{j}}.linear.weight ... {{k}}.{{L}}.weight)")
    H, V = cfg.hidden_size, cfg.vocab_size
    w = {}
    for k, layers in heads.items():
        *blocks, out = sorted(layers)
        if "weight" not in layers[out] or tuple(layers[out]["weight"].shape) != (V, H):
            raise CheckpointError(f"{path}: Medusa head {k} output must be a [{V}, {H}] '{k}.{out}.weight'")
        for j in blocks:
            lw, lb = layers[j].get("linear.weight"), layers[j].get("linear.bias")
            if lw is None or lb is None or lw.shape != (H, H) or lb.shape != (H,):
                raise CheckpointError(f"{path}: Medusa head {k} block {j} needs linear.weight [{H}, {H}] and bias")
            w[f"medusa.{k}.{j}.w"] = np.ascontiguousarray(lw.T)
            w[f"medusa.{k}.{j}.b"] = lb
        w[f"medusa.{k}.out"] = np.ascontiguousarray(layers[out]["weight"])
    return w


def num_heads(weights: dict) -> int:
    return len({k.split(".")[1] for k in weights if k.startswith("medusa.")})


def share_target_head(weights: dict[str, np.ndarray], target_head: np.ndarray) -> dict[str, np.ndarray]:
    """Without the heads' output matrices when every one is the target's own output head (Medusa-1 trained with
    the lm_head frozen, as tools/train_medusa.py does): the graph then scores all K heads in one product over the
    target's head, read once per drafting pass instead of K times (K x 113 MB in float32 on SmolLM2). A head
    stored in float16 matches when it is the target's head rounded to float16."""
    outs = [k for k in weights if k.endswith(".out")]
    half = None
    for k in outs:
        if not np.array_equal(weights[k], target_head):
            half = target_head.astype(np.float16).astype(np.float32) if half is None else half
            if not np.array_equal(weights[k], half):
                return weights
    return {k: v for k, v in weights.items() if k not in outs}


def int8_medusa(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The heads' matrices in int8 (speccompile.compile.int8; drafts need not be exact)."""
    blocks = [k for k in weights if k.endswith(".w")]
    return quantize_matrices(quantize_matrices(weights, blocks), [k for k in weights if k.endswith(".out")],
                             layout="nk")


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
