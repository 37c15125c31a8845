"""Model configuration: the few numbers the lowering needs, read from checkpoint metadata.

Like TensorRT Edge-LLM, the model is rebuilt from metadata rather than traced, so each supported architecture
is a short list of facts (bias on q/k/v or not, tied head or not, ...) instead of a copy of its modeling code.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from speccompile.compile.families import FAMILIES, family_fields, text_model_config
from speccompile.errors import ConfigError, UnsupportedModelError

# Architectures lowered: the Llama block and its variants, each differing only in the facts compile/families.py
# records and ModelConfig carries.
SUPPORTED_ARCHITECTURES = {name: fam.architecture for name, fam in FAMILIES.items()}

# DeepSeek-V3 facts (multi-head latent attention, routed mixture of experts), None/0 for Llama-family models.
MLA_MOE_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                  "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group", "n_shared_experts",
                  "moe_intermediate_size", "first_k_dense_replace", "routed_scaling_factor", "norm_topk_prob",
                  "rope_interleave", "num_nextn_predict_layers")

# Upper bounds far above any released model, low enough that a config cannot make the build size its tables for
# hours before the checkpoint is read (a config.json declaring 10**9 layers must fail at once, not hang).
UPPER_BOUNDS = {"vocab_size": 1 << 24, "hidden_size": 1 << 16, "intermediate_size": 1 << 20,
                "num_hidden_layers": 1024, "num_attention_heads": 1024, "num_key_value_heads": 1024,
                "head_dim": 4096, "max_position_embeddings": 1 << 24, "sliding_window": 1 << 24,
                "q_lora_rank": 1 << 16, "kv_lora_rank": 1 << 16, "qk_nope_head_dim": 4096, "qk_rope_head_dim": 4096,
                "v_head_dim": 4096, "n_routed_experts": 4096, "num_experts_per_tok": 4096, "n_group": 4096,
                "topk_group": 4096, "n_shared_experts": 64, "moe_intermediate_size": 1 << 20,
                "first_k_dense_replace": 1024, "num_nextn_predict_layers": 16, "bos_token_id": 1 << 24}
# Integer fields that must be at least 1 (the others may be 0: "absent" for the DeepSeek-V3 facts).
POSITIVE = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window", "q_lora_rank", "n_group",
            "topk_group"}
CHOICES = {"model_type": tuple(SUPPORTED_ARCHITECTURES), "router_scoring": ("sigmoid", "softmax"),
           "mla_cache": ("latent", "expanded"), "hidden_act": ("silu", "gelu_tanh")}
_REQUIRED = object()


def _config_value(hf: dict[str, Any], key: str, kind: type, default: Any = _REQUIRED) -> Any:
    """hf[key] as `kind` (int, float or bool), refusing a value of another type (a list where a number belongs,
    a string, true for a count) rather than converting it; null or absent gives `default`."""
    value = hf.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ConfigError(f"config.json lacks required field {key!r}")
        return default
    return _checked_type(key, value, kind)


def _checked_type(key: str, value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif isinstance(value, bool):
        pass  # JSON true/false is never a number here
    elif kind is int and isinstance(value, int):
        return value
    elif kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    elif kind is float and isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    expected = {int: "an integer", float: "a finite number", bool: "true or false"}[kind]
    raise ConfigError(f"config value {key} = {value!r:.60}: expected {expected}")


# quant_method values whose checkpoints hold float weights to read: FP8 blocks (compile/fp8.py dequantizes them),
# and "gguf", which transformers' GGUF loader records on the float model it dequantized
FLOAT_QUANT_METHODS = ("fp8", "gguf")


# Routing keys DeepSeek's own modeling code reads and transformers' class does not: the graph lowers these values,
# and a config with others (DeepSeek-V2's softmax "greedy" top-k, experts in every n-th layer only) would build
# as if it had them.
DEEPSEEK_ROUTING = {"topk_method": "noaux_tc", "scoring_func": "sigmoid", "moe_layer_freq": 1}


def _check_deepseek_routing(hf: dict[str, Any]) -> None:
    for key, lowered in DEEPSEEK_ROUTING.items():
        if hf.get(key) is not None and hf[key] != lowered:
            raise UnsupportedModelError(f"unsupported: {key} = {hf[key]!r:.40} (DeepSeek-V3 routing is lowered as "
                                        f"{key} = {lowered!r})")


def _check_quantization(hf: dict[str, Any]) -> None:
    """Any other quantization's stored integers are not weights: such a checkpoint is refused, naming its method."""
    quant = hf.get("quantization_config")
    if quant is None:
        return
    method = quant.get("quant_method") if isinstance(quant, dict) else quant
    if isinstance(quant, dict) and (quant.get("load_in_4bit") or quant.get("load_in_8bit")):
        method = "bitsandbytes"  # how transformers reads it: bitsandbytes configs predate quant_method
    if method not in FLOAT_QUANT_METHODS:
        raise UnsupportedModelError(f"unsupported: quantization_config.quant_method = {method!r:.40} (only fp8 "
                                    "checkpoints are read; use the model's float original or a GGUF)")


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
    qkv_bias: bool  # q/k/v carry biases (MLA: q_a_proj and kv_a_proj_with_mqa)
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
    o_bias: bool = False  # o_proj carries a bias (`attention_bias: true` where the family reads it)
    router_scoring: str = "sigmoid"  # MoE router: DeepSeek-V3 "sigmoid" (+ correction bias), Mixtral "softmax"
    mla_cache: str = "latent"  # what an MLA model's static cache stores: "latent" or "expanded" K/V
    # the facts of compile/families.py: RoPE parameters (rope.py; rope_local: sliding layers' own), the share of
    # each head rotated, each layer's type where some slide (sliding_window), per-head q/k norms, RMSNorm weights
    # stored as (scale - norm_offset), norms after attention and MLP, the MLP's activation, the embedding's scale,
    # and a factor on the softmax scale 1/sqrt(head_dim)
    rope: dict | None = None
    rope_local: dict | None = None
    partial_rotary_factor: float = 1.0
    layer_types: tuple = ()
    qk_norm: bool = False
    norm_offset: float = 0.0
    sandwich_norms: bool = False
    hidden_act: str = "silu"
    embed_scale: float = 1.0
    attn_scale_factor: float = 1.0

    def __post_init__(self):
        """Types and ranges, checked before anything is sized from them (however the config was made)."""
        if self.rope is None:
            object.__setattr__(self, "rope", {"rope_type": "default", "rope_theta": self.rope_theta})
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        kinds = {"int": int, "int | None": int, "float": float, "bool": bool}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in kinds and not (value is None and "None" in f.type):
                object.__setattr__(self, f.name, _checked_type(f.name, value, kinds[f.type]))
            elif f.name in CHOICES and value not in CHOICES[f.name]:
                raise ConfigError(f"config value {f.name} = {value!r:.60}: expected one of "
                                  f"{', '.join(CHOICES[f.name])}")
        object.__setattr__(self, "eos_token_ids", tuple(_checked_type("eos_token_id", e, int)
                                                        for e in self.eos_token_ids))
        for name, upper in UPPER_BOUNDS.items():
            value, lower = getattr(self, name), 1 if name in POSITIVE else 0
            if value is not None and not lower <= value <= upper:
                raise ConfigError(f"config value {name} = {value} is out of range ({lower}..{upper})")
        if not 0 < self.rms_norm_eps < 1 or self.rope_theta <= 0 or self.routed_scaling_factor <= 0:
            raise ConfigError(f"config values rms_norm_eps = {self.rms_norm_eps}, rope_theta = {self.rope_theta}, "
                              f"routed_scaling_factor = {self.routed_scaling_factor}: each must be positive "
                              "(rms_norm_eps below 1)")

    def check_consistent(self) -> None:
        """What a config.json's values must agree on: heads in whole groups, tokens inside the vocabulary,
        experts chosen among the experts."""
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"config: num_attention_heads = {self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads = {self.num_key_value_heads}")
        for name, ids in (("bos_token_id", (self.bos_token_id,)), ("eos_token_id", self.eos_token_ids)):
            if any(i is not None and not 0 <= i < self.vocab_size for i in ids):
                raise ConfigError(f"config: {name} {list(ids)} is outside the vocabulary (0..{self.vocab_size - 1})")
        if self.num_experts_per_tok > max(self.n_routed_experts, 1) or self.topk_group > self.n_group:
            raise ConfigError(f"config: num_experts_per_tok = {self.num_experts_per_tok} of n_routed_experts = "
                              f"{self.n_routed_experts}, topk_group = {self.topk_group} of n_group = {self.n_group}")
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise ConfigError(f"config: first_k_dense_replace = {self.first_k_dense_replace} exceeds "
                              f"num_hidden_layers = {self.num_hidden_layers}")
        self._check_expert_groups()

    def _check_expert_groups(self) -> None:
        """Experts split into whole groups, and no more chosen than the kept groups hold: past that, the top-k
        takes experts the group limit masked out, in an order no implementation defines."""
        if self.n_routed_experts % self.n_group:
            raise ConfigError(f"config: n_routed_experts = {self.n_routed_experts} is not a multiple of n_group = "
                              f"{self.n_group}")
        kept = self.topk_group * (self.n_routed_experts // self.n_group)
        if self.n_routed_experts and self.num_experts_per_tok > kept:
            raise ConfigError(f"config: num_experts_per_tok = {self.num_experts_per_tok} exceeds the {kept} experts "
                              f"of the topk_group = {self.topk_group} groups routing keeps (n_routed_experts = "
                              f"{self.n_routed_experts} in n_group = {self.n_group})")

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def cache_kv_heads(self) -> int:
        """KV heads the static cache stores: MLA caches one latent "head" (compile/graph/mla.py)."""
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
        """Channels of a head that RoPE rotates (the first ones; Phi-3's partial_rotary_factor rotates a share)."""
        return self.qk_rope_head_dim if self.is_mla else int(self.head_dim * self.partial_rotary_factor)

    def is_sliding(self, layer: int) -> bool:
        """Layer `layer` attends only the last sliding_window positions."""
        if not self.sliding_window:
            return False
        return not self.layer_types or self.layer_types[layer] == "sliding_attention"

    def llama_block(self, qkv_bias: bool = False) -> "ModelConfig":
        """The block a trained draft head carries (speccompile/train/heads.py) for this target: a Llama block of
        the target's sizes, default RoPE at the target's base over whole heads, SiLU, plain RMSNorms, no window."""
        return dataclasses.replace(
            self, model_type="llama", qkv_bias=qkv_bias, o_bias=False, qk_norm=False, norm_offset=0.0,
            sandwich_norms=False, hidden_act="silu", embed_scale=1.0, attn_scale_factor=1.0, partial_rotary_factor=1.0,
            layer_types=(), sliding_window=None, rope={"rope_type": "default", "rope_theta": self.rope_theta},
            rope_local=None, n_routed_experts=0, num_experts_per_tok=0, moe_intermediate_size=0)

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
        fields = dataclasses.fields(cls)
        unknown = set(d) - {f.name for f in fields}
        missing = {f.name for f in fields if f.default is dataclasses.MISSING} - set(d)
        if unknown or missing:
            raise ConfigError(f"model config: unknown fields {sorted(unknown)}, missing fields {sorted(missing)}")
        return cls(**d)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Read a Hugging Face config.json dict; refuse what we cannot lower, naming it, and any value of the
        wrong type, out of range or inconsistent (ConfigError), before anything is sized from it."""
        if not isinstance(hf, dict):
            raise ConfigError(f"config.json holds a {type(hf).__name__}, not an object of settings")
        _check_quantization(hf)  # at the top level: a wrapped checkpoint's text_config does not repeat it
        hf = text_model_config(hf)
        model_type = hf.get("model_type")
        if not isinstance(model_type, str) or model_type not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported architecture {model_type!r:.60} (architectures={hf.get('architectures')!r:.80}); "
                f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}")
        if hf.get("mlp_bias"):
            raise UnsupportedModelError("unsupported: mlp_bias=true")
        if model_type == "deepseek_v3":
            _check_deepseek_routing(hf)
        heads = _config_value(hf, "num_attention_heads", int)
        hidden = _config_value(hf, "hidden_size", int)
        if heads <= 0 or hidden <= 0:
            raise ConfigError(f"config: num_attention_heads = {heads} and hidden_size = {hidden} must be positive")
        if hf.get("head_dim") is None and hidden % heads:
            raise ConfigError(f"config: hidden_size = {hidden} is not a multiple of num_attention_heads = {heads} "
                              "(and no head_dim is given)")
        num_layers = _config_value(hf, "num_hidden_layers", int)
        head_dim = _config_value(hf, "head_dim", int, hidden // heads)
        facts = family_fields(hf, model_type, num_layers, head_dim)
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        family = FAMILIES[model_type]
        biased = family.reads_attention_bias and _config_value(hf, "attention_bias", bool, False)
        config = cls(
            model_type=model_type,
            vocab_size=_config_value(hf, "vocab_size", int),
            hidden_size=hidden,
            intermediate_size=_config_value(hf, "intermediate_size", int),
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            num_key_value_heads=_config_value(hf, "num_key_value_heads", int, heads),
            head_dim=head_dim,
            rms_norm_eps=_config_value(hf, "rms_norm_eps", float, 1e-6),
            max_position_embeddings=_config_value(hf, "max_position_embeddings", int, 4096),
            tie_word_embeddings=_config_value(hf, "tie_word_embeddings", bool, False),
            qkv_bias=family.qkv_bias or biased,
            o_bias=biased,
            bos_token_id=_config_value(hf, "bos_token_id", int, None),
            eos_token_ids=eos_ids,
            **facts,
            **({k: hf[k] for k in MLA_MOE_FIELDS if hf.get(k) is not None}
               if model_type == "deepseek_v3" else {}),
            **(dict(n_routed_experts=_config_value(hf, "num_local_experts", int),
                    num_experts_per_tok=_config_value(hf, "num_experts_per_tok", int),
                    moe_intermediate_size=_config_value(hf, "intermediate_size", int), router_scoring="softmax")
               if model_type == "mixtral" else {}),
        )
        config.check_consistent()
        return config

    def check_lowerable(self, max_seq_len: int) -> None:
        """Constraints of the fused attention kernel and the static cache, checked before any work is done."""
        if self.is_mla:
            if self.cache_head_dim % 8:
                raise UnsupportedModelError(f"kv_lora_rank + qk_rope_head_dim = {self.cache_head_dim} is not a "
                                            "multiple of 8 (fused attention over the latent cache)")
            if self.mla_cache == "expanded" and self.v_head_dim > self.cache_head_dim:
                # the kernel takes V in K's head size: a wider V was cut short, and every generation failed
                raise UnsupportedModelError(f"mla_cache='expanded': v_head_dim {self.v_head_dim} exceeds the key's "
                                            f"qk_nope_head_dim + qk_rope_head_dim = {self.cache_head_dim}; build "
                                            "with the latent cache (the default)")
            return
        if self.head_dim % 16 or self.rope_dim % 16:
            raise UnsupportedModelError(f"head_dim {self.head_dim} (rotated: {self.rope_dim}) is not a multiple of "
                                        "16 (fused rotary attention)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise UnsupportedModelError("num_attention_heads must be a multiple of num_key_value_heads")
