"""Weight lowering: checkpoint tensors (Hugging Face names) -> the graph's weights, float32, in the layout the graphs
of speccompile.compile.graph read: q/k/v packed into one matrix, matrices transposed for MatMul, names l{i}.* per
layer (mtp.l0.* for an MTP head's block). DeepSeek-V3 layers: weights/mla.py; mixture-of-experts blocks:
weights/moe.py.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from speccompile.compile.config import ModelConfig
from speccompile.compile.families import FAMILIES
from speccompile.compile.rope import rope_tables
from speccompile.compile.weights.mla import lower_mla_layer
from speccompile.compile.weights.moe import lower_moe_weights
from speccompile.compile.weights.names import layer_of
from speccompile.compile.weights.tensors import TensorReader
from speccompile.errors import CheckpointError


def expected_checkpoint_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of this config must hold, with its shape (Hugging Face names, as the family's
    checkpoints spell them: compile/families.py)."""
    fam = FAMILIES[cfg.model_type]
    H, I, q, kv, D = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size, cfg.head_dim
    t = {"model.embed_tokens.weight": (cfg.vocab_size, H), "model.norm.weight": (H,)}
    if not cfg.tie_word_embeddings:
        t["lm_head.weight"] = (cfg.vocab_size, H)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."  # in this order: the tiny presets draw their random weights in it
        t |= {p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,)}
        if fam.fused_qkv:
            t[p + "self_attn.qkv_proj.weight"] = (q + 2 * kv, H)
        else:
            t |= {p + "self_attn.q_proj.weight": (q, H), p + "self_attn.k_proj.weight": (kv, H),
                  p + "self_attn.v_proj.weight": (kv, H)}
        t[p + "self_attn.o_proj.weight"] = (H, q)
        if fam.fused_gate_up:
            t[p + "mlp.gate_up_proj.weight"] = (2 * I, H)
        else:
            t |= {p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H)}
        t[p + "mlp.down_proj.weight"] = (H, I)
        if cfg.qkv_bias:
            t |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                  p + "self_attn.v_proj.bias": (kv,)}
        if cfg.o_bias:
            t[p + "self_attn.o_proj.bias"] = (H,)
        if cfg.qk_norm:
            t |= {p + "self_attn.q_norm.weight": (D,), p + "self_attn.k_norm.weight": (D,)}
        if cfg.sandwich_norms:
            t |= {p + "pre_feedforward_layernorm.weight": (H,), p + "post_feedforward_layernorm.weight": (H,)}
        if cfg.n_routed_experts:  # MoE blocks are checked by weights/moe.lower_moe_weights
            for n in ("gate_proj", "up_proj", "down_proj"):
                t.pop(p + f"mlp.{n}.weight")
    return t


def check_checkpoint(cfg: ModelConfig, tensors: dict[str, np.ndarray]) -> None:
    """Fail early, naming the tensor, if the checkpoint is incomplete or misshapen."""
    check_output_head(cfg, tensors)
    for name, shape in expected_checkpoint_tensors(cfg).items():
        if name not in tensors:
            raise CheckpointError(f"checkpoint is missing tensor {name!r}")
        if tuple(tensors[name].shape) != shape:
            raise CheckpointError(f"tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {shape}")


def check_output_head(cfg: ModelConfig, tensors: dict[str, np.ndarray]) -> None:
    """The output head the config names is the checkpoint's: tied to the embedding, a lm_head.weight that differs
    from it leaves two readings (transformers 5 takes lm_head, transformers 4 and vLLM the embedding), so it is
    refused rather than guessed; untied, a missing lm_head.weight names the setting that may be wrong."""
    head, embed = tensors.get("lm_head.weight"), tensors.get("model.embed_tokens.weight")
    if cfg.tie_word_embeddings and head is not None and embed is not None and not np.array_equal(head, embed):
        raise CheckpointError("config.json ties the output head to the embedding (tie_word_embeddings: true) but the "
                              "checkpoint has a lm_head.weight of its own that differs from it; set "
                              "tie_word_embeddings to false to use lm_head.weight, or remove that tensor")
    if not cfg.tie_word_embeddings and head is None and embed is not None:
        raise CheckpointError("checkpoint is missing tensor 'lm_head.weight' (config.json: tie_word_embeddings is "
                              "false or not given; set it to true if the output head is the embedding)")


def lower_weights(cfg: ModelConfig, tensors: dict[str, np.ndarray], max_seq_len: int) -> dict[str, np.ndarray]:
    """Checkpoint tensors (HF names) -> the graph's weights, float32, in the layout the graph uses."""
    if cfg.is_mla:
        return _lower_deepseek_weights(cfg, tensors, max_seq_len)
    check_checkpoint(cfg, tensors)
    f32 = lambda name: np.ascontiguousarray(tensors[name], dtype=np.float32)  # noqa: E731
    norm = lambda name: f32(name) + np.float32(cfg.norm_offset)  # noqa: E731  (Gemma: 1 + weight)
    w = {"embed": f32("model.embed_tokens.weight"), "final_norm": norm("model.norm.weight")}
    if not cfg.tie_word_embeddings:
        w["lm_head"] = f32("lm_head.weight")
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        w[f"l{i}.attn_norm"] = norm(p + "input_layernorm.weight")
        if cfg.sandwich_norms:  # Gemma 3: a norm on attention's output, then the MLP's own input norm
            w[f"l{i}.post_attn_norm"] = norm(p + "post_attention_layernorm.weight")
            w[f"l{i}.mlp_norm"] = norm(p + "pre_feedforward_layernorm.weight")
            w[f"l{i}.post_mlp_norm"] = norm(p + "post_feedforward_layernorm.weight")
        else:
            w[f"l{i}.mlp_norm"] = norm(p + "post_attention_layernorm.weight")
        w |= _attention_weights(cfg, f32, norm, p, f"l{i}.")
        if cfg.n_routed_experts:  # Mixtral
            w |= lower_moe_weights(cfg, TensorReader(tensors, p + "block_sparse_moe."), f"l{i}.")
            continue
        # gate and up as two matrices, not one fused [H, 2I] (see graph/mlp.swiglu_mlp)
        if FAMILIES[cfg.model_type].fused_gate_up:  # Phi-3: gate_up_proj, gate first
            gate, up = np.split(f32(p + "mlp.gate_up_proj.weight"), 2)
        else:
            gate, up = f32(p + "mlp.gate_proj.weight"), f32(p + "mlp.up_proj.weight")
        w[f"l{i}.gate"], w[f"l{i}.up"] = np.ascontiguousarray(gate.T), np.ascontiguousarray(up.T)
        w[f"l{i}.down"] = np.ascontiguousarray(f32(p + "mlp.down_proj.weight").T)
    return w | rope_weights(cfg, max_seq_len)


def _attention_weights(cfg: ModelConfig, f32, norm, p: str, g: str) -> dict[str, np.ndarray]:
    """q/k/v packed (Phi-3's qkv_proj already is) and their biases, o and its bias, the per-head q/k norms. A softmax
    scale other than 1/sqrt(head_dim) (Gemma 3's query_pre_attn_scalar) is folded into q: its norm's weight, or its
    rows."""
    if FAMILIES[cfg.model_type].fused_qkv:
        qkv = f32(p + "self_attn.qkv_proj.weight")
    else:
        qkv = np.concatenate([f32(p + f"self_attn.{x}_proj.weight") for x in "qkv"], 0)
    bias = np.concatenate([f32(p + f"self_attn.{x}_proj.bias") for x in "qkv"]) if cfg.qkv_bias else None
    scale, q = np.float32(cfg.attn_scale_factor), cfg.q_size
    w = {}
    if cfg.qk_norm:
        w[g + "q_norm"] = norm(p + "self_attn.q_norm.weight") * scale
        w[g + "k_norm"] = norm(p + "self_attn.k_norm.weight")
    elif scale != 1:
        qkv[:q] *= scale
        if bias is not None:
            bias[:q] *= scale
    w[g + "qkv"] = np.ascontiguousarray(qkv.T)
    if bias is not None:
        w[g + "qkv_bias"] = bias
    w[g + "o"] = np.ascontiguousarray(f32(p + "self_attn.o_proj.weight").T)
    if cfg.o_bias:
        w[g + "o_bias"] = f32(p + "self_attn.o_proj.bias")
    return w


def rope_weights(cfg: ModelConfig, max_seq_len: int) -> dict[str, np.ndarray]:
    """The cos/sin tables (rope.py): rope.* for every layer, rope_local.* for sliding layers with their own."""
    w = dict(zip(("rope.cos", "rope.sin"),
                 rope_tables(cfg.rope, cfg.rope_dim, max_seq_len, cfg.max_position_embeddings)))
    if cfg.rope_local and cfg.rope_local != cfg.rope:
        w |= dict(zip(("rope_local.cos", "rope_local.sin"),
                      rope_tables(cfg.rope_local, cfg.rope_dim, max_seq_len, cfg.max_position_embeddings)))
    return w


def _lower_deepseek_weights(cfg: ModelConfig, tensors: dict[str, np.ndarray], max_seq_len: int):
    check_output_head(cfg, tensors)
    r, V, H = TensorReader(tensors), cfg.vocab_size, cfg.hidden_size
    w = {"embed": r.get("model.embed_tokens.weight", (V, H)), "final_norm": r.get("model.norm.weight", (H,))}
    if not cfg.tie_word_embeddings:  # its shape too: a head of another width built, and every load then failed
        w["lm_head"] = r.get("lm_head.weight", (V, H))
    for i in range(cfg.num_hidden_layers):
        w |= lower_mla_layer(cfg, tensors, f"model.layers.{i}.", f"l{i}.", cfg.is_moe_layer(i))
    return w | rope_weights(cfg, max_seq_len)


MTP_TENSORS = ("mtp.enorm.weight", "mtp.hnorm.weight", "mtp.eh_proj.weight", "mtp.norm.weight")


def lower_mtp_weights(cfg: ModelConfig, tensors: dict[str, np.ndarray],
                      max_seq_len: int | None = None) -> dict[str, np.ndarray]:
    """An MTP head (DeepSeek-V3 layout: enorm, hnorm, eh_proj, one decoder block, its own final norm; embedding
    and output head shared with the target) -> graph weights named mtp.*. A DeepSeek-V3 checkpoint's own MTP layer
    is the target's kind of block; a trained head's is a Llama block (ModelConfig.llama_block) with its own RoPE
    tables (mtp.rope.*, given max_seq_len) where the target's differ."""
    block = {k.replace("mtp.layer.", "model.layers.0."): v for k, v in tensors.items() if k.startswith("mtp.layer.")}
    for name in MTP_TENSORS:
        if name not in tensors:
            raise CheckpointError(f"MTP head is missing tensor {name!r}")
    H = cfg.hidden_size
    if tuple(tensors["mtp.eh_proj.weight"].shape) != (H, 2 * H):
        raise CheckpointError(f"mtp.eh_proj.weight has shape {tuple(tensors['mtp.eh_proj.weight'].shape)}, "
                              f"expected {(H, 2 * H)}")
    for name in ("mtp.enorm.weight", "mtp.hnorm.weight", "mtp.norm.weight"):
        if tuple(tensors[name].shape) != (H,):
            raise CheckpointError(f"{name} has shape {tuple(tensors[name].shape)}, expected {(H,)}")
    if cfg.is_mla:  # the block under the checkpoint's own names, which its errors then give
        # an MoE block by any of its tensors: one missing its router is then named as that, not as a dense MLP
        moe = any(k.startswith(("mtp.layer.mlp.gate.", "mtp.layer.mlp.experts.")) for k in tensors)
        layer = f"model.layers.{cfg.num_hidden_layers}."
        out = lower_mla_layer(cfg, {k.replace("mtp.layer.", layer): v for k, v in tensors.items()},
                              layer, "mtp.l0.", moe)
        f32 = lambda name: np.ascontiguousarray(tensors[name], dtype=np.float32)  # noqa: E731
        return out | {"mtp.enorm": f32("mtp.enorm.weight"), "mtp.hnorm": f32("mtp.hnorm.weight"),
                      "mtp.eh_proj": np.ascontiguousarray(f32("mtp.eh_proj.weight").T),
                      "mtp.norm": f32("mtp.norm.weight")}
    head = cfg.llama_block(qkv_bias="mtp.layer.self_attn.q_proj.bias" in tensors)
    one_layer = dataclasses.replace(head, num_hidden_layers=1, tie_word_embeddings=True, vocab_size=1)
    block |= {"model.embed_tokens.weight": np.zeros((1, H), np.float32),  # unused: the target's is shared
              "model.norm.weight": tensors["mtp.norm.weight"]}
    w = lower_weights(one_layer, block, max_seq_len=16)
    out = {f"mtp.{k}": v for k, v in w.items() if layer_of(k) is not None}
    f32 = lambda name: np.ascontiguousarray(tensors[name], dtype=np.float32)  # noqa: E731
    out |= {"mtp.enorm": f32("mtp.enorm.weight"), "mtp.hnorm": f32("mtp.hnorm.weight"),
            "mtp.eh_proj": np.ascontiguousarray(f32("mtp.eh_proj.weight").T), "mtp.norm": f32("mtp.norm.weight")}
    if max_seq_len and (head.rope, head.rope_dim) != (cfg.rope, cfg.rope_dim):
        out["mtp.rope.cos"], out["mtp.rope.sin"] = rope_tables(head.rope, head.rope_dim, max_seq_len,
                                                               cfg.max_position_embeddings)
    return out
