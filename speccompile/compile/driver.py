"""`speccompile build`: the compiler driver. Passes, each with one job:

  load      source -> Checkpoint                      (sources.load_checkpoint)
  lower     Checkpoint -> graph weights               (lower.lower_weights)
  quantize  output head -> its int8 screen            (head_screen.quantize_head: exact greedy argmax);
            draft heads -> int8 matrices              (int8.quantize_matrices: drafts need not be exact)
  graph     weights -> decoder graph per model        (lower.build_decoder)
  write     graphs + weights + tokenizer -> bundle    (bundle.*), atomically
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time

from speccompile import __version__
from speccompile.format.bundle import atomic_bundle_dir, finalize_manifest, guard_output, write_weights
import numpy as np

from speccompile.errors import CheckpointError, SpeccompileError, TokenizerMismatchError, UnsupportedModelError
from speccompile.graphs import DECODER_GRAPH_VERSION, decoder_signature
from speccompile.compile.head_screen import quantize_head, screenable
from speccompile.compile.int8 import SUFFIX_CODES, quantize_matrices
from speccompile.compile.lower import build_decoder, lower_mtp_weights, lower_weights
from speccompile.compile import trt_backend
from speccompile.plugins import tree_attention
from speccompile.compile.sources import (Checkpoint, default_head_path, load_checkpoint, load_mtp_head, sha256_path, shipped_head)
from speccompile.format.drafter_kinds import KINDS, DraftSpec
from speccompile.format.trees import TreeSpec


def tokenizer_fingerprint(files: dict[str, bytes]) -> str:
    """Identity of a tokenizer: its vocabulary and merges plus its added tokens, not incidental settings."""
    tok = json.loads(files["tokenizer.json"])
    key = json.dumps([tok.get("model", {}).get("vocab"), tok.get("model", {}).get("merges"),
                      [(t["id"], t["content"]) for t in tok.get("added_tokens", [])]], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()


HEAD_MATRICES = ("mtp.eh_proj", "mtp.fc", "mtp.l0.qkv", "mtp.l0.o", "mtp.l0.gate", "mtp.l0.up", "mtp.l0.down")


def int8_draft_head(head_w: dict, target_w: dict) -> dict:
    """A draft head's (MTP or EAGLE) matrices in int8: drafts need not be exact, and a drafting pass reads a quarter
    of the bytes. Its output head: its own rows (a draft vocabulary) in int8, else the target's int8 head screen,
    read from target.bin (see head_shared_weights), else an int8 copy of the target's head."""
    if "mtp.head" not in head_w and "head_screen.codes" not in target_w:
        head_w = {**head_w, "mtp.head": target_w.get("lm_head", target_w["embed"])}
    return quantize_matrices(quantize_matrices(head_w, HEAD_MATRICES), ["mtp.head"], layout="nk")


def target_output_head(target_w: dict, int8: bool) -> dict:
    """The target's output head as a draft head graph that scores with it reads it from target.bin (not copied):
    the int8 head screen for an int8 head, else the float32 head (lm_head, or the tied embedding)."""
    keys = ("head_screen.codes", "head_screen.scales") if int8 and "head_screen.codes" in target_w else ("lm_head",
                                                                                                          "embed")
    return {k: target_w[k] for k in keys if k in target_w}


def head_shared_weights(head_w: dict, target_w: dict) -> dict:
    """The target's tensors an MTP/EAGLE head graph reads from target.bin: embedding, RoPE tables, and the output
    head it scores with when it has none of its own."""
    shared = {k: target_w[k] for k in ("embed", "lm_head", "rope.cos", "rope.sin") if k in target_w}
    if not any(k.startswith("mtp.head") for k in head_w):
        shared |= target_output_head(target_w, int8=any(k.endswith(SUFFIX_CODES) for k in head_w))
    return shared


def _model_entry(name, ckpt_cfg, num_layers, max_seq_len, weights_files, attention, mtp=False, draft_vocab=None,
                 verify=False, aux_layers=None, screen=False):
    ins, outs = decoder_signature(num_layers, ckpt_cfg.cache_kv_heads, ckpt_cfg.cache_head_dim, max_seq_len,
                                  draft_vocab or ckpt_cfg.vocab_size, ckpt_cfg.hidden_size, mtp, verify,
                                  aux_width=len(aux_layers or ()) * ckpt_cfg.hidden_size, screen=screen)
    return {"graph": f"{name}.onnx", "weights": weights_files, "config": ckpt_cfg.to_dict(), "num_layers": num_layers,
            "kind": "mtp_head" if mtp else "decoder",
            "graph_version": DECODER_GRAPH_VERSION, "attention": attention,
            "kv_cache": {"layout": ("per layer, the MLA latent [k_rope; c_kv] as one head (K and V hold the same rows)"
                                    if ckpt_cfg.is_mla and ckpt_cfg.mla_cache == "latent" else
                                    "per layer K and V, [1, num_kv_heads, max_seq_len, head_dim]"),
                         "dtype": "float32", "num_layers": num_layers,
                         "num_kv_heads": ckpt_cfg.cache_kv_heads, "head_dim": ckpt_cfg.cache_head_dim,
                         "max_seq_len": max_seq_len},
            "inputs": [{"name": n, "dtype": d, "shape": s} for n, d, s in ins],
            "outputs": [{"name": n, "dtype": d, "shape": s} for n, d, s in outs]}


@guard_output("out", "overwrite")  # --out locked and checked (never a user's files) before any work
def build_bundle(source: str | None, out: str, drafts: list[str] | None = None, max_seq_len: int = 2048,
                 num_draft: int | None = None, attention: str = "ort", fused: bool = True, overwrite: bool = False,
                 tree: str | None = None, mla_cache: str = "latent", backend: str = "onnxruntime",
                 head_screen: bool = True, draft_precision: str = "int8", progress=print) -> dict:
    """Compile `source` and its drafters into the bundle `out`. drafts=None: the MTP head shipped for the target
    if there is one, and prompt lookup. backend="tensorrt" adds a TensorRT engine per model (trt_backend).
    head_screen: give the target's greedy passes the exact int8-screened output head (head_screen.py).
    draft_precision: "int8" stores MTP heads' matrices in int8 (speccompile.compile.int8), or "float32"."""
    t0 = time.perf_counter()
    toolchain = None
    if backend == "tensorrt":  # checked first: a build refused for want of TensorRT has done and written nothing
        toolchain = trt_backend.require_toolchain()
        attention, fused = "plugin", False  # TreeAttention as the plugin's node; the CPU graphs get its expansion
    elif backend != "onnxruntime":
        raise SpeccompileError(f"--backend {backend!r}: choose onnxruntime or tensorrt")
    tree_spec = TreeSpec.parse(tree) if tree else None
    if draft_precision not in ("int8", "float32"):
        raise SpeccompileError(f"--draft-precision {draft_precision!r}: choose int8 or float32")
    specs = [s for s in (DraftSpec.parse(d) for d in drafts or ()) if s is not None]
    if num_draft is not None and not 1 <= num_draft <= 16:
        raise SpeccompileError(f"--num-draft {num_draft}: must be between 1 and 16")
    progress("[1/4] load: reading the target checkpoint")
    target = load_checkpoint(source, progress)
    if mla_cache not in ("latent", "expanded"):
        raise SpeccompileError(f"--mla-cache {mla_cache!r}: choose latent or expanded")
    if target.config.is_mla:
        target.config = dataclasses.replace(target.config, mla_cache=mla_cache)
    cfg = target.config
    cfg.check_lowerable(max_seq_len)
    if drafts is None:  # the shipped head first (its default tree joins lookup's drafts), then lookup alone
        specs = [DraftSpec("mtp")] if shipped_head(target) else []
        specs.append(DraftSpec("lookup"))
    if not 16 <= max_seq_len <= cfg.max_position_embeddings:
        raise SpeccompileError(f"--max-seq-len {max_seq_len}: must be between 16 and the model's "
                               f"max_position_embeddings ({cfg.max_position_embeddings})")
    progress(f"      {cfg.model_type}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
             f"{cfg.num_attention_heads}/{cfg.num_key_value_heads} heads, vocab {cfg.vocab_size}")
    progress("[2/4] lower: packing weights")
    weights = {"target.bin": lower_weights(cfg, target.tensors, max_seq_len)}
    target_w = weights["target.bin"]
    screen = head_screen and fused and screenable(cfg.hidden_size, cfg.vocab_size)
    if screen:  # fused graphs only: MatMulNBits is onnxruntime's (TensorRT builds set fused=False above)
        progress("      quantize: int8 screen of the output head (greedy argmax stays exact)")
        target_w |= quantize_head(target_w.get("lm_head", target_w["embed"]))
    progress("[3/4] graph: emitting static decoder graphs")
    from speccompile.compile.eagle import target_aux_layers
    aux = target_aux_layers(specs, cfg)  # the target features EAGLE heads read (none without them)
    graphs = {"target": (build_decoder(cfg, weights["target.bin"], max_seq_len, attention=attention, fused=fused,
                                       name="target", verify=True, aux_layers=aux),
                         ["target.bin"])}  # verify: in-graph acceptance
    models = {"target": _model_entry("target", cfg, cfg.num_hidden_layers, max_seq_len, ["target.bin"], attention,
                                     verify=True, aux_layers=aux, screen=screen)}
    if aux:
        models["target"]["aux_hidden_layers"] = aux
    drafters = []
    for spec in specs:
        kind = KINDS[spec.kind]
        tree_of = tree_spec or (TreeSpec.parse(kind.default_tree) if num_draft is None and kind.default_tree
                                else None)
        entry = {"name": spec.name, "kind": spec.kind, "num_draft": num_draft or kind.default_num_draft,
                 "tree": tree_of.to_dict() if tree_of else None}
        if spec.kind == "lookup":
            entry["max_ngram"] = int(spec.arg) if spec.arg else 3
        elif spec.kind == "layerskip":
            L = int(spec.arg)
            if not 1 <= L < cfg.num_hidden_layers:
                raise SpeccompileError(f"--draft layerskip:{L}: the target has {cfg.num_hidden_layers} layers; "
                                       f"choose 1..{cfg.num_hidden_layers - 1}")
            name = f"early_exit_{L}"
            progress(f"      {name}: the target's first {L} layers + its norm and head (shared weights)")
            graphs[name] = (build_decoder(cfg, weights["target.bin"], max_seq_len, num_layers=L, attention=attention,
                                          fused=fused, name=name), ["target.bin"])
            models[name] = _model_entry(name, cfg, L, max_seq_len, ["target.bin"], attention)
            entry["model"] = name
        elif spec.kind == "model":
            draft = load_checkpoint(spec.arg, progress)
            _check_draft_compatible(target, draft)
            draft.config.check_lowerable(max_seq_len)
            weights["draft.bin"] = lower_weights(draft.config, draft.tensors, max_seq_len)
            graphs["draft"] = (build_decoder(draft.config, weights["draft.bin"], max_seq_len, attention=attention,
                                             fused=fused, name="draft"), ["draft.bin"])
            models["draft"] = _model_entry("draft", draft.config, draft.config.num_hidden_layers, max_seq_len,
                                           ["draft.bin"], attention)
            models["draft"]["source"] = draft.source
            entry["model"] = "draft"
        elif spec.kind == "mtp":
            path = spec.arg or default_head_path(target)
            progress(f"      mtp head: {path}")
            head = load_mtp_head(path, cfg)
            weights["mtp.bin"] = lower_mtp_weights(cfg, head)
            d2t = head.get("mtp.d2t")
            if d2t is not None:  # a reduced draft vocabulary: the head scores only these target tokens
                d2t = np.asarray(d2t, np.int64)
                if d2t.ndim != 1 or d2t.min() < 0 or d2t.max() >= cfg.vocab_size:
                    raise CheckpointError(f"{path}: mtp.d2t must list target token ids below {cfg.vocab_size}")
                weights["mtp.bin"]["mtp.d2t"] = d2t
                weights["mtp.bin"]["mtp.head"] = np.ascontiguousarray(target_w.get("lm_head", target_w["embed"])[d2t])
            if draft_precision == "int8" and not cfg.is_mla:
                progress("      quantize: the MTP head's matrices to int8 (speccompile.compile.int8)")
                weights["mtp.bin"] = int8_draft_head(weights["mtp.bin"], target_w)
            shared = head_shared_weights(weights["mtp.bin"], target_w)
            graphs["mtp_head"] = (build_decoder(cfg, weights["mtp.bin"] | shared, max_seq_len, attention=attention,
                                                fused=fused, name="mtp_head", mtp=True), ["mtp.bin", "target.bin"])
            models["mtp_head"] = _model_entry("mtp_head", cfg, 1, max_seq_len, ["mtp.bin", "target.bin"], attention,
                                              mtp=True, draft_vocab=None if d2t is None else len(d2t))
            if d2t is not None:
                models["mtp_head"]["draft_to_target"] = d2t.tolist()
            models["mtp_head"]["source"] = {"path": os.path.abspath(path), "sha256": sha256_path(path)}
            entry["model"] = "mtp_head"
        elif spec.kind in ("eagle", "eagle3"):
            from speccompile.compile.eagle import build_eagle
            entry |= build_eagle(spec, cfg, weights, graphs, models, max_seq_len, attention, fused, aux,
                                 draft_precision, progress)
        elif spec.kind == "medusa":
            from speccompile.compile.medusa import (build_medusa, int8_medusa, load_medusa, num_heads, share_target_head)
            target_head = target_w.get("lm_head", target_w["embed"])
            medusa_w = share_target_head(load_medusa(spec.arg, cfg), target_head)
            shared = {"final_norm": target_w["final_norm"]}
            shares_head = not any(k.endswith(".out") for k in medusa_w)
            if shares_head:
                progress("      medusa: every head's output matrix is the target's: one shared product")
            if draft_precision == "int8":
                progress("      quantize: the Medusa heads' matrices to int8 (speccompile.compile.int8)")
                medusa_w = int8_medusa(medusa_w)
            if shares_head:
                shared |= target_output_head(target_w, int8=draft_precision == "int8")
            weights["medusa.bin"] = medusa_w
            g = build_medusa(cfg, medusa_w | shared)
            graphs["medusa"] = (g, ["medusa.bin", "target.bin"])
            K = num_heads(weights["medusa.bin"])
            progress(f"      medusa: {K} heads from {spec.arg}")
            models["medusa"] = {"graph": "medusa.onnx", "weights": ["medusa.bin", "target.bin"], "kind": "medusa",
                                "config": cfg.to_dict(), "num_heads": K,
                                "source": {"path": os.path.abspath(spec.arg), "sha256": sha256_path(spec.arg)},
                                "inputs": [{"name": "hidden_in", "dtype": "float32", "shape": [1, cfg.hidden_size]}],
                                "outputs": [{"name": "logits", "dtype": "float32", "shape": [K, cfg.vocab_size]},
                                            {"name": "next_token", "dtype": "int64", "shape": [K]}]}
            entry["model"] = "medusa"
            entry["num_draft"] = min(entry["num_draft"], K)
        drafters.append(entry)
    if len({d["name"] for d in drafters}) != len(drafters):
        raise SpeccompileError("the same drafter is named twice")

    if toolchain:  # before anything is written: every graph needs a TensorRT form
        for name, (g, _) in graphs.items():
            trt_backend.check_lowerable(g.nodes, name)
    progress(f"[4/4] write: {out}")
    with atomic_bundle_dir(out, overwrite) as tmp:
        refs = {}
        for fname, w in weights.items():
            mb = sum(a.nbytes for a in w.values()) / 2**20
            progress(f"      {fname}: {len(w)} tensors, {mb:.1f} MiB")
            refs[fname] = write_weights(os.path.join(tmp, fname), w, fname)
        import onnx
        for name, (g, wfiles) in graphs.items():
            model = g.to_model({n: r for f in wfiles for n, r in refs[f].items()})
            if toolchain:  # the CPU runtime's copy of a plugin-lowered graph: the node's reference ops instead
                model = tree_attention.expand_plugin_nodes(model)
                if "attention" in models[name]:
                    models[name]["attention"] = "reference"
            onnx.save_model(model, os.path.join(tmp, f"{name}.onnx"))
            models[name]["initializers"] = sorted(g.weights)
        trt_info = trt_backend.write_engines(toolchain, tmp, graphs, refs, models,
                                             max((d["tree"]["size"] if d["tree"] else d["num_draft"]
                                                  for d in drafters), default=1) + 1,  # rows a verify pass takes
                                             progress) if toolchain else None
        os.makedirs(os.path.join(tmp, "tokenizer"))
        for fname, data in target.tokenizer_files.items():
            with open(os.path.join(tmp, "tokenizer", fname), "wb") as f:
                f.write(data)
        manifest = finalize_manifest(tmp, {
            "created_by": f"speccompile {__version__}",
            "source": target.source,
            "max_seq_len": max_seq_len,
            "models": models,
            "weights": {fname: {n: {k: r[k] for k in ("offset", "length", "dtype", "shape")} for n, r in rs.items()}
                        for fname, rs in refs.items()},
            "drafters": drafters,
            "tokenizer": {"dir": "tokenizer", "fingerprint": tokenizer_fingerprint(target.tokenizer_files)},
            "backend": backend,
            **({"tensorrt": trt_info} if toolchain else {}),
        })
    progress(f"done in {time.perf_counter() - t0:.1f}s: {len(models)} graph(s), drafters: "
             f"{', '.join(d['name'] for d in drafters) or 'none'}")
    return manifest


def _check_draft_compatible(target: Checkpoint, draft: Checkpoint) -> None:
    if tokenizer_fingerprint(target.tokenizer_files) != tokenizer_fingerprint(draft.tokenizer_files):
        raise TokenizerMismatchError("the draft model's tokenizer differs from the target's "
                                     "(speculation needs one shared vocabulary)")
    if draft.config.vocab_size > target.config.vocab_size:
        raise UnsupportedModelError(f"draft vocab {draft.config.vocab_size} exceeds target vocab "
                                    f"{target.config.vocab_size}")
