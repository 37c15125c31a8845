"""Weight lowering: checkpoint tensors (Hugging Face names) -> the graph's weights, float32, in the layout the graphs
of speccompile.compile.graph read: q/k/v packed into one matrix, matrices transposed for MatMul, names l{i}.* per
layer (mtp.l0.* for an MTP head's block). DeepSeek-V3 layers: weights/mla.py; mixture-of-experts blocks:
weights/moe.py.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from speccompile.compile.config import ModelConfig
from speccompile.compile.weights.mla import lower_mla_layer
from speccompile.compile.weights.moe import lower_moe_weights
from speccompile.compile.weights.names import layer_of
from speccompile.compile.weights.tensors import TensorReader
from speccompile.errors import CheckpointError
from speccompile.plugins import tree_attention


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
        if cfg.n_routed_experts:  # MoE blocks are checked by weights/moe.lower_moe_weights
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
            w |= lower_moe_weights(cfg, TensorReader(tensors, p + "block_sparse_moe."), f"l{i}.")
            continue
        # gate and up as two matrices, not one fused [H, 2I] (see graph/mlp.swiglu_mlp)
        w[f"l{i}.gate"] = np.ascontiguousarray(f32(p + "mlp.gate_proj.weight").T)
        w[f"l{i}.up"] = np.ascontiguousarray(f32(p + "mlp.up_proj.weight").T)
        w[f"l{i}.down"] = np.ascontiguousarray(f32(p + "mlp.down_proj.weight").T)
    w["rope.cos"], w["rope.sin"] = tree_attention.rope_tables(max_seq_len, cfg.head_dim, cfg.rope_theta)
    return w


def _lower_deepseek_weights(cfg: ModelConfig, tensors: dict[str, np.ndarray], max_seq_len: int):
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
        w |= lower_mla_layer(cfg, tensors, f"model.layers.{i}.", f"l{i}.", cfg.is_moe_layer(i))
    w["rope.cos"], w["rope.sin"] = tree_attention.rope_tables(max_seq_len, cfg.rope_dim, cfg.rope_theta)
    return w


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
        moe = "mtp.layer.mlp.gate.weight" in tensors
        out = lower_mla_layer(cfg, {k.replace("mtp.layer.", "mtp.l0."): v for k, v in tensors.items()},
                                  "mtp.l0.", "mtp.l0.", moe)
        f32 = lambda name: np.ascontiguousarray(tensors[name], dtype=np.float32)  # noqa: E731
        return out | {"mtp.enorm": f32("mtp.enorm.weight"), "mtp.hnorm": f32("mtp.hnorm.weight"),
                      "mtp.eh_proj": np.ascontiguousarray(f32("mtp.eh_proj.weight").T),
                      "mtp.norm": f32("mtp.norm.weight")}
    one_layer = dataclasses.replace(cfg, num_hidden_layers=1, tie_word_embeddings=True, vocab_size=1)
    block |= {"model.embed_tokens.weight": np.zeros((1, H), np.float32),  # unused: the target's is shared
              "model.norm.weight": tensors["mtp.norm.weight"]}
    w = lower_weights(one_layer, block, max_seq_len=16)
    out = {f"mtp.{k}": v for k, v in w.items() if layer_of(k) is not None}
    f32 = lambda name: np.ascontiguousarray(tensors[name], dtype=np.float32)  # noqa: E731
    out |= {"mtp.enorm": f32("mtp.enorm.weight"), "mtp.hnorm": f32("mtp.hnorm.weight"),
            "mtp.eh_proj": np.ascontiguousarray(f32("mtp.eh_proj.weight").T), "mtp.norm": f32("mtp.norm.weight")}
    return out
