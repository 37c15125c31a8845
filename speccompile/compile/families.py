"""Model families as a table of facts, not code: what a family's checkpoints name and how its decoder block
differs from Llama's. `family_fields` reads a config.json into the ModelConfig fields these facts decide; the
weights (weights/decoder.py) and the graph (graph/layers.py) then follow the fields, never the family's name.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from speccompile.compile.rope import rope_parameters, softmax_mscale
from speccompile.errors import ConfigError, UnsupportedModelError


@dataclasses.dataclass(frozen=True)
class Family:
    architecture: str  # the class name hub configs list under "architectures"
    qkv_bias: bool = False  # q/k/v carry biases whatever `attention_bias` says (Qwen2)
    reads_attention_bias: bool = True  # `attention_bias: true` biases q/k/v and o_proj (DeepSeek-V3: q_a_proj,
    #                                    kv_a_proj_with_mqa and o_proj); False: transformers' class ignores the flag
    qk_norm: bool = False  # a per-head RMSNorm on q and k before RoPE (Qwen3, Gemma 3)
    norm_offset: float = 0.0  # RMSNorm scales by offset + weight (Gemma: 1 + weight)
    sandwich_norms: bool = False  # norms after attention and after the MLP too (Gemma 3)
    embed_scaled: bool = False  # embeddings times sqrt(hidden_size) (Gemma)
    fused_qkv: bool = False  # one qkv_proj tensor (Phi-3)
    fused_gate_up: bool = False  # one gate_up_proj tensor, gate first (Phi-3)
    sliding: str = "none"  # which layers slide when a window is set: "all", "qwen" (from max_window_layers on),
    #                        "pattern" (every sliding_window_pattern-th layer is global: Gemma 3)
    local_rope: bool = False  # sliding layers have their own RoPE base, rope_local_base_freq (Gemma 3)
    activation_key: str = "hidden_act"
    mla: bool = False  # DeepSeek-V3: weights/mla.py, graph/mla.py
    moe: bool = False  # Mixtral's block_sparse_moe
    defaults: tuple = ()  # (key, value) pairs the family's hub configs may leave out (transformers' defaults)


# The defaults are those of transformers' config classes, for the values read here: a config.json that leaves one
# out means what transformers reads it as.
_QWEN_DEFAULTS = (("max_position_embeddings", 32768), ("num_key_value_heads", 32), ("sliding_window", 4096),
                  ("max_window_layers", 28))
FAMILIES = {
    "llama": Family("LlamaForCausalLM", defaults=(("max_position_embeddings", 2048),)),
    "qwen2": Family("Qwen2ForCausalLM", qkv_bias=True, reads_attention_bias=False, sliding="qwen",
                    defaults=_QWEN_DEFAULTS),
    "qwen3": Family("Qwen3ForCausalLM", qk_norm=True, sliding="qwen", defaults=_QWEN_DEFAULTS + (("head_dim", 128),)),
    "mistral": Family("MistralForCausalLM", reads_attention_bias=False, sliding="all",
                      defaults=(("max_position_embeddings", 131072), ("num_key_value_heads", 8),
                                ("sliding_window", 4096))),
    "mixtral": Family("MixtralForCausalLM", reads_attention_bias=False, sliding="all", moe=True,
                      defaults=(("max_position_embeddings", 131072), ("num_key_value_heads", 8),
                                ("rms_norm_eps", 1e-5), ("rope_theta", 1e6), ("num_local_experts", 8),
                                ("num_experts_per_tok", 2))),
    "phi3": Family("Phi3ForCausalLM", reads_attention_bias=False, fused_qkv=True, fused_gate_up=True, sliding="all",
                   defaults=(("max_position_embeddings", 4096), ("original_max_position_embeddings", 4096),
                             ("rms_norm_eps", 1e-5))),
    "gemma3_text": Family("Gemma3ForCausalLM", qk_norm=True, norm_offset=1.0, sandwich_norms=True, embed_scaled=True,
                          sliding="pattern", local_rope=True, activation_key="hidden_activation",
                          defaults=(("vocab_size", 262208), ("max_position_embeddings", 131072),
                                    ("num_key_value_heads", 4), ("rms_norm_eps", 1e-6), ("rope_theta", 1e6),
                                    ("rope_local_base_freq", 10000.0), ("query_pre_attn_scalar", 256),
                                    ("head_dim", 256), ("sliding_window", 4096), ("sliding_window_pattern", 6),
                                    ("hidden_activation", "gelu_pytorch_tanh"), ("tie_word_embeddings", True))),
    "deepseek_v3": Family("DeepseekV3ForCausalLM", mla=True,
                          defaults=(("max_position_embeddings", 4096), ("q_lora_rank", 1536), ("kv_lora_rank", 512),
                                    ("qk_nope_head_dim", 128), ("qk_rope_head_dim", 64), ("v_head_dim", 128),
                                    ("n_routed_experts", 256), ("num_experts_per_tok", 8), ("n_group", 8),
                                    ("topk_group", 4), ("n_shared_experts", 1), ("moe_intermediate_size", 2048),
                                    ("first_k_dense_replace", 3), ("routed_scaling_factor", 2.5),
                                    ("norm_topk_prob", True), ("rope_interleave", True))),
}
# Multimodal checkpoints whose text model is a family above: its config is their text_config, its tensors those
# under these prefixes (the hub's names, and transformers' newer ones), renamed as the text model's own.
WRAPPED = {"gemma3": ("gemma3_text", (("language_model.model.", "model."), ("model.language_model.", "model."),
                                       ("language_model.lm_head.", "lm_head.")))}
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}
SLIDING, FULL = "sliding_attention", "full_attention"


def text_model_config(hf: dict[str, Any]) -> dict[str, Any]:
    """config.json as its text model's own: a wrapped (multimodal) checkpoint's text_config, with the top level's
    token ids, and the family's defaults filled in where the hub leaves values out."""
    inner = WRAPPED.get(hf.get("model_type"))
    if inner is not None:
        text = hf.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError(f"config: a {hf['model_type']} checkpoint needs a text_config object")
        top = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "tie_word_embeddings") if hf.get(k) is not None}
        hf = text | top | {"model_type": inner[0]}
    fam = FAMILIES.get(hf.get("model_type"))
    return dict(fam.defaults) | hf if fam else hf


def text_tensor_name(hf: dict[str, Any], name: str) -> str | None:
    """A checkpoint tensor's name as the text model's (None: not the text model's, e.g. a vision tower's)."""
    inner = WRAPPED.get(hf.get("model_type"))
    if inner is None:
        return name
    return next((new + name[len(old):] for old, new in inner[1] if name.startswith(old)), None)


def family_fields(hf: dict[str, Any], model_type: str, num_layers: int, head_dim: int) -> dict[str, Any]:
    """The ModelConfig fields a family's facts decide: RoPE per layer type, partial rotary, sliding layers,
    norms, activation, embedding and attention scales. Refuses what is not lowered (soft-capping, bidirectional
    attention), naming it."""
    fam = FAMILIES[model_type]
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if hf.get(key) is not None:
            raise UnsupportedModelError(f"unsupported: {key} = {hf[key]!r:.20} (logit soft-capping is not lowered)")
    if hf.get("use_bidirectional_attention"):
        raise UnsupportedModelError("unsupported: use_bidirectional_attention = true (a causal decoder is needed)")
    act = hf.get(fam.activation_key) or hf.get("hidden_act") or "silu"
    if not isinstance(act, str) or act not in ACTIVATIONS:
        raise UnsupportedModelError(f"unsupported activation {act!r:.40} (supported: {', '.join(ACTIVATIONS)})")
    rope = rope_parameters(hf, FULL)
    out = {"rope": rope, "rope_theta": rope["rope_theta"], "hidden_act": ACTIVATIONS[act],
           "qk_norm": fam.qk_norm, "norm_offset": fam.norm_offset, "sandwich_norms": fam.sandwich_norms}
    window, layer_types = _sliding_layers(hf, fam, num_layers)
    out |= {"sliding_window": window, "layer_types": layer_types}
    if fam.local_rope:
        out["rope_local"] = rope_parameters(hf, SLIDING, theta_key="rope_local_base_freq", scaled=False)
    prf = hf.get("partial_rotary_factor")
    if prf is None:
        prf = (hf.get("rope_parameters") or {}).get("partial_rotary_factor")
    prf = 1.0 if prf is None else prf
    if not isinstance(prf, (int, float)) or isinstance(prf, bool) or not 0 < prf <= 1:
        raise ConfigError(f"config: partial_rotary_factor = {prf!r:.20} must be in (0, 1]")
    out["partial_rotary_factor"] = float(prf)
    if fam.embed_scaled:
        out["embed_scale"] = float(hf["hidden_size"]) ** 0.5
    scale = 1.0
    if hf.get("query_pre_attn_scalar") is not None:  # softmax scale 1/sqrt(query_pre_attn_scalar), not 1/sqrt(d)
        qpas = hf["query_pre_attn_scalar"]
        if not isinstance(qpas, (int, float)) or isinstance(qpas, bool) or not qpas > 0:
            raise ConfigError(f"config: query_pre_attn_scalar = {qpas!r:.20} must be a positive number")
        scale = math.sqrt(head_dim / qpas)
    if fam.mla:
        scale *= softmax_mscale(rope)
    out["attn_scale_factor"] = scale
    return out


def _sliding_layers(hf: dict, fam: Family, num_layers: int) -> tuple[int | None, tuple[str, ...]]:
    """(the window, each layer's type) where some layers slide, else (None, ())."""
    window = hf.get("sliding_window")
    if fam.sliding == "none" or window is None or (fam.sliding == "qwen" and not hf.get("use_sliding_window")):
        return None, ()
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ConfigError(f"config: sliding_window = {window!r:.20} must be a positive integer")
    types = hf.get("layer_types")
    if types is None:
        if fam.sliding == "qwen":
            first = _whole_number(hf, "max_window_layers", 0)
            types = [SLIDING if i >= first else FULL for i in range(num_layers)]
        elif fam.sliding == "pattern":
            pattern = _whole_number(hf, "sliding_window_pattern", 1)
            types = [SLIDING if (i + 1) % pattern else FULL for i in range(num_layers)]
        else:
            types = [SLIDING] * num_layers
    if (not isinstance(types, list) or len(types) != num_layers
            or any(t not in (SLIDING, FULL) for t in types)):
        raise ConfigError(f"config: layer_types must list {num_layers} of {SLIDING!r} / {FULL!r}")
    return (window, tuple(types)) if SLIDING in types else (None, ())


def _whole_number(hf: dict, key: str, least: int) -> int:
    """hf[key] as an integer of at least `least`; anything else (null, a string, a float) is one ConfigError."""
    value = hf.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ConfigError(f"config: {key} = {value!r:.20} must be an integer of at least {least}")
    return value
