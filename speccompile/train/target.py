"""The frozen target model a head is distilled from: a plain Hugging Face directory, loaded with transformers."""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from speccompile.compile.hub_cache import looks_like_hub_id, resolve_hub_id
from speccompile.compile.sources import load_checkpoint, save_hf_dir
from speccompile.train.progress import log


def target_hf_dir(source: str | None, work: str) -> str:
    """A plain HF directory for the target (converted once into `work` unless the source already is one)."""
    if source and looks_like_hub_id(source):  # a hub id: its snapshot in the local cache, as it is
        source = resolve_hub_id(source)
    if source and os.path.isdir(source) and os.path.isfile(os.path.join(source, "config.json")):
        return source
    d = os.path.join(work, "target_hf")
    if not os.path.isfile(os.path.join(d, "model.safetensors")):
        log(f"converting target {source or 'default'} -> {d}")
        save_hf_dir(load_checkpoint(source), d)
    return d


def load_target(hf_dir: str, dtype: str = "float32"):
    """(tokenizer, frozen model in eval mode)."""
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=getattr(torch, dtype)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return tok, model


def target_config(hf_dir: str) -> dict:
    with open(os.path.join(hf_dir, "config.json")) as f:
        return json.load(f)


def target_tensors(hf_dir: str) -> dict:
    return load_file(os.path.join(hf_dir, "model.safetensors"))
