"""Grouped-query attention over the KV cache, through the tree-attention op (speccompile.plugins.tree_attention:
onnxruntime's fused kernel, standard ops, or one plugin node). Multi-head latent attention is graph/mla.py.

Two family facts are emitted here, around the op: per-head q/k RMSNorms (Qwen3, Gemma 3), which must come before
the fused rotary, and sliding-window attention, as a second additive bias (`window_bias`) over the same static
cache, so tree verification stays exact: a key is hidden by its position, not by its slot."""
from __future__ import annotations

import numpy as np

from speccompile.compile.config import ModelConfig
from speccompile.compile.graph.linear import matmul
from speccompile.errors import SpeccompileError, UnsupportedModelError, given
from speccompile.graphs.builder import GraphBuilder
from speccompile.plugins import tree_attention


def lowering_for(cfg: ModelConfig, asked: str, kernels: bool, products_on_kernels: bool = False) -> str:
    """The TreeAttention lowering a build uses: what it asked for, once speccompile's own attention kernel
    ("kernel") is checked to fit: the build runs speccompile's kernels and the model rotates every channel of its
    heads, a head dimension a multiple of 16 up to 256. "auto" (the default): the kernel where it fits and the
    target's layer products run on speccompile's kernels too (a plain step much faster: docs/results.md), else
    onnxruntime's."""
    if asked == "auto":
        return "kernel" if kernels and products_on_kernels and kernel_fits(cfg) else "ort"
    if asked != "kernel":
        return asked
    if not kernels:
        raise SpeccompileError(f"{given('attention', 'kernel')}: this build does not use speccompile's kernels "
                               "(--kernels onnxruntime, a CPU or build they do not run on)")
    if not kernel_fits(cfg):
        raise UnsupportedModelError(f"{given('attention', 'kernel')}: the kernel takes wholly rotated heads of a "
                                    f"multiple of 16 channels up to 256 ({cfg.rope_dim} of {cfg.head_dim} rotated)")
    return asked


def kernel_fits(cfg: ModelConfig) -> bool:
    """Whether speccompile's attention kernel takes this model's heads."""
    return cfg.rope_dim == cfg.head_dim and cfg.head_dim % 16 == 0 and cfg.head_dim <= 256


def total_length(g: GraphBuilder) -> str:
    """The fused kernel's total_sequence_length: the attention_bias's width. The runtime passes committed + S
    columns, so the kernel works over that many cache slots rather than all of them, or max_seq_len where a backend
    wants every shape static."""
    width = g.op("Shape", ["attention_bias"], start=3, end=4)[0]
    return g.op("Cast", [g.op("Squeeze", [width, g.const(np.array([0], np.int64))])[0]], to=6)[0]


def window_bias(g: GraphBuilder, window: int) -> str:
    """attention_bias with -inf where a key lies `window` or more positions behind the query (transformers'
    sliding window: key position > query position - window). Column j of the bias is cache slot j: a committed
    token's position is its slot; the step's own tokens (slots committed .. committed + S - 1) have their
    position_ids, which for tree nodes are committed + depth, not their slot."""
    c = lambda v: g.const(np.array(v, np.int64))  # noqa: E731
    pos = g.op("Squeeze", ["position_ids", c([0])])[0]  # [S]
    S = g.op("Shape", ["position_ids"], start=1, end=2)[0]
    T = g.op("Shape", ["attention_bias"], start=3, end=4)[0]
    committed = g.op("Sub", [g.op("Add", [g.op("Cast", ["seqlens_k"], to=7)[0], c([1])])[0], S])[0]
    cols = g.op("Range", [c(0), g.op("Squeeze", [T, c([0])])[0], c(1)])[0]  # [T]
    step_row = g.op("Clip", [g.op("Sub", [cols, committed])[0], c(0), g.op("Squeeze", [
        g.op("Sub", [S, c([1])])[0], c([0])])[0]])[0]
    key_pos = g.op("Where", [g.op("Less", [cols, committed])[0], cols, g.op("Gather", [pos, step_row], axis=0)[0]])[0]
    behind = g.op("Sub", [g.op("Unsqueeze", [pos, c([1])])[0], g.op("Unsqueeze", [key_pos, c([0])])[0]])[0]
    hidden = g.op("GreaterOrEqual", [behind, c(window)])[0]  # [S, T]
    mask = g.op("Where", [hidden, g.const(np.array(-np.inf, np.float32)), g.const(np.array(0.0, np.float32))])[0]
    return g.op("Add", ["attention_bias", g.op("Unsqueeze", [mask, c([0, 1])])[0]])[0]


def _qk_norms(g: GraphBuilder, cfg: ModelConfig, W: dict[str, str], p: str, qkv: str, norm) -> str:
    """RMSNorm over each head of q and of k (weights p + q_norm, k_norm [head_dim]); v as it is."""
    D, hq, hkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    c = lambda *v: g.const(np.array(v, np.int64))  # noqa: E731
    q, k, v = g.op("Split", [qkv, c(hq * D, hkv * D, hkv * D)], n_out=3, axis=2)

    def per_head(x, heads, gamma):
        y = norm(g.op("Reshape", [x, c(1, -1, heads, D)])[0], W[gamma])
        return g.op("Reshape", [y, c(1, -1, heads * D)])[0]

    return g.op("Concat", [per_head(q, hq, p + "q_norm"), per_head(k, hkv, p + "k_norm"), v], axis=2)[0]


def grouped_query_attention(g: GraphBuilder, cfg: ModelConfig, W: dict[str, str], p: str, x: str, layer: int,
                            lowering: str, total_len: str, rope: tuple[str, str], bias: str = "attention_bias",
                            norm=None, query_seqlens: str = "") -> str:
    """Layer `layer`'s attention (weights p + qkv, qkv_bias, q_norm, k_norm, o, o_bias) on x [1, S, H_in]; returns
    the o_proj output. rope: the (cos, sin) tables; bias: the additive mask (window_bias for sliding layers); norm:
    the graph's RMSNorm, for q/k norms; query_seqlens: a batched graph's input (x is then its packed real rows
    [1, P, H_in]: the attention alone runs them laid out per slot, speccompile.graphs batched form)."""
    if cfg.rope_dim != cfg.head_dim and lowering != "ort":
        raise UnsupportedModelError(f"partial rotary ({cfg.rope_dim} of {cfg.head_dim} channels) is lowered by "
                                    f"{given('attention', 'ort')} only")
    qkv = matmul(g, x, W, p + "qkv")
    if cfg.qkv_bias:
        qkv = g.op("Add", [qkv, W[p + "qkv_bias"]])[0]
    if p + "q_norm" in W:
        qkv = _qk_norms(g, cfg, W, p, qkv, norm)
    packed = bool(query_seqlens) and lowering == "kernel"  # the kernel reads and writes the packed rows itself
    if query_seqlens and not packed:
        qkv = _to_layout(g, qkv)
    a = tree_attention.lower(
        g, lowering, qkv, f"past_key.{layer}", f"past_value.{layer}", f"present_key.{layer}",
        f"present_value.{layer}", seqlens_k="seqlens_k", total_len=total_len, cos=rope[0], sin=rope[1],
        position_ids="position_ids", attention_bias=bias,
        num_heads=cfg.num_attention_heads, kv_num_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
        query_seqlens=query_seqlens, packed=packed)
    out = matmul(g, _to_rows(g, a) if query_seqlens and not packed else a, W, p + "o")
    return g.op("Add", [out, W[p + "o_bias"]])[0] if p + "o_bias" in W else out


def _to_layout(g: GraphBuilder, rows: str) -> str:
    """A batched graph's packed real rows [1, P, C] laid out per slot, [N, S, C] (input layout_index)."""
    shape = g.op("Concat", [g.op("Shape", ["input_ids"])[0], g.const(np.array([-1], np.int64))], axis=0)[0]
    return g.op("Reshape", [g.op("Gather", [rows, "layout_index"], axis=1)[0], shape])[0]


def _to_rows(g: GraphBuilder, laid: str) -> str:
    """[N, S, C] per slot back to the packed real rows [1, P, C] (input row_index)."""
    flat = g.op("Reshape", [laid, g.const(np.array([1, -1, 0], np.int64))])[0]
    return g.op("Gather", [flat, "row_index"], axis=1)[0]
