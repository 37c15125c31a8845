"""Lowering passes: checkpoint tensors -> graph weights -> a static decoder graph.

`lower_weights` renames and packs the checkpoint's tensors into the layout the graph consumes (q/k/v packed into
one matrix, gate/up into another, matrices transposed for MatMul); `build_decoder` emits the graph that follows
`speccompile.graphs.decoder_signature`. An early-exit draft is the same graph over fewer layers that references
the same weight names, so it costs no extra weights.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

from speccompile.compile.config import ModelConfig
from speccompile.errors import CheckpointError
from speccompile.graphs import VERIFY_DEFAULTS, decoder_signature
from speccompile.graphs.builder import GraphBuilder
from speccompile.plugins import tree_attention
from speccompile.compile.tensors import TensorReader
from speccompile.compile.head_screen import emit_head
from speccompile.compile.int8 import SUFFIX_CODES, SUFFIX_SCALES, int8_product, matmul
from speccompile.compile.verify import emit_verify, sampling_flag


def expected_checkpoint_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of this config must hold, with its shape (Hugging Face names)."""
    H, I, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
    t = {"model.embed_tokens.weight": (cfg.vocab_size, H), "model.norm.weight": (H,)}
    if not cfg.tie_word_embeddings:
        t["lm_head.weight"] = (cfg.vocab_size, H)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        t |= {p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
              p + "self_attn.q_proj.weight": (q, H), p + "self_attn.k_proj.weight": (kv, H),
              p + "self_attn.v_proj.weight": (kv, H), p + "self_attn.o_proj.weight": (H, q),
              p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H), p + "mlp.down_proj.weight": (H, I)}
        if cfg.qkv_bias:
            t |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                  p + "self_attn.v_proj.bias": (kv,)}
        if cfg.n_routed_experts:  # MoE blocks are checked by moe.lower_moe_weights
            for n in ("gate", "up", "down"):
                del t[p + f"mlp.{n}_proj.weight"]
    return t


def check_checkpoint(cfg: ModelConfig, tensors: dict[str, np.ndarray]) -> None:
    """Fail early, naming the tensor, if the checkpoint is incomplete or misshapen."""
    for name, shape in expected_checkpoint_tensors(cfg).items():
        if name not in tensors:
            raise CheckpointError(f"checkpoint is missing tensor {name!r}")
        if tuple(tensors[name].shape) != shape:
            raise CheckpointError(f"tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {shape}")


def lower_weights(cfg: ModelConfig, tensors: dict[str, np.ndarray], max_seq_len: int) -> dict[str, np.ndarray]:
    """Checkpoint tensors (HF names) -> the graph's weights, float32, in the layout the graph uses."""
    if cfg.is_mla:
        return _lower_deepseek_weights(cfg, tensors, max_seq_len)
    check_checkpoint(cfg, tensors)
    f32 = lambda name: np.ascontiguousarray(tensors[name], dtype=np.float32)  # noqa: E731
    w = {"embed": f32("model.embed_tokens.weight"), "final_norm": f32("model.norm.weight")}
    if not cfg.tie_word_embeddings:
        w["lm_head"] = f32("lm_head.weight")
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        w[f"l{i}.attn_norm"] = f32(p + "input_layernorm.weight")
        w[f"l{i}.mlp_norm"] = f32(p + "post_attention_layernorm.weight")
        w[f"l{i}.qkv"] = np.ascontiguousarray(np.concatenate(
            [f32(p + f"self_attn.{x}_proj.weight") for x in "qkv"], 0).T)
        if cfg.qkv_bias:
            w[f"l{i}.qkv_bias"] = np.concatenate([f32(p + f"self_attn.{x}_proj.bias") for x in "qkv"])
        w[f"l{i}.o"] = np.ascontiguousarray(f32(p + "self_attn.o_proj.weight").T)
        if cfg.n_routed_experts:  # Mixtral
            from speccompile.compile.moe import lower_moe_weights
            w |= lower_moe_weights(cfg, TensorReader(tensors, p + "block_sparse_moe."), f"l{i}.")
            continue
        # gate and up as two matrices, not one fused [H, 2I]: splitting the fused product costs a Split node per
        # layer, measured slower on CPU (see build_decoder)
        w[f"l{i}.gate"] = np.ascontiguousarray(f32(p + "mlp.gate_proj.weight").T)
        w[f"l{i}.up"] = np.ascontiguousarray(f32(p + "mlp.up_proj.weight").T)
        w[f"l{i}.down"] = np.ascontiguousarray(f32(p + "mlp.down_proj.weight").T)
    w["rope.cos"], w["rope.sin"] = tree_attention.rope_tables(max_seq_len, cfg.head_dim, cfg.rope_theta)
    return w


def _lower_deepseek_weights(cfg: ModelConfig, tensors: dict[str, np.ndarray], max_seq_len: int):
    from speccompile.compile.deepseek import lower_layer_weights
    for name, shape in (("model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size)),
                        ("model.norm.weight", (cfg.hidden_size,))):
        if name not in tensors:
            raise CheckpointError(f"checkpoint is missing tensor {name!r}")
        if tuple(tensors[name].shape) != shape:
            raise CheckpointError(f"tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {shape}")
    w = {"embed": np.asarray(tensors["model.embed_tokens.weight"], np.float32),
         "final_norm": np.asarray(tensors["model.norm.weight"], np.float32)}
    if not cfg.tie_word_embeddings:
        if "lm_head.weight" not in tensors:
            raise CheckpointError("checkpoint is missing tensor 'lm_head.weight'")
        w["lm_head"] = np.asarray(tensors["lm_head.weight"], np.float32)
    for i in range(cfg.num_hidden_layers):
        w |= lower_layer_weights(cfg, tensors, f"model.layers.{i}.", f"l{i}.", cfg.is_moe_layer(i))
    w["rope.cos"], w["rope.sin"] = tree_attention.rope_tables(max_seq_len, cfg.rope_dim, cfg.rope_theta)
    return w


def _layer_of(weight_name: str) -> int | None:
    m = re.match(r"(?:mtp\.)?l(\d+)\.", weight_name)
    return int(m.group(1)) if m else None


MTP_TENSORS = ("mtp.enorm.weight", "mtp.hnorm.weight", "mtp.eh_proj.weight", "mtp.norm.weight")


def lower_mtp_weights(cfg: ModelConfig, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """An MTP head (DeepSeek-V3 layout: enorm, hnorm, eh_proj, one decoder block, its own final norm; embedding
    and output head shared with the target) -> graph weights named mtp.*."""
    block = {k.replace("mtp.layer.", "model.layers.0."): v for k, v in tensors.items() if k.startswith("mtp.layer.")}
    for name in MTP_TENSORS:
        if name not in tensors:
            raise CheckpointError(f"MTP head is missing tensor {name!r}")
    H = cfg.hidden_size
    if tuple(tensors["mtp.eh_proj.weight"].shape) != (H, 2 * H):
        raise CheckpointError(f"mtp.eh_proj.weight has shape {tuple(tensors['mtp.eh_proj.weight'].shape)}, "
                              f"expected {(H, 2 * H)}")
    if cfg.is_mla:
        from speccompile.compile.deepseek import lower_layer_weights
        moe = "mtp.layer.mlp.gate.weight" in tensors
        out = lower_layer_weights(cfg, {k.replace("mtp.layer.", "mtp.l0."): v for k, v in tensors.items()},
                                  "mtp.l0.", "mtp.l0.", moe)
        f32 = lambda name: np.ascontiguousarray(tensors[name], dtype=np.float32)  # noqa: E731
        return out | {"mtp.enorm": f32("mtp.enorm.weight"), "mtp.hnorm": f32("mtp.hnorm.weight"),
                      "mtp.eh_proj": np.ascontiguousarray(f32("mtp.eh_proj.weight").T),
                      "mtp.norm": f32("mtp.norm.weight")}
    one_layer = dataclasses.replace(cfg, num_hidden_layers=1, tie_word_embeddings=True, vocab_size=1)
    block |= {"model.embed_tokens.weight": np.zeros((1, H), np.float32),  # unused: the target's is shared
              "model.norm.weight": tensors["mtp.norm.weight"]}
    w = lower_weights(one_layer, block, max_seq_len=16)
    out = {f"mtp.{k}": v for k, v in w.items() if _layer_of(k) is not None}
    f32 = lambda name: np.ascontiguousarray(tensors[name], dtype=np.float32)  # noqa: E731
    out |= {"mtp.enorm": f32("mtp.enorm.weight"), "mtp.hnorm": f32("mtp.hnorm.weight"),
            "mtp.eh_proj": np.ascontiguousarray(f32("mtp.eh_proj.weight").T), "mtp.norm": f32("mtp.norm.weight")}
    return out


def build_decoder(cfg: ModelConfig, weights: dict[str, np.ndarray], max_seq_len: int, num_layers: int | None = None,
                  attention: str = "ort", fused: bool = True, name: str = "decoder", mtp: bool = False,
                  verify: bool = False, head: str = "mtp", norm_before_residual: bool = False,
                  aux_layers: list | None = None) -> GraphBuilder:
    """Emit the decoder graph over the first `num_layers` layers (all by default) plus the final norm and head.

    attention: the TreeAttention lowering ("ort" fused kernel or "reference" standard ops).
    fused: use onnxruntime's fused residual+RMSNorm kernels; False keeps to standard ONNX ops only.
    mtp: emit an MTP draft head instead: its input combines the target's hidden state (input `hidden_in`) with
         the next token's embedding, then its one block (weights mtp.l0.*) and its own norm (mtp.norm) feed the
         target's output head.
    verify: add the verify extension (in-graph acceptance, see `emit_verify`); the target's graph has it.
    head: with mtp, the head's layout: "mtp", or "eagle"/"eagle3" (see speccompile.compile.eagle; norm_before_residual is
          an EAGLE-3 variant).
    aux_layers: add the output aux_hidden_states, these features side by side: layer id i = the residual stream
          entering layer i (num_layers: after the last layer), "norm" = after the final norm.
    """
    L = 1 if mtp else (cfg.num_hidden_layers if num_layers is None else num_layers)
    prefix = "mtp." if mtp else ""
    D = cfg.head_dim
    g = GraphBuilder(name)
    vocab = len(weights["mtp.d2t"]) if "mtp.d2t" in weights else cfg.vocab_size
    # the exact greedy head (speccompile.compile.head_screen): a target with the verify extension whose build added the
    # screen's tensors; fused only (its MatMulNBits is onnxruntime's)
    screen = verify and fused and not mtp and "head_screen.codes" in weights
    ins, outs = decoder_signature(L, cfg.cache_kv_heads, cfg.cache_head_dim, max_seq_len, vocab, cfg.hidden_size, mtp,
                                  verify, aux_width=len(aux_layers or ()) * cfg.hidden_size, screen=screen)
    for n, dt, shape in ins:
        g.input(n, dt, shape, np.array(VERIFY_DEFAULTS[n], dt) if n in VERIFY_DEFAULTS else None)
    # the screen's tensors: the target's screen, or an int8 MTP head over the full vocabulary, which scores with
    # the same int8 matrix (the build passes its codes and scales only then)
    screen_keys = ("head_screen.codes", "head_screen.scales") if mtp else ()
    W = {k: g.weight(k, v) for k, v in weights.items()
         if (_layer_of(k) is None or _layer_of(k) < L) and (screen or not k.startswith("head_screen.")
                                                             or k in screen_keys)}
    # The fused kernel's total_sequence_length is the attention_bias's width: the runtime passes committed + S
    # columns, so the kernel works over that many slots (profiled on SmolLM2 at ~100 tokens: 1.4 ms of attention
    # per pass against 3.3 ms at the full 2048 width), or max_seq_len where a backend wants every shape static.
    total_len = g.op("Cast", [g.op("Squeeze", [g.op("Shape", ["attention_bias"], start=3, end=4)[0],
                                               g.const(np.array([0], np.int64))])[0]], to=6)[0]
    eps = cfg.rms_norm_eps

    def norm(x, gamma):
        if fused:
            return g.op("SimplifiedLayerNormalization", [x, gamma], axis=-1, epsilon=eps, stash_type=1)[0]
        return g.op("RMSNormalization", [x, gamma], axis=-1, epsilon=eps)[0]

    def add_norm(x, residual, gamma):
        """(norm(x + residual), x + residual)"""
        if fused:
            # outputs 1 and 2 (mean, inverse std) unnamed: fetched, they would cost a write per row
            out, total = g.fresh("norm"), g.fresh("residual")
            g.op("SkipSimplifiedLayerNormalization", [x, residual, gamma], outputs=[out, "", "", total],
                 domain="com.microsoft", epsilon=eps)
            return out, total
        s = g.op("Add", [x, residual])[0]
        return norm(s, gamma), s

    h = g.op("Gather", [W.get("mtp.embed", W["embed"]), "input_ids"], axis=0)[0]
    x = None
    if mtp and head != "mtp":  # EAGLE heads: speccompile.compile.eagle
        from speccompile.compile.eagle import emit_head_input
        x, h = emit_head_input(g, W, head, norm, h, norm_before_residual)
    elif mtp:  # z = eh_proj([enorm(embedding); hnorm(hidden)])
        both = g.op("Concat", [norm(h, W["mtp.enorm"]), norm("hidden_in", W["mtp.hnorm"])], axis=-1)[0]
        h = matmul(g, both, W, "mtp.eh_proj")
    final_norm = W.get("mtp.norm") if mtp else W["final_norm"]  # None: EAGLE-1 feeds its block's output as it is
    if x is None:
        x = norm(h, W[f"{prefix}l0.attn_norm"]) if L else h
    taps = {}
    for i in range(L):
        taps[i] = h
        p = f"{prefix}l{i}."
        if cfg.is_mla:
            from speccompile.compile.deepseek import emit_mla
            a = emit_mla(g, cfg, W, p, x, i, norm, total_len, cfg.mla_cache)
        else:
            qkv = matmul(g, x, W, p + "qkv")
            if cfg.qkv_bias:
                qkv = g.op("Add", [qkv, W[p + "qkv_bias"]])[0]
            a = tree_attention.lower(
                g, attention, qkv, f"past_key.{i}", f"past_value.{i}", f"present_key.{i}", f"present_value.{i}",
                seqlens_k="seqlens_k", total_len=total_len, cos=W.get(prefix + "rope.cos", W["rope.cos"]),
                sin=W.get(prefix + "rope.sin", W["rope.sin"]),
                position_ids="position_ids", attention_bias="attention_bias",
                num_heads=cfg.num_attention_heads, kv_num_heads=cfg.num_key_value_heads, head_dim=D)
            a = matmul(g, a, W, p + "o")
        x, h = add_norm(a, h, W[p + "mlp_norm"])
        if p + "experts.gate_up" in W:
            from speccompile.compile.moe import emit_moe
            m = emit_moe(g, cfg, W, p, x)
        else:
            if p + "gate" in W or p + "gate" + SUFFIX_CODES in W:
                gate, up = matmul(g, x, W, p + "gate"), matmul(g, x, W, p + "up")
            else:  # heads and DeepSeek layers keep one fused matrix
                gate, up = g.op("Split", [g.op("MatMul", [x, W[p + "gate_up"]])[0]], n_out=2, axis=-1,
                                num_outputs=2)
            act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])[0]])[0], up])[0]
            m = matmul(g, act, W, p + "down")
        nxt = W[f"{prefix}l{i + 1}.attn_norm"] if i + 1 < L else final_norm
        if nxt is None:
            x = h = g.op("Add", [m, h])[0]
        else:
            x, h = add_norm(m, h, nxt)
    if not L:
        x = norm(h, final_norm)
    squeeze0 = g.const(np.array([0], np.int64))
    # the residual stream before the final norm: what MTP/EAGLE-style heads consume
    g.op("Squeeze", [h, squeeze0], outputs=["hidden_states"])
    if aux_layers:  # the features EAGLE heads read (speccompile.compile.eagle)
        taps |= {L: h, "norm": x}
        g.op("Squeeze", [g.op("Concat", [taps[t] for t in aux_layers], axis=-1)[0], squeeze0],
             outputs=["aux_hidden_states"])
    # Only the rows asked for reach the head: the head is the largest matrix of a small model.
    rows = g.op("Gather", [g.op("Squeeze", [x, squeeze0])[0], "logits_index"], axis=0)[0]
    head = W.get("mtp.head", W.get("lm_head", W["embed"]))
    sampling = sampling_flag(g) if verify else None
    if screen:  # greedy passes that ask for no exact logits take the int8 screen
        exact = g.op("Squeeze", ["full_logits", squeeze0])[0]
        emit_head(g, rows, head, W, g.op("Not", [g.op("Or", [exact, sampling])[0]])[0])
    else:
        if "mtp.head" + SUFFIX_CODES in W:  # an int8 draft head (speccompile.compile.int8)
            int8_product(g, rows, W["mtp.head" + SUFFIX_CODES], W["mtp.head" + SUFFIX_SCALES], output="logits")
        elif "head_screen.codes" in W:  # an int8 draft head over the target's whole vocabulary
            int8_product(g, rows, W["head_screen.codes"], W["head_screen.scales"], output="logits")
        else:
            g.op("Gemm", [rows, head], outputs=["logits"], transB=1)
        if "mtp.d2t" in W:  # a reduced draft vocabulary: map the winner back to a target token id
            g.op("Gather", [W["mtp.d2t"], g.op("ArgMax", ["logits"], axis=-1, keepdims=0)[0]],
                 outputs=["next_token"], axis=0)
        else:
            g.op("ArgMax", ["logits"], outputs=["next_token"], axis=-1, keepdims=0)
    if verify:
        emit_verify(g, "logits", "next_token", sampling)
    for n, dt, shape in outs:
        g.output(n, dt, shape)
    return g

