"""The decoder blocks of one graph: attention and MLP per layer, each as its config and weights say (GQA or MLA,
dense or mixture of experts), joined by residual adds and RMSNorms."""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from speccompile.compile.config import ModelConfig
from speccompile.compile.graph.attention import grouped_query_attention, total_length, window_bias
from speccompile.compile.graph.linear import runs_kernels
from speccompile.compile.graph.mla import latent_attention
from speccompile.compile.graph.mlp import swiglu_mlp
from speccompile.compile.graph.moe import mixture_of_experts
from speccompile.compile.graph.norm import RMSNorm
from speccompile.graphs import VERIFY_DEFAULTS
from speccompile.graphs.builder import GraphBuilder


@dataclasses.dataclass
class Stack:
    """What the blocks of one graph share: its builder, config, weights (name -> initializer), norm, TreeAttention
    lowering and the attention's total length."""
    g: GraphBuilder
    cfg: ModelConfig
    W: dict[str, str]
    norm: RMSNorm
    attention: str
    total_len: str
    window_bias: str | None = None  # sliding layers' attention bias, emitted once per graph
    query_seqlens: str = ""  # batched graphs: each sequence's real rows (speccompile.graphs, batched form)
    kernels: bool = False  # the graph runs speccompile's kernels (graph/linear.runs_kernels)


def open_graph(name: str, cfg: ModelConfig, signature, weights: dict[str, np.ndarray], keep: Callable[[str], bool],
               attention: str, fused: bool) -> Stack:
    """A graph with the inputs of `signature` ((inputs, outputs) as speccompile.graphs.decoder_signature gives),
    the weights `keep` accepts, and the attention's total length."""
    g = GraphBuilder(name)
    for n, dt, shape in signature[0]:
        g.input(n, dt, shape, np.array(VERIFY_DEFAULTS[n], dt) if n in VERIFY_DEFAULTS else None)
    W = {k: g.weight(k, v) for k, v in weights.items() if keep(k)}
    batched = "query_seqlens" in (n for n, _, _ in signature[0])
    kernels = fused and runs_kernels(g, W, attention)
    return Stack(g, cfg, W, RMSNorm(g, cfg.rms_norm_eps, fused, kernels), attention, total_length(g),
                 query_seqlens="query_seqlens" if batched else "", kernels=kernels)


def packed_ids(g: GraphBuilder) -> str:
    """A batched pass's real rows' token ids, [1, P] (input row_index into the [N, S] layout): every product runs
    over them alone, and only the attention lays them out per slot (graph/attention.py)."""
    flat = g.op("Reshape", ["input_ids", g.const(np.array([-1], np.int64))])[0]
    return g.op("Unsqueeze", [g.op("Gather", [flat, "row_index"], axis=0)[0], g.const(np.array([0], np.int64))])[0]


def close_graph(s: Stack, signature) -> GraphBuilder:
    for n, dt, shape in signature[1]:
        s.g.output(n, dt, shape)
    return s.g


def decoder_layers(s: Stack, prefix: str, num_layers: int, x: str, h: str, final_norm: str | None):
    """Layers prefix + l0 .. l{num_layers-1} on x (the first attention's input) and h (the residual stream).
    Returns (x, h, taps): x normalised by the next layer's norm or final_norm (None: x = h, un-normalised), h the
    stream after the last layer, taps[i] the stream entering layer i (taps[num_layers]: h)."""
    taps = {}
    for i in range(num_layers):
        taps[i] = h
        m, h = decoder_layer(s, prefix, i, x, h)
        nxt = s.W[f"{prefix}l{i + 1}.attn_norm"] if i + 1 < num_layers else final_norm
        if nxt is None:
            x = h = s.g.op("Add", [m, h])[0]
        else:
            x, h = s.norm.add(m, h, nxt)
    return x, h, taps | {num_layers: h}


def decoder_layer(s: Stack, prefix: str, i: int, x: str, h: str) -> tuple[str, str]:
    """Layer i's attention on x, added to h and normalised, then its MLP. Returns (the MLP's output, the stream
    it adds to)."""
    g, cfg, W, p = s.g, s.cfg, s.W, f"{prefix}l{i}."
    if cfg.is_mla:
        a = latent_attention(g, cfg, W, p, x, i, s.norm, s.total_len, cfg.mla_cache)
    else:
        a = grouped_query_attention(g, cfg, W, p, x, i, s.attention, s.total_len, _rope(s, prefix, i),
                                    _bias(s, i), s.norm, s.query_seqlens)
    if p + "post_attn_norm" in W:  # sandwich norms (Gemma 3): attention's and the MLP's outputs normalised too
        a = s.norm(a, W[p + "post_attn_norm"])
    x, h = s.norm.add(a, h, W[p + "mlp_norm"])
    m = (mixture_of_experts(g, cfg, W, p, x) if p + "experts.gate_up" in W
         else swiglu_mlp(g, W, p, x, cfg.hidden_act))
    if p + "post_mlp_norm" in W:
        m = s.norm(m, W[p + "post_mlp_norm"])
    return m, h


def _rope(s: Stack, prefix: str, i: int) -> tuple[str, str]:
    """Layer i's cos/sin tables: a head's own (prefix rope.*), sliding layers' own base (rope_local.*), or rope.*"""
    table = "rope_local" if s.cfg.is_sliding(i) and "rope_local.cos" in s.W else "rope"
    return tuple(s.W.get(f"{prefix}{table}.{f}", s.W[f"{table}.{f}"]) for f in ("cos", "sin"))


def _bias(s: Stack, i: int) -> str:
    """Layer i's attention bias: the input, or for a sliding layer the input with the window's mask added."""
    if not s.cfg.is_sliding(i):
        return "attention_bias"
    if s.window_bias is None:
        s.window_bias = window_bias(s.g, s.cfg.sliding_window)
    return s.window_bias
