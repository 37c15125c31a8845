"""Rotary position embeddings: the RoPE variants as one table, read from either config spelling and computed in numpy
at build time as the cos/sin tables the fused attention kernel consumes.

A variant is a function of its parameters giving the inverse frequencies and an attention factor (which multiplies
cos and sin, hence q.k by its square, as transformers applies it). Variants whose frequencies change with the
sequence length as it grows (dynamic NTK) have no static table and are refused, naming the type. longrope is static
within `original_max_position_embeddings` (its short factors), so it is lowered for a context that fits there.
freq_factors is llama.cpp's form of a static scaling (a GGUF's rope_freqs tensor, as convert_hf_to_gguf.py writes
Llama 3.1's llama3 scaling): each frequency divided by its own factor, as ggml_rope_ext divides it.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from speccompile.errors import ConfigError, UnsupportedModelError, given

# per type: the parameters it requires (beyond rope_theta) and the optional ones it reads
_PARAMS = {
    "default": ((), ()),
    "linear": (("factor",), ()),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"), ()),
    "yarn": (("original_max_position_embeddings",),
             ("factor", "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate")),
    "longrope": (("original_max_position_embeddings", "short_factor", "long_factor"), ("factor", "attention_factor")),
    "freq_factors": (("freq_factors",), ()),
}
_CONTEXT_SCALED = ("llama3", "yarn", "longrope")  # the types whose parameters name the original context
_FACTOR_LISTS = ("short_factor", "long_factor", "freq_factors")  # one factor per rotary frequency
ALIASES = {"su": "longrope"}  # early Phi-3-128k configs' name for longrope
REFUSED_WHY = {"dynamic": "its frequencies change with the sequence length (dynamic NTK), so no static table holds"}


def rope_parameters(hf: dict[str, Any], layer_type: str | None = None, theta_key: str = "rope_theta",
                    default_theta: float = 10000.0, scaled: bool = True) -> dict[str, Any]:
    """One layer type's RoPE parameters, normalised to {"rope_type", "rope_theta", ...}, from the hub's spelling
    (`rope_scaling` with "type" or "rope_type", beside `rope_theta`) or the newer `rope_parameters` (flat, or one
    entry per layer type as Gemma 3 writes it). `original_max_position_embeddings` may sit at the top level
    (Phi-3), or be left out: then it is max_position_embeddings, as transformers reads it. theta_key: where the
    hub spelling keeps this layer type's base (Gemma 3's local layers: rope_local_base_freq); scaled=False: the
    hub's rope_scaling does not apply to this layer type."""
    new, old = hf.get("rope_parameters"), hf.get("rope_scaling")
    for key, value in (("rope_parameters", new), ("rope_scaling", old)):
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"config: {key} must be an object, not {type(value).__name__}")
    if new and layer_type and isinstance(new.get(layer_type), dict):
        new = new[layer_type]
    elif new and all(isinstance(v, dict) for v in new.values()):
        new = None  # one entry per layer type, none for this one
    if new and not old:
        p = dict(new)
        theta = p.get("rope_theta", hf.get(theta_key))
    else:
        p = dict(old or {}) if scaled else {}
        theta = hf.get(theta_key, (new or {}).get("rope_theta"))
    rope_type = p.pop("rope_type", None) or p.pop("type", None) or "default"
    rope_type = ALIASES.get(rope_type, rope_type) if isinstance(rope_type, str) else rope_type
    p["rope_theta"] = default_theta if theta is None else theta
    if p.get("original_max_position_embeddings") is None:
        # transformers' fallback where neither spot gives it: the model's own context, for the types that scale it
        top = hf.get("original_max_position_embeddings")
        p["original_max_position_embeddings"] = top if top is not None else (
            hf.get("max_position_embeddings") if rope_type in _CONTEXT_SCALED else None)
    return _checked(rope_type, p)


def _checked(rope_type: Any, p: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(rope_type, str) or rope_type not in _PARAMS:
        why = REFUSED_WHY.get(rope_type, "not lowered")
        raise UnsupportedModelError(f"unsupported RoPE type {rope_type!r:.40} ({why}); supported: "
                                    f"{', '.join(_PARAMS)}")
    required, optional = _PARAMS[rope_type]
    missing = [k for k in required if p.get(k) is None]
    if missing:
        raise ConfigError(f"config: RoPE type {rope_type!r} lacks {', '.join(missing)}")
    out: dict[str, Any] = {"rope_type": rope_type}
    for key in ("rope_theta", *required, *optional):
        value = p.get(key)
        if value is None:
            continue
        if key in _FACTOR_LISTS:
            if not isinstance(value, list) or not all(_is_number(v) and v > 0 for v in value):
                raise ConfigError(f"config: RoPE {key} must be a list of positive numbers")
            out[key] = [float(v) for v in value]
        elif key == "truncate":
            out[key] = bool(value)
        elif not _is_number(value) or not value > 0:
            raise ConfigError(f"config: RoPE parameter {key} = {value!r:.40} must be a positive number")
        else:
            out[key] = float(value)
    return out


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _base(p: dict, dim: int) -> np.ndarray:
    # as transformers computes it: float32 exponents of the base
    return (p["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))).astype(np.float32)


def _default(p, dim, max_pos, max_seq_len):
    return 1.0 / _base(p, dim), 1.0


def _linear(p, dim, max_pos, max_seq_len):
    return 1.0 / _base(p, dim) / p["factor"], 1.0


def _llama3(p, dim, max_pos, max_seq_len):
    inv = 1.0 / _base(p, dim)
    factor, low, high, old = (p["factor"], p["low_freq_factor"], p["high_freq_factor"],
                              p["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    return np.where(medium, smoothed, scaled), 1.0


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(p, dim, max_pos, max_seq_len):
    old = p["original_max_position_embeddings"]
    factor = p.get("factor") or max_pos / old
    attention = p.get("attention_factor")
    if attention is None:
        mscale, mscale_all = p.get("mscale"), p.get("mscale_all_dim")
        attention = (yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all) if mscale and mscale_all
                     else yarn_mscale(factor))
    base = p["rope_theta"]

    def correction_dim(rotations):
        return dim * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(p.get("beta_fast") or 32), correction_dim(p.get("beta_slow") or 1)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / ((high + 0.001 if low == high else high) - low),
                   0, 1)
    extrapolation = 1 - ramp
    pos = _base(p, dim)
    inv = (1.0 / (factor * pos)) * (1 - extrapolation) + (1.0 / pos) * extrapolation
    return inv, float(attention)


def _longrope(p, dim, max_pos, max_seq_len):
    old = p["original_max_position_embeddings"]
    if max_seq_len > old:
        raise UnsupportedModelError(
            f"longrope switches to its long factors past original_max_position_embeddings ({int(old)}), changing "
            f"every position's rotation as the sequence grows; compile with {given('max_seq_len', int(old))} or "
            "less")
    factors = np.asarray(p["short_factor"], np.float32)
    if factors.shape != (dim // 2,):
        raise ConfigError(f"config: longrope short_factor has {factors.size} entries, expected {dim // 2}")
    factor = p.get("factor") or max_pos / old
    attention = p.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(old))
    return 1.0 / (factors * _base(p, dim)), float(attention)


def _freq_factors(p, dim, max_pos, max_seq_len):
    factors = np.asarray(p["freq_factors"], np.float32)
    if factors.shape != (dim // 2,):
        raise ConfigError(f"config: RoPE freq_factors has {factors.size} entries, expected {dim // 2}")
    return 1.0 / _base(p, dim) / factors, 1.0


ROPE_TYPES = {"default": _default, "linear": _linear, "llama3": _llama3, "yarn": _yarn, "longrope": _longrope,
              "freq_factors": _freq_factors}


def rope_tables(p: dict, dim: int, max_seq_len: int, max_position_embeddings: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [max_seq_len + 1, dim/2] (half-split rotary over the first `dim` channels of a head), each times the
    variant's attention factor. The row past max_seq_len: the fused kernel wants a table as long as its
    total_sequence_length, which the pad row of speccompile.plugins.tree_attention makes one longer."""
    inv, attention = ROPE_TYPES[p["rope_type"]](p, dim, max_position_embeddings, max_seq_len)
    angles = np.outer(np.arange(max_seq_len + 1, dtype=np.float64), np.asarray(inv, np.float32).astype(np.float64))
    return ((np.cos(angles) * attention).astype(np.float32), (np.sin(angles) * attention).astype(np.float32))


def softmax_mscale(p: dict) -> float:
    """DeepSeek's YaRN also scales the softmax by mscale(factor, mscale_all_dim)^2 (its attention module does)."""
    if p["rope_type"] == "default" or not p.get("mscale_all_dim") or not p.get("factor"):
        return 1.0
    return yarn_mscale(p["factor"], p["mscale_all_dim"]) ** 2


def transformers_rope_scaling(p: dict, max_position_embeddings: int) -> dict:
    """The rope_scaling of a config.json transformers computes these tables from: freq_factors (a type transformers
    lacks) as the longrope whose short and long factors are both the factors, without attention factor, so that
    its frequencies are the same at any length."""
    if p["rope_type"] == "freq_factors":
        return {"rope_type": "longrope", "short_factor": p["freq_factors"], "long_factor": p["freq_factors"],
                "attention_factor": 1.0, "original_max_position_embeddings": max_position_embeddings}
    return {k: v for k, v in p.items() if k != "rope_theta"}
