"""Mixture-of-experts layers in a static graph (DeepSeek-V3 and Mixtral).

The router is in the graph: DeepSeek-V3 scores experts with a sigmoid, adds the score-correction bias for the
choice only, keeps the best `topk_group` groups (by the sum of each group's top-2) and takes the top-k there;
Mixtral takes the top-k of a softmax. The chosen weights are normalised and scaled. Then the chosen experts'
matrices are gathered by index — a token reads its k experts, never all of them, which is what keeps
memory-bound decoding cheap — and shared experts run beside them as a dense MLP. No Python loop over experts.
The weights' layout: speccompile.compile.weights.moe.
"""
from __future__ import annotations

import numpy as np

from speccompile.compile.config import ModelConfig
from speccompile.compile.graph.mlp import fused_gate_up
from speccompile.graphs.builder import GraphBuilder


def mixture_of_experts(g: GraphBuilder, cfg: ModelConfig, W: dict, p: str, x: str) -> str:
    """Routed experts (only the chosen ones' weights are read) plus shared experts; x: [1, S, H]."""
    E, k, G = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group
    H = cfg.hidden_size
    const = lambda *a: g.const(np.array(a, np.int64))  # noqa: E731
    xs = g.op("Reshape", [x, const(-1, H)])[0]  # [S, H]
    logits = g.op("MatMul", [xs, W[p + "router"]])[0]  # [S, E]
    if cfg.router_scoring == "softmax":
        scores = choice = g.op("Softmax", [logits], axis=-1)[0]
    else:
        scores = g.op("Sigmoid", [logits])[0]
        choice = g.op("Add", [scores, W[p + "router_bias"]])[0]
    if G > 1:  # group-limited routing: keep the topk_group groups with the best sum of their top-2 scores
        grouped = g.op("Reshape", [choice, const(-1, G, E // G)])[0]
        top2 = g.op("TopK", [grouped, const(min(2, E // G))], n_out=2, axis=2)[0]
        group_score = g.op("ReduceSum", [top2, const(2)], keepdims=0)[0]  # [S, G]
        kth = g.op("TopK", [group_score, const(cfg.topk_group)], n_out=2, axis=1)[0]
        kth = g.op("ReduceMin", [kth, const(1)], keepdims=1)[0]
        group_keep = g.op("GreaterOrEqual", [group_score, kth])[0]  # [S, G]
        keep = g.op("Reshape", [g.op("Expand", [g.op("Unsqueeze", [group_keep, const(2)])[0],
                                                const(1, G, E // G)])[0], const(-1, E)])[0]
        choice = g.op("Where", [keep, choice, g.const(np.array(-np.inf, np.float32))])[0]
    idx = g.op("TopK", [choice, const(k)], outputs=[g.fresh("topk"), p + "expert_index"], axis=1)[1]  # [S, k]
    weight = g.op("GatherElements", [scores, idx], axis=1)[0]  # [S, k]: unbiased scores of the chosen
    if cfg.norm_topk_prob:
        total = g.op("Add", [g.op("ReduceSum", [weight, const(1)], keepdims=1)[0],
                             g.const(np.array(1e-20, np.float32))])[0]
        weight = g.op("Div", [weight, total])[0]
    weight = g.op("Mul", [weight, g.const(np.array(cfg.routed_scaling_factor, np.float32))])[0]
    # gather the chosen experts' matrices: [S*k, H, 2I] and [S*k, I, H]
    flat = g.op("Reshape", [idx, const(-1)])[0]
    w_gu = g.op("Gather", [W[p + "experts.gate_up"], flat], axis=0)[0]
    w_down = g.op("Gather", [W[p + "experts.down"], flat], axis=0)[0]
    xr = g.op("Reshape", [g.op("Expand", [g.op("Unsqueeze", [xs, const(1)])[0], const(1, k, 1)])[0],
                          const(-1, 1, H)])[0]  # [S*k, 1, H]
    act = fused_gate_up(g, xr, w_gu, cfg.hidden_act)  # [S*k, 1, I]
    out = g.op("Reshape", [g.op("MatMul", [act, w_down])[0], const(-1, k, H)])[0]  # [S, k, H]
    out = g.op("ReduceSum", [g.op("Mul", [out, g.op("Unsqueeze", [weight, const(2)])[0]])[0], const(1)],
               keepdims=0)[0]  # [S, H]
    out = g.op("Reshape", [out, const(1, -1, H)])[0]
    if p + "shared.gate_up" in W:
        shared = g.op("MatMul", [fused_gate_up(g, x, W[p + "shared.gate_up"], cfg.hidden_act),
                                 W[p + "shared.down"]])[0]
        out = g.op("Add", [out, shared])[0]
    return out
