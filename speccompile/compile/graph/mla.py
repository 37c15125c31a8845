"""DeepSeek-V3's multi-head latent attention (MLA) in a static graph.

KV cache layout — the compressed latent, not expanded K/V. Per token and layer the cache keeps
[k_rope (qk_rope_head_dim) ; c_kv (kv_lora_rank)], one "head" shared by all query heads. Attention runs on it
directly with W_UK absorbed into the query and W_UV applied after (the DeepSeek-V2 inference trick):

    q_h . k_h = q_rope_h . k_rope + q_nope_h . (W_UK_h c) = [q_rope_h ; W_UK_h^T q_nope_h] . [k_rope ; c]
    o_h       = W_UV_h (sum_j a_hj c_j)

so the fused GroupQueryAttention kernel serves it as multi-query attention with head size rope + lora
(kv_num_heads = 1), with the same tree mask, in-place cache and `seqlens_k` as every other model. The value
cache holds the same rows as the key cache (the kernel needs both; the output's rope part is dropped). Memory per
token per layer: 2 (rope + lora) floats, against 2 * heads * (nope + rope) for expanded K/V — see
tools/bench_deepseek.py for the figures. The weights' layout: speccompile.compile.weights.mla.
"""
from __future__ import annotations

import numpy as np

from speccompile.compile.config import ModelConfig
from speccompile.compile.graph.linear import matmul
from speccompile.graphs.builder import GraphBuilder


def latent_attention(g: GraphBuilder, cfg: ModelConfig, W: dict, p: str, x: str, layer: int, norm,
                     total_len: str, cache: str = "latent") -> str:
    """Multi-head latent attention of layer `layer`; returns the o_proj output.

    cache="latent": attention on the compressed cache (see the module docstring). cache="expanded": the
    textbook form, K = [k_nope_h ; k_rope] and V = v_h (zero-padded to the K head size) per head, cached
    expanded — kept to measure the choice against."""
    nh, nope, rope, lora, v = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                               cfg.kv_lora_rank, cfg.v_head_dim)
    const = lambda *a: g.const(np.array(a, np.int64))  # noqa: E731
    q = (g.op("MatMul", [norm(_biased(g, W, p + "q_a", g.op("MatMul", [x, W[p + "q_a"]])[0]), W[p + "q_a_norm"]),
                         W[p + "q_b"]])[0]
         if p + "q_a" in W else g.op("MatMul", [x, W[p + "q"]])[0])
    q = g.op("Reshape", [q, const(1, -1, nh, nope + rope)])[0]  # [1, S, nh, nope+rope]
    q_nope, q_rope = g.op("Split", [q, const(nope, rope)], n_out=2, axis=3)
    kv = _biased(g, W, p + "kv_a", g.op("MatMul", [x, W[p + "kv_a"]])[0])  # [1, S, lora+rope]
    c, k_rope = g.op("Split", [kv, const(lora, rope)], n_out=2, axis=2)
    c = norm(c, W[p + "kv_a_norm"])
    # rotary on the rope parts only (interleaved pairs, as DeepSeek lays them out)
    q_rope = g.op("RotaryEmbedding", [g.op("Reshape", [q_rope, const(1, -1, nh * rope)])[0], W["rope.cos"],
                                      W["rope.sin"], "position_ids"], num_heads=nh,
                  interleaved=int(cfg.rope_interleave))[0]
    k_rope = g.op("RotaryEmbedding", [k_rope, W["rope.cos"], W["rope.sin"], "position_ids"], num_heads=1,
                  interleaved=int(cfg.rope_interleave))[0]
    q_nope = g.op("Transpose", [g.op("Reshape", [q_nope, const(-1, nh, nope)])[0]], perm=[1, 0, 2])[0]  # [nh,S,nope]
    if cache == "expanded":
        return _biased(g, W, p + "o", _expanded_attention(g, cfg, W, p, layer, const, q_nope, q_rope, c, k_rope,
                                                          total_len))
    # absorbed query: [q_rope_h ; W_UK_h^T q_nope_h] per head
    q_lat = g.op("MatMul", [q_nope, W[p + "w_uk"]])[0]  # [nh, S, lora]
    q_rope = g.op("Transpose", [g.op("Reshape", [q_rope, const(-1, nh, rope)])[0]], perm=[1, 0, 2])[0]
    q_all = g.op("Concat", [q_rope, q_lat], axis=2)[0]  # [nh, S, rope+lora]
    q_all = g.op("Reshape", [g.op("Transpose", [q_all], perm=[1, 0, 2])[0], const(1, -1, nh * (rope + lora))])[0]
    k_all = g.op("Concat", [k_rope, c], axis=2)[0]  # [1, S, rope+lora]: the cache row
    y = g.op("GroupQueryAttention", [q_all, k_all, k_all, f"past_key.{layer}", f"past_value.{layer}", "seqlens_k",
                                     total_len, "", "", "", "attention_bias"],
             outputs=[g.fresh("mla"), f"present_key.{layer}", f"present_value.{layer}"], domain="com.microsoft",
             num_heads=nh, kv_num_heads=1, scale=float((nope + rope) ** -0.5 * cfg.attn_scale_factor))[0]
    y = g.op("Reshape", [y, const(-1, nh, rope + lora)])[0]  # [S, nh, rope+lora]
    o_lat = g.op("Slice", [y, const(rope), const(rope + lora), const(2)])[0]  # the value part: sum_j a_hj c_j
    o = g.op("MatMul", [g.op("Transpose", [o_lat], perm=[1, 0, 2])[0], W[p + "w_uv_t"]])[0]  # [nh, S, v]
    o = g.op("Reshape", [g.op("Transpose", [o], perm=[1, 0, 2])[0], const(1, -1, nh * v)])[0]
    return _biased(g, W, p + "o", matmul(g, o, W, p + "o"))


def _biased(g: GraphBuilder, W: dict, matrix: str, y: str) -> str:
    """y, the product with W[matrix], plus its bias where the checkpoint has one (attention_bias: true)."""
    return g.op("Add", [y, W[matrix + "_bias"]])[0] if matrix + "_bias" in W else y


def _expanded_attention(g, cfg, W, p, layer, const, q_nope, q_rope, c, k_rope, total_len):
    nh, nope, rope, v = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    d = nope + rope
    q_rope = g.op("Transpose", [g.op("Reshape", [q_rope, const(-1, nh, rope)])[0]], perm=[1, 0, 2])[0]
    q = g.op("Concat", [q_nope, q_rope], axis=2)[0]  # [nh, S, d]
    q = g.op("Reshape", [g.op("Transpose", [q], perm=[1, 0, 2])[0], const(1, -1, nh * d)])[0]
    cs = g.op("Transpose", [g.op("Reshape", [c, const(-1, cfg.kv_lora_rank)])[0]], perm=[1, 0])[0]  # [lora, S]
    w_uk_t = g.op("Transpose", [W[p + "w_uk"]], perm=[0, 2, 1])[0]  # [nh, lora, nope]
    k_nope = g.op("MatMul", [g.op("Transpose", [cs], perm=[1, 0])[0], w_uk_t])[0]  # [nh, S, nope]
    vals = g.op("MatMul", [g.op("Transpose", [cs], perm=[1, 0])[0], W[p + "w_uv_t"]])[0]  # [nh, S, v]
    k_r = g.op("Expand", [g.op("Reshape", [k_rope, const(1, -1, rope)])[0], const(nh, 1, 1)])[0]  # [nh, S, rope]
    k = g.op("Concat", [k_nope, k_r], axis=2)[0]
    vals = g.op("Pad", [vals, const(0, 0, 0, 0, 0, d - v)])[0]  # the kernel wants one head size for K and V
    k = g.op("Reshape", [g.op("Transpose", [k], perm=[1, 0, 2])[0], const(1, -1, nh * d)])[0]
    vals = g.op("Reshape", [g.op("Transpose", [vals], perm=[1, 0, 2])[0], const(1, -1, nh * d)])[0]
    y = g.op("GroupQueryAttention", [q, k, vals, f"past_key.{layer}", f"past_value.{layer}", "seqlens_k",
                                     total_len, "", "", "", "attention_bias"],
             outputs=[g.fresh("mha"), f"present_key.{layer}", f"present_value.{layer}"], domain="com.microsoft",
             num_heads=nh, kv_num_heads=nh, scale=float(d ** -0.5 * cfg.attn_scale_factor))[0]
    y = g.op("Slice", [g.op("Reshape", [y, const(1, -1, nh, d)])[0], const(0), const(v), const(3)])[0]
    return matmul(g, g.op("Reshape", [y, const(1, -1, nh * v)])[0], W, p + "o")
