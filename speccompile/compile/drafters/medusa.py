"""`medusa:PATH`: Medusa heads (FasterDecoding/Medusa `medusa_lm_head.safetensors`; the heads' math is in
speccompile.compile.graph.medusa), one graph over medusa.bin that reads the target's last hidden state.

Public layout: `{k}.{j}.linear.weight|bias` for head k's residual blocks and `{k}.{L}.weight` for its output
matrix, optionally under a `medusa_head.` prefix.
"""
from __future__ import annotations

import os
import re

import numpy as np

from speccompile.compile.config import ModelConfig
from speccompile.compile.drafters.base import DrafterBuild, TargetBuild
from speccompile.compile.drafters.head_weights import target_output_head
from speccompile.compile.quantize.int8 import quantize_matrices
from speccompile.compile.quantize.kernel_form import int8_records
from speccompile.compile.graph.medusa import build_medusa, medusa_head_count
from speccompile.compile.model_entries import source_entry
from speccompile.compile.safetensors_files import read_safetensors, refuse_pickle
from speccompile.errors import CheckpointError
from speccompile.format.drafter_kinds import DraftSpec

_NAME = re.compile(r"^(?:medusa_head\.)?(\d+)\.(\d+)\.(linear\.weight|linear\.bias|weight)$")


def build(spec: DraftSpec, target: TargetBuild) -> DrafterBuild:
    cfg, target_w, int8 = target.config, target.weights, target.options.draft_precision == "int8"
    weights = share_target_head(load_medusa(spec.arg, cfg), target_w.get("lm_head", target_w["embed"]))
    shared = {"final_norm": target_w["final_norm"]}
    shares_head = not any(k.endswith(".out") for k in weights)
    if shares_head:
        target.progress("      medusa: every head's output matrix is the target's: one shared product")
    if int8:
        target.progress("      quantize: the Medusa heads' matrices to int8 (speccompile.compile.quantize.int8)")
        weights = int8_medusa(weights)
        weights = int8_records(weights)[0] if target.int8_kernel else weights
    if shares_head:
        shared |= target_output_head(target_w, int8=int8)
    graph = build_medusa(cfg, weights | shared)
    K = medusa_head_count(weights)
    target.progress(f"      medusa: {K} heads from {spec.arg}")
    files = ["medusa.bin", "target.bin"]
    model = {"graph": "medusa.onnx", "weights": files, "kind": "medusa", "config": cfg.to_dict(), "num_heads": K,
             "source": source_entry(spec.arg),
             "inputs": [{"name": "hidden_in", "dtype": "float32", "shape": ["N", cfg.hidden_size]}],
             "outputs": [{"name": "logits", "dtype": "float32", "shape": ["KN", cfg.vocab_size]},
                         {"name": "next_token", "dtype": "int64", "shape": ["KN"]}]}
    return DrafterBuild(entry={"model": "medusa"}, weights={"medusa.bin": weights}, graphs={"medusa": (graph, files)},
                        models={"medusa": model}, max_num_draft=K)


def load_medusa(path: str, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Read Medusa heads from safetensors; returns graph weights medusa.{k}.{j}.w|b and medusa.{k}.out."""
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


def share_target_head(weights: dict[str, np.ndarray], target_head: np.ndarray) -> dict[str, np.ndarray]:
    """Without the heads' output matrices when every one is the target's own output head (Medusa-1 trained with
    the lm_head frozen, as `speccompile train-head --arch medusa` does): the graph then scores all K heads in one product over the
    target's head, read once per drafting pass instead of K times. A head
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
