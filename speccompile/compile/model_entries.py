"""The manifest's entries for the models a build emits: a decoder graph (target, early exit, draft model, MTP and
EAGLE heads) with its signature and KV cache, and where a head was read from."""
from __future__ import annotations

import os

from speccompile.compile.config import ModelConfig
from speccompile.compile.sources import sha256_path
from speccompile.graphs import BATCH_GRAPH_VERSION, DECODER_GRAPH_VERSION, decoder_signature
from speccompile.plugins import tree_attention


def decoder_entry(name: str, cfg: ModelConfig, num_layers: int, max_seq_len: int, weights_files: list[str],
                  attention: str, mtp: bool = False, draft_vocab: int | None = None, verify: bool = False,
                  aux_layers: list | None = None, screen: bool = False, batched: bool = False) -> dict:
    """A decoder graph's model entry: its files, config, KV cache and the inputs/outputs of its signature."""
    ins, outs = decoder_signature(num_layers, cfg.cache_kv_heads, cfg.cache_head_dim, max_seq_len,
                                  draft_vocab or cfg.vocab_size, cfg.hidden_size, mtp, verify,
                                  aux_width=len(aux_layers or ()) * cfg.hidden_size, screen=screen, batched=batched,
                                  scratch=tree_attention.scratch_slots(attention))
    return {"graph": f"{name}.onnx", "weights": weights_files, "config": cfg.to_dict(), "num_layers": num_layers,
            "kind": "mtp_head" if mtp else "decoder",
            "graph_version": DECODER_GRAPH_VERSION, "attention": attention,
            "kv_cache": {"layout": ("per layer, the MLA latent [k_rope; c_kv] as one head (K and V hold the same rows)"
                                    if cfg.is_mla and cfg.mla_cache == "latent" else
                                    "per layer K and V, [1, num_kv_heads, max_seq_len + scratch_slots, head_dim]"),
                         "dtype": "float32", "num_layers": num_layers,
                         "num_kv_heads": cfg.cache_kv_heads, "head_dim": cfg.cache_head_dim,
                         "max_seq_len": max_seq_len, "scratch_slots": tree_attention.scratch_slots(attention)},
            "inputs": [{"name": n, "dtype": d, "shape": s} for n, d, s in ins],
            "outputs": [{"name": n, "dtype": d, "shape": s} for n, d, s in outs]}


def source_entry(path: str) -> dict:
    """Where a head file (or directory) came from, to tell two builds apart."""
    return {"path": os.path.abspath(path), "sha256": sha256_path(path)}


def batched_form(cfg: ModelConfig, attention: str, dtype: str) -> bool:
    """Whether a build has the batched form of speccompile.graphs: dense GQA models of full attention, float32,
    with the fused kernel or speccompile's (the others run one sequence per pass)."""
    layers = range(cfg.num_hidden_layers)
    return not (cfg.is_mla or any(cfg.is_moe_layer(i) for i in layers) or any(cfg.is_sliding(i) for i in layers)
                or attention not in ("ort", "kernel") or dtype != "float32")


def batched_entry(entry: dict, name: str, max_batch: int, kind: str, signature: tuple | None = None) -> dict:
    """A model entry's batched form (speccompile.graphs): its graph, kind, slots and signature (None: the entry's
    own, already the batched one); the rest (weights, config, cache) the same."""
    out = entry | {"graph": f"{name}.onnx", "kind": kind, "max_batch": max_batch, "graph_version": BATCH_GRAPH_VERSION}
    if signature is not None:
        ins, outs = signature
        out |= {"inputs": [{"name": n, "dtype": d, "shape": s} for n, d, s in ins],
                "outputs": [{"name": n, "dtype": d, "shape": s} for n, d, s in outs]}
    return out
