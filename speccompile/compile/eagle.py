"""EAGLE draft heads from their public safetensors layouts: EAGLE-1/2 (`eagle:PATH`) and EAGLE-3 (`eagle3:PATH`).

Both are one Llama-style decoder block with its own KV cache that reads the target's features and, applied to its
own output, drafts several tokens ahead (like an MTP head; the drafter is drafters/eagle.py). A pair (f_t,
x_{t+1}) -- the feature of position t and the next token -- predicts x_{t+2}.

EAGLE-1/2 (SafeAILab/EAGLE `cnets1.py`, vLLM `llama_eagle.py`):
    f_t   = the target's last hidden state *after* its final norm (what its lm_head reads)
    z     = fc([embed(x_{t+1}); f_t])              fc.weight [H, 2H], fc.bias [H] optional
    out   = block(z)                               layers.0.*; layer 0 has no input_layernorm (the input is z)
    logits = target lm_head(out)                   no norm; out is fed back as the next feature
  Optional: embed_tokens.weight (else the target's); embedding_layernorm / hidden_states_layernorm (vLLM's HASS
  variant, `add_para_norm`) normalise the two halves before fc.

EAGLE-3 (SafeAILab/EAGLE `cnets.py`, vLLM `llama_eagle3.py`):
    f_t   = fc([h_a; h_b; h_c])                     fc.weight [H, 3H_target], no bias; h_i = the target's residual
                                                    stream entering layer i, for the three ids of
                                                    `eagle_aux_hidden_state_layer_ids` (default 2, L//2, L-3),
                                                    concatenated in ascending layer order
    a     = attn([input_layernorm(embed(x)); hidden_norm(f)])   q/k/v_proj [*, 2H]
    out   = mlp-block(f + a)                       midlayer.* (or layers.0.*); out is fed back as the next feature,
                                                   without fc (fc only fuses the target's layers)
    logits = lm_head(norm(out))                    own norm and lm_head over a draft vocabulary of Vd tokens;
                                                   d2t[d] = target id - d  (t2d is ignored)
  `norm_before_residual` (vLLM) makes the residual hidden_norm(f) instead of f.

The target graph gains the output `aux_hidden_states` with the features every EAGLE head of the bundle needs
(`speccompile.graphs`); EAGLE-3's fc runs as its own small graph when target rows are committed (as vLLM's
`combine_hidden_states`), so the head graph keeps the MTP head's signature and one feature width.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os

import numpy as np

from speccompile.compile.config import ModelConfig
from speccompile.errors import CheckpointError, UnsupportedModelError
from speccompile.compile.graph.draft_heads import build_eagle3_fc, build_eagle3_head, build_eagle_head
from speccompile.compile.weights.eagle import lower_eagle_head
from speccompile.compile.sources import PICKLE_SUFFIXES, read_safetensors, refuse_pickle

KINDS = ("eagle", "eagle3")
NORM_TAP = "norm"  # the target's output after its final norm (EAGLE-1's feature)


@dataclasses.dataclass
class EagleHead:
    version: str  # "eagle" | "eagle3"
    path: str
    tensors: dict[str, np.ndarray]  # public names, any leading "model." removed
    config: dict  # the head's config.json ({} if none); speculators' transformer_layer_config is merged in


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


def aux_layers(version: str, hf: dict, target: ModelConfig) -> list:
    """The target features a head reads: ["norm"] for EAGLE-1, three layer ids (ascending) for EAGLE-3."""
    if version == "eagle":
        return [NORM_TAP]
    L = target.num_hidden_layers
    ids = (hf.get("eagle_aux_hidden_state_layer_ids") or (hf.get("eagle_config") or {}).get(
        "eagle_aux_hidden_state_layer_ids") or hf.get("aux_hidden_state_layer_ids") or (2, L // 2, L - 3))
    try:
        ids = sorted({int(i) for i in ids})
    except (TypeError, ValueError):
        raise CheckpointError(f"eagle_aux_hidden_state_layer_ids {ids!r}: not a list of layer ids") from None
    if len(ids) != 3 or ids[0] < 0 or ids[-1] > L:
        raise UnsupportedModelError(
            f"EAGLE-3 reads three distinct target layers in 0..{L}; got {ids} (for a {L}-layer target set "
            "eagle_aux_hidden_state_layer_ids in the head's config.json)")
    return ids


def target_aux_layers(specs, target: ModelConfig) -> list:
    """The union of the features the EAGLE heads of a build read, in the order of `aux_hidden_states`:
    layer ids ascending, then "norm"."""
    taps = set()
    for s in specs:
        if s.kind in KINDS:
            taps.update(aux_layers(s.kind, read_config(s.arg, s.kind), target))
    return sorted(t for t in taps if t != NORM_TAP) + ([NORM_TAP] if NORM_TAP in taps else [])


def _rope_type(hf: dict) -> str:
    rope = hf.get("rope_scaling") or {}
    return rope.get("rope_type", rope.get("type")) or (hf.get("rope_parameters") or {}).get("rope_type", "default")


def head_config(head: EagleHead, target: ModelConfig) -> ModelConfig:
    """The head block's geometry: its config.json where it says, the target's otherwise, checked against the
    tensors' shapes."""
    hf, t = head.config, head.tensors
    label = "EAGLE-3" if head.version == "eagle3" else "EAGLE"
    if "fc.weight" not in t:
        raise CheckpointError(f"{label} head {head.path} is missing tensor 'fc.weight'")
    H = int(t["fc.weight"].shape[0])
    if _rope_type(hf) not in (None, "default"):
        raise UnsupportedModelError(f"{label} head: unsupported RoPE scaling {_rope_type(hf)!r}")
    if hf.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"{label} head: unsupported activation {hf.get('hidden_act')!r} (only silu)")
    if hf.get("num_attention_heads"):
        heads = int(hf["num_attention_heads"])
        kv, D = int(hf.get("num_key_value_heads") or heads), int(hf.get("head_dim") or H // heads)
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
        rms_norm_eps=float(hf.get("rms_norm_eps") or target.rms_norm_eps),
        rope_theta=float(hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta")
                         or target.rope_theta),
        max_position_embeddings=target.max_position_embeddings, tie_word_embeddings=True,
        qkv_bias="layers.0.self_attn.q_proj.bias" in t,
        bos_token_id=target.bos_token_id, eos_token_ids=target.eos_token_ids)


def build_eagle(spec, cfg: ModelConfig, weights: dict, graphs: dict, models: dict, max_seq_len: int,
                attention: str, fused: bool, target_aux: list, draft_precision: str, progress) -> dict:
    """The build pass for an `eagle:PATH` / `eagle3:PATH` drafter: load, lower, emit the head graph (and
    EAGLE-3's fc graph) into graphs/models/weights; returns the drafter entry's additions."""
    from speccompile.compile.driver import _model_entry, head_shared_weights, int8_draft_head
    from speccompile.compile.sources import sha256_path
    kind = spec.kind
    head = load_eagle_head(spec.arg, kind)
    hcfg = head_config(head, cfg)
    hcfg.check_lowerable(max_seq_len)
    taps = aux_layers(kind, head.config, cfg)
    progress(f"      {kind} head: {spec.arg} (reads the target's {', '.join(map(str, taps))})")
    wfile, name = f"{kind}.bin", f"{kind}_head"
    target_w = weights["target.bin"]
    w, d2t = lower_eagle_head(head, cfg, hcfg, target_w, max_seq_len)
    if draft_precision == "int8":
        progress(f"      quantize: the {kind} head's matrices to int8 (speccompile.compile.int8)")
        w = int8_draft_head(w, target_w)
    weights[wfile] = w
    head_w = {k: v for k, v in w.items() if k != "mtp.eagle3.fc"} | head_shared_weights(w, target_w)
    if kind == "eagle3":
        graph = build_eagle3_head(hcfg, head_w, max_seq_len, attention, fused, name,
                                  norm_before_residual=bool(head.config.get("norm_before_residual")))
    else:
        graph = build_eagle_head(hcfg, head_w, max_seq_len, attention, fused, name)
    graphs[name] = (graph, [wfile, "target.bin"])
    models[name] = _model_entry(name, hcfg, 1, max_seq_len, [wfile, "target.bin"], attention, mtp=True,
                                draft_vocab=None if d2t is None else len(d2t))
    models[name]["kind"] = name
    models[name]["target_features"] = taps
    models[name]["source"] = {"path": os.path.abspath(spec.arg), "sha256": sha256_path(spec.arg)}
    if d2t is not None:
        models[name]["draft_to_target"] = d2t.tolist()
    out = {"model": name}
    if kind == "eagle3":
        fuse = f"{kind}_fc"
        graphs[fuse] = (build_eagle3_fc(cfg, hcfg, w["mtp.eagle3.fc"]), [wfile])
        models[fuse] = {"graph": f"{fuse}.onnx", "weights": [wfile], "kind": "eagle3_fc", "config": hcfg.to_dict(),
                        "inputs": [{"name": "aux_hidden_states", "dtype": "float32",
                                    "shape": ["S", 3 * cfg.hidden_size]}],
                        "outputs": [{"name": "hidden", "dtype": "float32", "shape": ["S", hcfg.hidden_size]}]}
        out["fuse_model"] = fuse
    assert all(t in target_aux for t in taps)
    return out
