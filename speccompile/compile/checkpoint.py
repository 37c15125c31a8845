"""What the load pass produces, whatever the source was: a target or draft model (Checkpoint), an EAGLE head
(EagleHead), and the identity of a tokenizer (two models speculate together only with the same one)."""
from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np

from speccompile.compile.config import ModelConfig


@dataclasses.dataclass
class Checkpoint:
    config: ModelConfig
    tensors: dict[str, np.ndarray]  # Hugging Face names
    tokenizer_files: dict[str, bytes]  # file name -> content, written into the bundle as they are
    source: dict  # {"kind", "path", "sha256"}
    stored: dict | None = None  # a GGUF's tensors as stored (compile/gguf.GGUFTensor, quantized blocks), by HF name


@dataclasses.dataclass
class EagleHead:
    version: str  # "eagle" | "eagle3"
    path: str
    tensors: dict[str, np.ndarray]  # public names, any leading "model." removed
    config: dict  # the head's config.json ({} if none); speculators' transformer_layer_config is merged in


def tokenizer_fingerprint(files: dict[str, bytes]) -> str:
    """Identity of a tokenizer: its vocabulary and merges plus its added tokens, not incidental settings."""
    tok = json.loads(files["tokenizer.json"])
    merges = tok.get("model", {}).get("merges")
    if isinstance(merges, list):  # tokenizers < 0.20 wrote a merge as "a b", later ones as ["a", "b"]: the same merge
        merges = [m.split(" ", 1) if isinstance(m, str) else m for m in merges]
    key = json.dumps([tok.get("model", {}).get("vocab"), merges,
                      [(t["id"], t["content"]) for t in tok.get("added_tokens", [])]], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()
