"""`mtp[:PATH]`: a multi-token-prediction head (a head file trained here, or a DeepSeek-V3 checkpoint's MTP layer;
bare: the head shipped for the target), one decoder block over mtp.bin that shares the target's embedding and,
unless it has a draft vocabulary of its own, the target's output head."""
from __future__ import annotations

import functools
import os

import numpy as np
from safetensors import safe_open

from speccompile.compile.config import ModelConfig
from speccompile.compile.drafters.base import DrafterBuild, TargetBuild
from speccompile.compile.drafters.batched_forms import add_batched_form
from speccompile.compile.drafters.head_weights import head_shared_weights, int8_draft_head
from speccompile.compile.graph.draft_heads import build_mtp_head
from speccompile.compile.graph.output import NORM_TAP
from speccompile.compile.weights.decoder import lower_mtp_weights
from speccompile.compile.model_entries import decoder_entry, source_entry
from speccompile.compile.sources import default_head_path, load_mtp_head
from speccompile.errors import CheckpointError
from speccompile.format.drafter_kinds import DraftSpec

NAME, WEIGHTS = "mtp_head", "mtp.bin"


def target_features(spec: DraftSpec, cfg: ModelConfig) -> list:
    """DeepSeek-V3's own MTP layer reads the target's output after its final norm (the checkpoint's modeling code
    hands it that; vLLM and SGLang feed it so), a head trained here the hidden states before it."""
    return [NORM_TAP] if cfg.is_mla else []


def build(spec: DraftSpec, target: TargetBuild) -> DrafterBuild:
    cfg, opts, target_w = target.config, target.options, target.weights
    path = spec.arg or default_head_path(target.checkpoint)
    target.progress(f"      mtp head: {path}")
    head = load_mtp_head(path, cfg)
    check_head_vocabulary(path, cfg)
    weights = lower_mtp_weights(cfg, head, opts.max_seq_len)
    # a trained head's block is a Llama block whatever the target's family (DeepSeek-V3's own MTP layer: MLA)
    block = cfg if cfg.is_mla else cfg.llama_block(qkv_bias="mtp.layer.self_attn.q_proj.bias" in head)
    d2t = draft_vocabulary(head, cfg, path)
    if d2t is not None:  # a reduced draft vocabulary: the head scores only these target tokens
        weights["mtp.d2t"] = d2t
        weights["mtp.head"] = np.ascontiguousarray(target_w.get("lm_head", target_w["embed"])[d2t])
    if opts.draft_precision == "int8" and not cfg.is_mla:
        target.progress("      quantize: the MTP head's matrices to int8 (speccompile.compile.quantize.int8)")
        weights = int8_draft_head(weights, target_w, target.int8_kernel)
    features = target_features(spec, cfg)
    assert all(t in target.features for t in features)  # the driver asked target_features
    # DeepSeek-V3's layer drafts further on its own output after shared_head.norm, as it reads the target's
    graph = functools.partial(build_mtp_head, block, weights | head_shared_weights(weights, target_w),
                              opts.max_seq_len, attention=opts.attention, fused=opts.fused,
                              normed_hidden=bool(features))
    files = [WEIGHTS, "target.bin"]
    model = decoder_entry(NAME, cfg, 1, opts.max_seq_len, files, opts.attention, mtp=True,
                          draft_vocab=None if d2t is None else len(d2t))
    if d2t is not None:
        model["draft_to_target"] = d2t.tolist()
    if features:
        model["target_features"] = features
    model["source"] = source_entry(path)
    graphs, models, entry = {NAME: (graph(name=NAME), files)}, {NAME: model}, {"model": NAME}
    add_batched_form(NAME, block, graph, target, (graphs, models, entry), head=True)
    return DrafterBuild(entry=entry, weights={WEIGHTS: weights}, graphs=graphs, models=models)


def draft_vocabulary(head: dict, cfg: ModelConfig, path: str) -> np.ndarray | None:
    """The target token ids a head with a reduced draft vocabulary scores (its mtp.d2t), or None."""
    d2t = head.get("mtp.d2t")
    if d2t is None:
        return None
    d2t = np.asarray(d2t, np.int64)
    if d2t.ndim != 1 or not d2t.size or d2t.min() < 0 or d2t.max() >= cfg.vocab_size:
        raise CheckpointError(f"{path}: mtp.d2t must list target token ids below {cfg.vocab_size} (one at least)")
    return d2t


def check_head_vocabulary(path: str, cfg: ModelConfig) -> None:
    """A head file train-head wrote records its target's vocabulary size (metadata target_vocab_size): a head of a
    target with another tokenizer holds no tensor of the vocabulary's size, and would otherwise build and draft
    tokens of the wrong vocabulary."""
    if not os.path.isfile(path):  # a DeepSeek-V3 checkpoint's own MTP module: the target's
        return
    with safe_open(path, framework="numpy") as f:
        vocab = (f.metadata() or {}).get("target_vocab_size")
    if vocab is not None and vocab != str(cfg.vocab_size):
        raise CheckpointError(f"{path}: an MTP head trained for a target with a vocabulary of {vocab} tokens; this "
                              f"target's has {cfg.vocab_size} (another tokenizer): train a head for this target")
