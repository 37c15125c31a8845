"""`eagle:PATH` / `eagle3:PATH`: EAGLE-1/2 and EAGLE-3 heads from their public safetensors layouts (a file, or a
directory with its config.json); the heads' weights are lowered in speccompile.compile.weights.eagle.

A head reads features of the target: EAGLE-1 the output of its final norm ("norm"), EAGLE-3 the residual stream
entering three of its layers (`eagle_aux_hidden_state_layer_ids` in the head's config.json, by default 2, L//2
and L-3). `target_features` tells the driver which, before it emits the target graph. The head is one decoder
block over {kind}.bin with the MTP head's signature; EAGLE-3's fc, which fuses the three features, runs as its own
small graph `eagle3_fc` when target rows are committed.
"""
from __future__ import annotations

import functools
import glob
import json
import os
from typing import Callable

from speccompile.compile.checkpoint import EagleHead
from speccompile.compile.config import ModelConfig, _config_value
from speccompile.compile.rope import rope_parameters
from speccompile.compile.drafters.base import DrafterBuild, TargetBuild
from speccompile.compile.drafters.batched_forms import add_batched_form
from speccompile.compile.drafters.head_weights import head_shared_weights, int8_draft_head
from speccompile.compile.graph.draft_heads import build_eagle3_fc, build_eagle3_head, build_eagle_head
from speccompile.compile.weights.eagle import lower_eagle_head
from speccompile.compile.model_entries import decoder_entry, source_entry
from speccompile.compile.safetensors_files import PICKLE_SUFFIXES, read_safetensors, refuse_pickle
from speccompile.graphs.builder import GraphBuilder
from speccompile.errors import CheckpointError, ConfigError, UnsupportedModelError
from speccompile.format.drafter_kinds import DraftSpec

NORM_TAP = "norm"  # the target's output after its final norm (EAGLE-1's feature)


def target_features(spec: DraftSpec, cfg: ModelConfig) -> list:
    """The target features the head reads, from its config.json alone (before any tensor is read)."""
    return aux_layers(spec.kind, read_config(spec.arg, spec.kind), cfg)


def build(spec: DraftSpec, target: TargetBuild) -> DrafterBuild:
    kind, cfg, opts = spec.kind, target.config, target.options
    head = load_eagle_head(spec.arg, kind)
    hcfg = head_config(head, cfg)
    hcfg.check_lowerable(opts.max_seq_len)
    taps = aux_layers(kind, head.config, cfg)
    assert all(t in target.features for t in taps)  # the driver asked target_features
    target.progress(f"      {kind} head: {spec.arg} (reads the target's {', '.join(map(str, taps))})")
    weights, d2t = lower_eagle_head(head, cfg, hcfg, target.weights, opts.max_seq_len)
    if opts.draft_precision == "int8":
        target.progress(f"      quantize: the {kind} head's matrices to int8 (speccompile.compile.quantize.int8)")
        weights = int8_draft_head(weights, target.weights, target.int8_kernel)
    wfile, name = f"{kind}.bin", f"{kind}_head"
    graph = _head_graph(head, hcfg, weights, target)
    graphs = {name: (graph(name=name), [wfile, "target.bin"])}
    model = decoder_entry(name, hcfg, 1, opts.max_seq_len, [wfile, "target.bin"], opts.attention, mtp=True,
                          draft_vocab=None if d2t is None else len(d2t))
    model |= {"kind": name, "target_features": taps, "source": source_entry(spec.arg)}
    if d2t is not None:
        model["draft_to_target"] = d2t.tolist()
    models, entry = {name: model}, {"model": name}
    if kind == "eagle3":
        fuse = f"{kind}_fc"
        graphs[fuse] = (build_eagle3_fc(cfg, hcfg, weights["mtp.eagle3.fc"]), [wfile])
        models[fuse] = _fuse_entry(fuse, wfile, cfg, hcfg)
        entry["fuse_model"] = fuse
    add_batched_form(name, hcfg, graph, target, (graphs, models, entry), head=True)
    return DrafterBuild(entry=entry, weights={wfile: weights}, graphs=graphs, models=models)


def _head_graph(head: EagleHead, hcfg: ModelConfig, weights: dict, target: TargetBuild) -> Callable[..., GraphBuilder]:
    """The head's decoder block, built by calling the result (name=, batched=); EAGLE-3's fc is not in it (it runs
    in eagle3_fc)."""
    opts = target.options
    head_w = {k: v for k, v in weights.items() if k != "mtp.eagle3.fc"} | head_shared_weights(weights, target.weights)
    if head.version == "eagle":
        return functools.partial(build_eagle_head, hcfg, head_w, opts.max_seq_len, attention=opts.attention,
                                 fused=opts.fused)
    return functools.partial(build_eagle3_head, hcfg, head_w, opts.max_seq_len, attention=opts.attention,
                             fused=opts.fused, norm_before_residual=bool(head.config.get("norm_before_residual")))


def _fuse_entry(name: str, wfile: str, cfg: ModelConfig, hcfg: ModelConfig) -> dict:
    return {"graph": f"{name}.onnx", "weights": [wfile], "kind": "eagle3_fc",
            "config": hcfg.to_dict(),
            "inputs": [{"name": "aux_hidden_states", "dtype": "float32", "shape": ["S", 3 * cfg.hidden_size]}],
            "outputs": [{"name": "hidden", "dtype": "float32", "shape": ["S", hcfg.hidden_size]}]}


def _files_and_config(path: str, version: str) -> tuple[list[str], dict]:
    label = "EAGLE-3" if version == "eagle3" else "EAGLE"
    refuse_pickle(path)
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            pickled = [f for f in os.listdir(path) if f.endswith(PICKLE_SUFFIXES)]
            if pickled:
                raise CheckpointError(f"{path}: only pickled weights ({pickled[0]}); pickles are refused as unsafe, "
                                      "convert them to safetensors")
            raise CheckpointError(f"{path}: no *.safetensors file for the {label} head")
        cfg_path = os.path.join(path, "config.json")
    elif os.path.isfile(path):
        files, cfg_path = [path], os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
    else:
        raise CheckpointError(f"{label} head not found: {path}")
    hf = {}
    if os.path.isfile(cfg_path):
        try:
            with open(cfg_path) as f:
                hf = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{cfg_path}: corrupt config.json ({e})") from None
        if not isinstance(hf, dict):
            raise CheckpointError(f"{cfg_path}: not a JSON object")
        for key in ("transformer_layer_config", "eagle_config"):  # speculators' and EAGLE-3's nested settings
            if not isinstance(hf.get(key) or {}, dict):
                raise ConfigError(f"{cfg_path}: {key} = {hf[key]!r:.60} is not an object of settings")
        hf = {**hf, **(hf.get("transformer_layer_config") or {})}
    return files, hf


def read_config(path: str, version: str) -> dict:
    """The head's config.json alone (to pick the target's layers before any tensor is read)."""
    return _files_and_config(path, version)[1]


def load_eagle_head(path: str, version: str) -> EagleHead:
    files, hf = _files_and_config(path, version)
    tensors = {}
    for fpath in files:  # t2d, the inverse map, is implied by d2t
        raw = read_safetensors(fpath, keep=lambda k: k not in ("t2d", "model.t2d"), ints=("d2t", "model.d2t"))
        tensors |= {(k[len("model."):] if k.startswith("model.") else k): v for k, v in raw.items()}
    if version == "eagle3":
        tensors = {("layers.0." + k[len("midlayer."):] if k.startswith("midlayer.") else k): v
                   for k, v in tensors.items()}
    if not any(k.startswith("layers.0.") for k in tensors):
        raise CheckpointError(f"{path}: no {'EAGLE-3' if version == 'eagle3' else 'EAGLE'} head tensors "
                              f"({'midlayer.*' if version == 'eagle3' else 'layers.0.*'}, fc.weight, ...)")
    if any(k.startswith("layers.1.") for k in tensors):
        raise UnsupportedModelError(f"{path}: EAGLE heads of more than one decoder layer are not supported")
    return EagleHead(version, path, tensors, hf)


def default_aux_layers(n_layers: int) -> list[int]:
    """EAGLE-3's low, middle and high target layers where a head's config names none (SafeAILab's and vLLM's)."""
    return [2, n_layers // 2, n_layers - 3]


def aux_layers(version: str, hf: dict, target: ModelConfig) -> list:
    """The target features a head reads: ["norm"] for EAGLE-1, three layer ids (ascending) for EAGLE-3."""
    if version == "eagle":
        return [NORM_TAP]
    L = target.num_hidden_layers
    ids = (hf.get("eagle_aux_hidden_state_layer_ids") or (hf.get("eagle_config") or {}).get(
        "eagle_aux_hidden_state_layer_ids") or hf.get("aux_hidden_state_layer_ids") or default_aux_layers(L))
    try:
        ids = sorted({int(i) for i in ids})
    except (TypeError, ValueError):
        raise CheckpointError(f"eagle_aux_hidden_state_layer_ids {ids!r}: not a list of layer ids") from None
    if len(ids) != 3 or ids[0] < 0 or ids[-1] > L:
        raise UnsupportedModelError(
            f"EAGLE-3 reads three distinct target layers in 0..{L}; got {ids} (for a {L}-layer target set "
            "eagle_aux_hidden_state_layer_ids in the head's config.json)")
    return ids


def _setting(head: EagleHead, key: str, kind: type):
    """A number of the head's config.json (0 where absent or null); one of another type is a ConfigError."""
    try:
        return _config_value(head.config, key, kind, kind(0))
    except ConfigError as e:
        raise ConfigError(f"{'EAGLE-3' if head.version == 'eagle3' else 'EAGLE'} head {head.path}: {e}") from None


def head_config(head: EagleHead, target: ModelConfig) -> ModelConfig:
    """The head block's geometry: its config.json where it says, the target's otherwise, checked against the
    tensors' shapes."""
    hf, t = head.config, head.tensors
    label = "EAGLE-3" if head.version == "eagle3" else "EAGLE"
    if "fc.weight" not in t:
        raise CheckpointError(f"{label} head {head.path} is missing tensor 'fc.weight'")
    H = int(t["fc.weight"].shape[0])
    rope = rope_parameters(hf, default_theta=target.rope_theta)  # the head's config.json's, any variant rope.py has
    if hf.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"{label} head: unsupported activation {hf.get('hidden_act')!r} (only silu)")
    vocab = _setting(head, "vocab_size", int)  # its target's, in EAGLE's layouts (EAGLE-3's own is draft_vocab_size)
    if vocab and vocab != target.vocab_size:
        raise CheckpointError(f"{label} head {head.path}: made for a target with a vocabulary of {vocab} tokens "
                              f"(its config.json's vocab_size); this target's has {target.vocab_size}")
    heads = _setting(head, "num_attention_heads", int)
    if heads:
        kv, D = _setting(head, "num_key_value_heads", int) or heads, _setting(head, "head_dim", int) or H // heads
    elif H == target.hidden_size and not target.is_mla:
        heads, kv, D = target.num_attention_heads, target.num_key_value_heads, target.head_dim
    else:
        raise CheckpointError(f"{label} head {head.path}: its attention heads cannot be taken from the target "
                              "(another hidden size or attention kind); its config.json must give num_attention_heads")
    gate = t.get("layers.0.mlp.gate_proj.weight")
    if gate is None:
        raise CheckpointError(f"{label} head {head.path} is missing tensor 'layers.0.mlp.gate_proj.weight'")
    return ModelConfig(
        model_type="llama", vocab_size=target.vocab_size, hidden_size=H, intermediate_size=int(gate.shape[0]),
        num_hidden_layers=1, num_attention_heads=heads, num_key_value_heads=kv, head_dim=D,
        rms_norm_eps=_setting(head, "rms_norm_eps", float) or target.rms_norm_eps,
        rope_theta=rope["rope_theta"], rope=rope,
        max_position_embeddings=target.max_position_embeddings, tie_word_embeddings=True,
        qkv_bias="layers.0.self_attn.q_proj.bias" in t,
        bos_token_id=target.bos_token_id, eos_token_ids=target.eos_token_ids)
