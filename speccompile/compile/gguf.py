"""Read a GGUF file without torch: its config, tokenizer and tensors, with the `gguf` package's reader and
dequantization.

The config keys and the q/k row order follow transformers' GGUF loader (integrations/ggml.py and
modeling_gguf_pytorch_utils.py), so a GGUF compiles to the same bundle either way.
"""
from __future__ import annotations

import dataclasses
import os
import re

import gguf
import numpy as np

from speccompile.compile.config import ModelConfig
from speccompile.compile.gguf_tokenizer import end_of_turn_ids, tokenizer_files
from speccompile.compile.rope import rope_parameters
from speccompile.errors import CheckpointError, UnsupportedModelError

# general.architecture values read; a "llama" file whose general.name says mistral is read as Mistral (transformers
# does so only for the name "mistral" exactly; either way it computes as llama does: CONFIG_DEFAULTS).
GGUF_ARCHITECTURES = ("llama", "qwen2")

# GGUF key (after the "<arch>." prefix) -> Hugging Face config key, as transformers' GGUF_CONFIG_MAPPING has it.
CONFIG_KEYS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "rope.freq_base": "rope_theta",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "vocab_size": "vocab_size",
}
# transformers reads head_dim from rope.dimension_count for llama/mistral only (Qwen2 rotates whole heads).
HEAD_DIM_KEY = {"llama": "rope.dimension_count", "mistral": "rope.dimension_count"}
# Defaults where the GGUF says nothing. No sliding window for Mistral: llama.cpp attends over the whole context of
# every "llama" file, and transformers reads a Mistral file by any other name than "mistral" as llama (the 4096 of
# its Mistral config would slide attention that Mistral 7B v0.2+ and the original llama.cpp run never slid).
CONFIG_DEFAULTS = {"mistral": {"sliding_window": None}, "qwen2": {"use_sliding_window": False}}

# {arch}.rope.scaling.* keys (and the older rope.scale_linear) lowered, as llama.cpp applies them: linear, and YaRN
# as transformers computes it (the same frequencies, correction dims and attention factor). Any other scaling key
# changes the rotation in a way not lowered, unless it holds the value that changes nothing.
ROPE_SCALING_KEYS = ("rope.scaling.type", "rope.scaling.factor", "rope.scale_linear", "rope.scaling.finetuned",
                     "rope.scaling.original_context_length", "rope.scaling.yarn_beta_fast",
                     "rope.scaling.yarn_beta_slow")
NEUTRAL_ROPE_SCALING = {"rope.scaling.attn_factor": 1.0, "rope.scaling.yarn_log_multiplier": 0.0}
# llama.cpp ends generation at each of them, and at each end-of-turn token it finds by its text (gguf_tokenizer)
EOS_KEYS = ("eos_token_id", "eot_token_id", "eom_token_id")

ROPE_FREQS = "rope_freqs.weight"  # llama.cpp's per-frequency RoPE factors (with_rope_freqs)
GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
BLOCK_TENSORS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}



@dataclasses.dataclass
class GGUFTensor:
    """One tensor as stored: raw rows (blocks for quantized types) in Hugging Face row order."""
    ggml_type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # Hugging Face shape, e.g. [N, K] for a linear layer
    raw: np.ndarray  # uint8 block rows for quantized types, the values for F32/F16
    name: str = ""  # as the file names it (blk.0.attn_q.weight), for errors

    def dequantize(self) -> np.ndarray:
        try:
            values = gguf.quants.dequantize(self.raw, self.ggml_type)
        except NotImplementedError:  # the gguf package reads no such type (integers, Q8_1, Q8_K, ...)
            raise UnsupportedModelError(f"GGUF tensor {self.name} is of type {self.ggml_type.name}: not a type the "
                                        "gguf package dequantizes") from None
        return np.asarray(values, np.float32).reshape(self.shape)


def open_gguf(path: str) -> gguf.GGUFReader:
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise CheckpointError(f"{path}: not a GGUF file (bad magic)")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/IndexError/... on truncated or corrupt files
        raise CheckpointError(f"{path}: corrupt or truncated GGUF file ({type(e).__name__}: {e})") from None


# llama.cpp's gguf-split names: shard i of n is PREFIX-0000i-of-0000n.gguf, and llama.cpp loads a split model
# from its first shard, finding the others by that name
SHARD_NAME = re.compile(r"(.*)-(\d{5})-of-(\d{5})\.gguf")


def split_shards(path: str) -> list[str]:
    """The files of the GGUF model `path` names: every shard of a split model (named as llama.cpp's gguf-split
    names them, `path` the first), else `path` alone. read_gguf checks the shards' own split.* keys agree."""
    named = SHARD_NAME.fullmatch(os.path.basename(path))
    if named is None or int(named[3]) < 2:
        return [path]
    prefix, count = os.path.join(os.path.dirname(path), named[1]), int(named[3])
    if int(named[2]) != 1:
        raise CheckpointError(f"{path}: shard {int(named[2])} of a split GGUF; build from its first shard, "
                              f"{os.path.basename(prefix)}-00001-of-{count:05d}.gguf")
    shards = [f"{prefix}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        raise CheckpointError(f"{path}: shard {os.path.basename(missing[0])} of this split GGUF is missing")
    return shards


def read_metadata(reader: gguf.GGUFReader) -> dict:
    return {key: field.contents() for key, field in reader.fields.items()}


def model_type(meta: dict) -> str:
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedModelError(f"unsupported GGUF architecture {arch!r}; supported: "
                                    f"{', '.join(GGUF_ARCHITECTURES)}")
    return "mistral" if arch == "llama" and "mistral" in str(meta.get("general.name", "")).lower() else arch


def rope_scaling(meta: dict, arch: str) -> dict | None:
    """The Hugging Face rope_scaling of the file's RoPE scaling keys, read as llama.cpp reads them: a factor (or the
    older rope.scale_linear) scales linearly unless the type says otherwise; type none or a factor of 1: none."""
    keys = {k[len(arch) + 1:]: v for k, v in meta.items() if k.startswith(f"{arch}.rope.scal")}
    for key, value in keys.items():
        if key not in ROPE_SCALING_KEYS and NEUTRAL_ROPE_SCALING.get(key, "not neutral") != value:
            raise UnsupportedModelError(f"GGUF key {arch}.{key} = {value!r:.40}: RoPE scaling not lowered")
    kind = keys.get("rope.scaling.type", "linear")  # llama.cpp's default: a bare factor is linear
    factor = keys.get("rope.scaling.factor", keys.get("rope.scale_linear", 1.0))
    if kind not in ("none", "linear", "yarn"):
        raise UnsupportedModelError(f"GGUF key {arch}.rope.scaling.type = {kind!r:.40}: RoPE scaling not lowered; "
                                    "lowered: none, linear, yarn")
    if factor in (0.0, 1.0):  # llama.cpp reads 0 as no factor
        return None
    if kind == "none":  # llama.cpp would still scale linearly by the factor: which was meant is unclear
        raise UnsupportedModelError(f"GGUF keys {arch}.rope.scaling.type = 'none' but a scaling factor of "
                                    f"{factor!r:.40}: contradictory RoPE scaling")
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    return {"rope_type": "yarn", "factor": factor,  # llama.cpp's defaults where the file says nothing
            "original_max_position_embeddings": keys.get("rope.scaling.original_context_length",
                                                         meta.get(f"{arch}.context_length")),
            "beta_fast": keys.get("rope.scaling.yarn_beta_fast", 32.0),
            "beta_slow": keys.get("rope.scaling.yarn_beta_slow", 1.0)}


def hf_config(meta: dict, tensor_names: set[str]) -> dict:
    """The Hugging Face config dict transformers builds from this GGUF's metadata, with the RoPE scaling and
    end-of-turn tokens llama.cpp reads too."""
    arch, mtype = meta["general.architecture"], model_type(meta)
    if meta.get(f"{arch}.expert_count") or any("_exps." in name for name in tensor_names):
        raise UnsupportedModelError("MoE GGUF not supported (expert tensors ffn_*_exps); build from the Hugging "
                                    "Face checkpoint instead")
    keys = CONFIG_KEYS | ({HEAD_DIM_KEY[mtype]: "head_dim"} if mtype in HEAD_DIM_KEY else {})
    hf = {"model_type": mtype, **CONFIG_DEFAULTS.get(mtype, {}),
          "tie_word_embeddings": "output.weight" not in tensor_names}
    hf |= {hf_key: meta[f"{arch}.{key}"] for key, hf_key in keys.items() if f"{arch}.{key}" in meta}
    if "vocab_size" not in hf and "tokenizer.ggml.tokens" in meta:
        hf["vocab_size"] = len(meta["tokenizer.ggml.tokens"])
    scaling = rope_scaling(meta, arch)
    if scaling:
        hf["rope_scaling"] = scaling
    # transformers leaves these at its config class's defaults; the file's own ids are the ones its tokenizer uses
    hf["bos_token_id"] = meta.get("tokenizer.ggml.bos_token_id")
    eos = []
    for value in [meta.get(f"tokenizer.ggml.{k}") for k in EOS_KEYS] + end_of_turn_ids(meta):
        if value is not None and value not in eos:
            eos.append(value)
    hf["eos_token_id"] = eos[0] if len(eos) == 1 else eos or None
    return hf


def with_file_biases(config: ModelConfig, tensor_names: set[str]) -> ModelConfig:
    """The q/k/v and o biases the file holds, applied as llama.cpp applies them to a "llama" file (optional
    tensors there; transformers' loader drops them, so its logits are those of another model); MLP biases are
    refused, not dropped."""
    held = {name.split(".")[2] for name in tensor_names if name.startswith("blk.") and name.endswith(".bias")}
    if held & {"ffn_gate", "ffn_up", "ffn_down"}:
        raise UnsupportedModelError("GGUF with MLP biases (blk.*.ffn_*.bias): not lowered")
    return dataclasses.replace(config, qkv_bias=config.qkv_bias or bool(held & {"attn_q", "attn_k", "attn_v"}),
                               o_bias=config.o_bias or "attn_output" in held)


def hf_tensor_name(gguf_name: str) -> str | None:
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in GLOBAL_TENSORS:
        return f"{GLOBAL_TENSORS[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in BLOCK_TENSORS:
        return f"model.layers.{parts[1]}.{BLOCK_TENSORS[parts[2]]}.{suffix}"
    return None


def unpermute_rope_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (convert_hf_to_gguf.py's permute): within each head it interleaved
    the two rotary halves; rows may be values or raw block rows, since whole rows move."""
    w = rows.reshape(n_head, rows.shape[0] // n_head // 2, 2, *rows.shape[1:])
    return w.swapaxes(2, 1).reshape(rows.shape)


def read_tensors(readers: list[gguf.GGUFReader], cfg: ModelConfig) -> dict[str, GGUFTensor]:
    """Every tensor of the shards as stored, under its Hugging Face name, q/k rows back in Hugging Face order."""
    out = {}
    for t in (t for reader in readers for t in reader.tensors):
        name = hf_tensor_name(t.name)
        if name is None:
            continue  # llama.cpp extras transformers drops too; rope_freqs.weight is read by with_rope_freqs
        raw = t.data
        if cfg.model_type in ("llama", "mistral") and (".attn_q." in t.name or ".attn_k." in t.name):
            heads = cfg.num_attention_heads if ".attn_q." in t.name else cfg.num_key_value_heads
            if len(raw) % (2 * heads):  # (a file of the right shapes always splits; the shape check comes later)
                raise CheckpointError(f"GGUF tensor {t.name} has {len(raw)} rows: not {heads} heads of "
                                      "rotary pairs")
            raw = unpermute_rope_rows(raw, heads)
        out[name] = GGUFTensor(t.tensor_type, tuple(int(d) for d in reversed(t.shape)), raw, t.name)
    return with_absent_biases_as_zeros(out, cfg)


def with_absent_biases_as_zeros(tensors: dict[str, GGUFTensor], cfg: ModelConfig) -> dict[str, GGUFTensor]:
    """llama.cpp adds each attention bias a file holds, one by one (all optional): where the config has q/k/v or o
    biases because some are held, one not held adds nothing, so it reads as zeros."""
    out = dict(tensors)
    wanted = [*("qkv" if cfg.qkv_bias else ""), *("o" if cfg.o_bias else "")]
    for i, proj in ((i, proj) for i in range(cfg.num_hidden_layers) for proj in wanted):
        stem = f"model.layers.{i}.self_attn.{proj}_proj"
        weight = out.get(stem + ".weight")
        if weight is not None and stem + ".bias" not in out:
            out[stem + ".bias"] = GGUFTensor(gguf.GGMLQuantizationType.F32, weight.shape[:1],
                                             np.zeros(weight.shape[0], np.float32), "(absent: zeros)")
    return out


def with_rope_freqs(config: ModelConfig, readers: list[gguf.GGUFReader]) -> ModelConfig:
    """The config with the file's per-frequency RoPE factors (rope_freqs.weight: how convert_hf_to_gguf.py writes
    Llama 3.1's llama3 scaling, which no metadata key states), applied as llama.cpp applies them: each frequency
    divided by its factor (rope.py's freq_factors)."""
    found = [t for reader in readers for t in reader.tensors if t.name == ROPE_FREQS]
    if not found:
        return config
    if config.model_type not in ("llama", "mistral"):
        raise UnsupportedModelError(f"GGUF tensor {ROPE_FREQS} in a {config.model_type} file: per-frequency RoPE "
                                    "factors are lowered for llama files only")
    if config.rope["rope_type"] != "default":
        raise UnsupportedModelError(f"GGUF tensor {ROPE_FREQS} beside {config.rope['rope_type']} RoPE scaling "
                                    "keys: the two combined are not lowered")
    t = found[0]
    shape = tuple(int(d) for d in reversed(t.shape))
    factors = GGUFTensor(t.tensor_type, shape, t.data, t.name).dequantize()
    if shape != (config.rope_dim // 2,):
        raise CheckpointError(f"GGUF tensor {ROPE_FREQS} has shape {list(shape)}: not one factor per rotary "
                              f"frequency ({config.rope_dim // 2} of a rotated head of {config.rope_dim})")
    if not np.all(np.isfinite(factors) & (factors > 0)):
        raise CheckpointError(f"GGUF tensor {ROPE_FREQS} holds factors that are not positive finite numbers")
    rope = rope_parameters({"rope_theta": config.rope_theta,
                            "rope_scaling": {"rope_type": "freq_factors", "freq_factors": factors.tolist()}})
    return dataclasses.replace(config, rope=rope)


def dequantized_tensors(tensors: dict[str, GGUFTensor], cfg: ModelConfig) -> dict[str, np.ndarray]:
    out = {name: t.dequantize() for name, t in tensors.items()}
    if cfg.tie_word_embeddings and "model.embed_tokens.weight" in out:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]  # as a tied model's state_dict lists it
    return out


def open_shards(path: str) -> list[gguf.GGUFReader]:
    """A reader of each file of the GGUF model `path` (split_shards), each checked to be the shard its name
    says, as llama.cpp checks them."""
    shards = split_shards(path)
    readers = [open_gguf(shard) for shard in shards]
    for i, (shard, reader) in enumerate(zip(shards, readers)):
        split = [reader.fields[k].contents() if k in reader.fields else d for k, d in (("split.no", 0),
                                                                                       ("split.count", 1))]
        if split != [i, len(shards)]:
            raise CheckpointError(f"{shard}: its split.* keys make it shard {split[0] + 1} of {split[1]}, its name "
                                  f"shard {i + 1} of {len(shards)} (a split GGUF is read from its first shard, the "
                                  "others found by gguf-split's names, PREFIX-00001-of-0000N.gguf)")
    return readers


def is_gguf_file(path: str) -> bool:
    """A GGUF file by its magic bytes, whatever its name (llama.cpp reads any name)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def read_gguf(path: str) -> tuple[ModelConfig, dict[str, GGUFTensor], dict[str, bytes]]:
    """(config, tensors as stored, tokenizer files) of a GGUF file, or of a split one from its first shard; every
    failure names the file."""
    readers = open_shards(path)
    meta = read_metadata(readers[0])
    if "general.architecture" not in meta:
        raise CheckpointError(f"{path}: GGUF without general.architecture (truncated, or not a model file)")
    try:
        names = {t.name for reader in readers for t in reader.tensors}
        config = with_file_biases(ModelConfig.from_hf(hf_config(meta, names)), names)
        try:
            tokenizer = tokenizer_files(meta)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:  # missing or of the wrong kind
            raise CheckpointError(f"bad tokenizer metadata ({type(e).__name__}: {e})") from None
        config = with_rope_freqs(config, readers)
        return config, read_tensors(readers, config), tokenizer
    except (UnsupportedModelError, CheckpointError) as e:  # ConfigError too: each names the file
        raise type(e)(f"{path}: {e}") from None
