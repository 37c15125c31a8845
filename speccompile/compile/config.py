"""Model configuration: the few numbers the lowering needs, read from checkpoint metadata.

Like TensorRT Edge-LLM, the model is rebuilt from metadata rather than traced, so each supported architecture
is a short list of facts (bias on q/k/v or not, tied head or not, ...) instead of a copy of its modeling code.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from speccompile.errors import UnsupportedModelError

# Architectures whose decoder block is the Llama block, differing only in the facts ModelConfig records.
SUPPORTED_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
}

# DeepSeek-V3 facts (multi-head latent attention, routed mixture of experts), None/0 for Llama-family models.
MLA_MOE_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                  "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group", "n_shared_experts",
                  "moe_intermediate_size", "first_k_dense_replace", "routed_scaling_factor", "norm_topk_prob",
                  "rope_interleave", "num_nextn_predict_layers")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    sliding_window: int | None = None
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0  # > 0: multi-head latent attention (DeepSeek-V3)
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    n_routed_experts: int = 0  # > 0: mixture-of-experts layers from first_k_dense_replace on
    num_experts_per_tok: int = 0
    n_group: int = 1
    topk_group: int = 1
    n_shared_experts: int = 0
    moe_intermediate_size: int = 0
    first_k_dense_replace: int = 0
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    rope_interleave: bool = False
    num_nextn_predict_layers: int = 0
    router_scoring: str = "sigmoid"  # MoE router: DeepSeek-V3 "sigmoid" (+ correction bias), Mixtral "softmax"
    mla_cache: str = "latent"  # what an MLA model's static cache stores: "latent" or "expanded" K/V

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def cache_kv_heads(self) -> int:
        """KV heads the static cache stores: MLA caches one latent "head" (see deepseek.py)."""
        if self.is_mla:
            return 1 if self.mla_cache == "latent" else self.num_attention_heads
        return self.num_key_value_heads

    @property
    def cache_head_dim(self) -> int:
        if self.is_mla:
            return self.qk_rope_head_dim + (self.kv_lora_rank if self.mla_cache == "latent" else self.qk_nope_head_dim)
        return self.head_dim

    @property
    def rope_dim(self) -> int:
        return self.qk_rope_head_dim if self.is_mla else self.head_dim

    def is_moe_layer(self, i: int) -> bool:
        return self.n_routed_experts > 0 and i >= self.first_k_dense_replace

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Read a Hugging Face config.json dict; refuse what we cannot lower, naming it."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported architecture {model_type!r} (architectures={hf.get('architectures')}); "
                f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}")
        rope = hf.get("rope_scaling") or {}
        rope_params = hf.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", rope.get("type")) or rope_params.get("rope_type", "default")
        if rope_type not in (None, "default"):
            raise UnsupportedModelError(f"unsupported RoPE scaling {rope_type!r} in {model_type} config")
        if hf.get("mlp_bias"):
            raise UnsupportedModelError("unsupported: mlp_bias=true")
        if hf.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"unsupported activation {hf.get('hidden_act')!r} (only silu)")
        try:
            heads = int(hf["num_attention_heads"])
            eos = hf.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
            return cls(
                model_type=model_type,
                vocab_size=int(hf["vocab_size"]),
                hidden_size=int(hf["hidden_size"]),
                intermediate_size=int(hf["intermediate_size"]),
                num_hidden_layers=int(hf["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
                head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=float(hf.get("rope_theta") or rope_params.get("rope_theta") or 10000.0),
                max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                qkv_bias=(model_type == "qwen2") or bool(hf.get("attention_bias", False)),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_ids=tuple(int(e) for e in eos_ids),
                sliding_window=hf.get("sliding_window") if hf.get("use_sliding_window", True) else None,
                **({k: hf[k] for k in MLA_MOE_FIELDS if hf.get(k) is not None}
                   if model_type == "deepseek_v3" else {}),
                **(dict(n_routed_experts=int(hf["num_local_experts"]), num_experts_per_tok=int(hf["num_experts_per_tok"]),
                        moe_intermediate_size=int(hf["intermediate_size"]), router_scoring="softmax")
                   if model_type == "mixtral" else {}),
            )
        except KeyError as e:
            raise UnsupportedModelError(f"config.json lacks required field {e.args[0]!r}") from None

    def check_lowerable(self, max_seq_len: int) -> None:
        """Constraints of the fused attention kernel and the static cache, checked before any work is done."""
        if self.is_mla:
            if self.cache_head_dim % 8:
                raise UnsupportedModelError(f"kv_lora_rank + qk_rope_head_dim = {self.cache_head_dim} is not a "
                                            "multiple of 8 (fused attention over the latent cache)")
            if self.n_routed_experts and self.n_routed_experts % self.n_group:
                raise UnsupportedModelError("n_routed_experts must be a multiple of n_group")
            return
        if self.head_dim % 16:
            raise UnsupportedModelError(f"head_dim {self.head_dim} is not a multiple of 16 (fused rotary attention)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise UnsupportedModelError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.sliding_window and max_seq_len > self.sliding_window:
            raise UnsupportedModelError(
                f"--max-seq-len {max_seq_len} exceeds the model's sliding window {self.sliding_window}; "
                "sliding-window attention is not lowered, so compile with a context within the window")
