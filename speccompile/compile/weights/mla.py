"""DeepSeek-V3 decoder layers' weights: multi-head latent attention (graph/mla.py explains the latent cache that
W_UK and W_UV serve) and a dense or mixture-of-experts MLP."""
from __future__ import annotations

import numpy as np

from speccompile.compile.config import ModelConfig
from speccompile.compile.weights.moe import lower_moe_weights
from speccompile.compile.weights.tensors import TensorReader


def lower_mla_layer(cfg: ModelConfig, tensors: dict[str, np.ndarray], hf_prefix: str, prefix: str,
                    moe: bool) -> dict[str, np.ndarray]:
    """One DeepSeek-V3 decoder layer's checkpoint tensors (HF names under hf_prefix) -> graph weights."""
    r = TensorReader(tensors, hf_prefix)
    H, nh = cfg.hidden_size, cfg.num_attention_heads
    nope, rope, lora, v = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank, cfg.v_head_dim
    T = np.ascontiguousarray
    # every norm's length checked too: one of another length built, and failed inside onnxruntime at generation
    w = {prefix + "attn_norm": r.get("input_layernorm.weight", (H,)),
         prefix + "mlp_norm": r.get("post_attention_layernorm.weight", (H,))}
    if cfg.q_lora_rank:
        w[prefix + "q_a"] = T(r.get("self_attn.q_a_proj.weight", (cfg.q_lora_rank, H)).T)
        w[prefix + "q_a_norm"] = r.get("self_attn.q_a_layernorm.weight", (cfg.q_lora_rank,))
        w[prefix + "q_b"] = T(r.get("self_attn.q_b_proj.weight", (nh * (nope + rope), cfg.q_lora_rank)).T)
    else:
        w[prefix + "q"] = T(r.get("self_attn.q_proj.weight", (nh * (nope + rope), H)).T)
    w[prefix + "kv_a"] = T(r.get("self_attn.kv_a_proj_with_mqa.weight", (lora + rope, H)).T)
    w[prefix + "kv_a_norm"] = r.get("self_attn.kv_a_layernorm.weight", (lora,))
    kv_b = r.get("self_attn.kv_b_proj.weight", (nh * (nope + v), lora))
    kv_b = kv_b.reshape(nh, nope + v, lora)
    w[prefix + "w_uk"] = T(kv_b[:, :nope])  # [nh, nope, lora]: absorbed into the query
    w[prefix + "w_uv_t"] = T(kv_b[:, nope:].transpose(0, 2, 1))  # [nh, lora, v]
    w[prefix + "o"] = T(r.get("self_attn.o_proj.weight", (H, nh * v)).T)
    if cfg.qkv_bias:  # attention_bias: true (q_proj has none: only a low-rank q's first projection is biased)
        if cfg.q_lora_rank:
            w[prefix + "q_a_bias"] = r.get("self_attn.q_a_proj.bias", (cfg.q_lora_rank,))
        w[prefix + "kv_a_bias"] = r.get("self_attn.kv_a_proj_with_mqa.bias", (lora + rope,))
    if cfg.o_bias:
        w[prefix + "o_bias"] = r.get("self_attn.o_proj.bias", (H,))
    if not moe:
        I = cfg.intermediate_size
        w[prefix + "gate_up"] = T(np.concatenate([r.get("mlp.gate_proj.weight", (I, H)),
                                                  r.get("mlp.up_proj.weight", (I, H))]).T)
        w[prefix + "down"] = T(r.get("mlp.down_proj.weight", (H, I)).T)
        return w
    return w | lower_moe_weights(cfg, TensorReader(tensors, hf_prefix + "mlp."), prefix)
