"""Grouped-query attention over the KV cache, through the tree-attention op (speccompile.plugins.tree_attention:
onnxruntime's fused kernel, standard ops, or one plugin node). Multi-head latent attention is graph/mla.py."""
from __future__ import annotations

import numpy as np

from speccompile.compile.config import ModelConfig
from speccompile.compile.graph.linear import matmul
from speccompile.graphs.builder import GraphBuilder
from speccompile.plugins import tree_attention


def total_length(g: GraphBuilder) -> str:
    """The fused kernel's total_sequence_length: the attention_bias's width. The runtime passes committed + S
    columns, so the kernel works over that many cache slots rather than all of them, or max_seq_len where a backend
    wants every shape static."""
    width = g.op("Shape", ["attention_bias"], start=3, end=4)[0]
    return g.op("Cast", [g.op("Squeeze", [width, g.const(np.array([0], np.int64))])[0]], to=6)[0]


def grouped_query_attention(g: GraphBuilder, cfg: ModelConfig, W: dict[str, str], p: str, x: str, layer: int,
                            lowering: str, total_len: str, rope: tuple[str, str], query_seqlens: str = "") -> str:
    """Layer `layer`'s attention (weights p + qkv, qkv_bias, o) on x [1, S, H_in] ([N, S, H_in] in a batched
    graph, whose input query_seqlens is passed); returns the o_proj output. rope: the (cos, sin) tables."""
    qkv = matmul(g, x, W, p + "qkv")
    if cfg.qkv_bias:
        qkv = g.op("Add", [qkv, W[p + "qkv_bias"]])[0]
    a = tree_attention.lower(
        g, lowering, qkv, f"past_key.{layer}", f"past_value.{layer}", f"present_key.{layer}",
        f"present_value.{layer}", seqlens_k="seqlens_k", total_len=total_len, cos=rope[0], sin=rope[1],
        position_ids="position_ids", attention_bias="attention_bias",
        num_heads=cfg.num_attention_heads, kv_num_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
        query_seqlens=query_seqlens)
    return matmul(g, a, W, p + "o")
