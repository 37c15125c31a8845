"""Medusa heads: K parallel heads on the target's last hidden state, head k guessing the token k+2 places ahead
(the target's own head gives the next one). Each head is residual SiLU blocks and an output matrix:

    h = final_norm(hidden);  for each block: h = h + SiLU(W h + b);  logits_k = W_out_k h

Public layout (FasterDecoding/Medusa `medusa_lm_head.safetensors`): `{k}.{j}.linear.weight|bias` for the blocks
and `{k}.{L}.weight` for the output, optionally under a `medusa_head.` prefix. The graph: graph/medusa.py.
"""
from __future__ import annotations

import os
import re

import numpy as np

from speccompile.compile.config import ModelConfig
from speccompile.errors import CheckpointError
from speccompile.compile.quantize.int8 import quantize_matrices

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
    """The heads' matrices in int8 (speccompile.compile.quantize.int8; drafts need not be exact)."""
    blocks = [k for k in weights if k.endswith(".w")]
    return quantize_matrices(quantize_matrices(weights, blocks), [k for k in weights if k.endswith(".out")],
                             layout="nk")
