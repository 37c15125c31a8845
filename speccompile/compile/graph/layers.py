"""The decoder blocks of one graph: attention and MLP per layer, each as its config and weights say (GQA or MLA,
dense or mixture of experts), joined by residual adds and RMSNorms."""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from speccompile.compile.config import ModelConfig
from speccompile.compile.graph.attention import grouped_query_attention, total_length
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
    query_seqlens: str = ""  # batched graphs: each sequence's real rows (speccompile.graphs, batched form)


def open_graph(name: str, cfg: ModelConfig, signature, weights: dict[str, np.ndarray], keep: Callable[[str], bool],
               attention: str, fused: bool) -> Stack:
    """A graph with the inputs of `signature` ((inputs, outputs) as speccompile.graphs.decoder_signature gives),
    the weights `keep` accepts, and the attention's total length."""
    g = GraphBuilder(name)
    for n, dt, shape in signature[0]:
        g.input(n, dt, shape, np.array(VERIFY_DEFAULTS[n], dt) if n in VERIFY_DEFAULTS else None)
    W = {k: g.weight(k, v) for k, v in weights.items() if keep(k)}
    batched = "query_seqlens" in (n for n, _, _ in signature[0])
    return Stack(g, cfg, W, RMSNorm(g, cfg.rms_norm_eps, fused), attention, total_length(g),
                 "query_seqlens" if batched else "")


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
        rope = (W.get(prefix + "rope.cos", W["rope.cos"]), W.get(prefix + "rope.sin", W["rope.sin"]))
        a = grouped_query_attention(g, cfg, W, p, x, i, s.attention, s.total_len, rope, s.query_seqlens)
    x, h = s.norm.add(a, h, W[p + "mlp_norm"])
    m = mixture_of_experts(g, cfg, W, p, x) if p + "experts.gate_up" in W else swiglu_mlp(g, W, p, x)
    return m, h
