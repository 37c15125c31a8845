"""The frozen target model a head is distilled from: a plain Hugging Face directory (any other source, a GGUF or the
default, converted into one in --work), loaded with transformers."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from speccompile.compile.config import ModelConfig
from speccompile.compile.families import text_model_config, text_tensor_name
from speccompile.compile.hub_cache import looks_like_hub_id, resolve_hub_id
from speccompile.compile.sources import load_checkpoint, save_hf_dir, weight_files
from speccompile.errors import SpeccompileError
from speccompile.format.atomic import TEMP_PREFIX, replace_folder
from speccompile.train.progress import log


def target_hf_dir(source: str | None, work: str) -> str:
    """A plain HF directory for the target (converted once into `work` unless the source already is one)."""
    if source and looks_like_hub_id(source):  # a hub id: its snapshot in the local cache, as it is
        source = resolve_hub_id(source)
    if source and os.path.isdir(source) and os.path.isfile(os.path.join(source, "config.json")):
        return source
    d = os.path.join(work, "target_hf")
    name = os.path.abspath(source) if source and os.path.exists(source) else source or "default"  # one spelling
    record = os.path.join(d, "source.json")
    if os.path.isfile(os.path.join(d, "model.safetensors")):  # converted by an earlier run: of this target?
        try:
            with open(record) as f:
                earlier = json.load(f).get("source")
        except (OSError, ValueError, AttributeError):
            earlier = None
        if earlier != name:
            raise SpeccompileError(f"--work {work} holds the target {earlier or '(unrecorded)'}, not {name}: "
                                   "use another --work (its data and head are that target's)")
        return d
    log(f"converting target {name} -> {d}")
    os.makedirs(work, exist_ok=True)
    staged = tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=work)
    try:  # whole or not at all: a run stopped mid-conversion must not leave a folder later runs refuse
        save_hf_dir(load_checkpoint(source), staged)
        with open(os.path.join(staged, "source.json"), "w") as f:
            json.dump({"source": name}, f)
        replace_folder(staged, d)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return d


def target_identity(hf_dir: str) -> str:
    """The target's weights, hashed (sha256 over its weight files: sources.weight_files): what its features are
    tagged with, so that features of another target (another work dir's, or this one's from an earlier --target) are
    never trained on as this one's."""
    digest = hashlib.sha256()
    for path in weight_files(hf_dir):
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def load_tokenizer(hf_dir: str):
    return AutoTokenizer.from_pretrained(hf_dir)


def load_target(hf_dir: str, dtype: str = "float32"):
    """(tokenizer, frozen model in eval mode)."""
    tok = load_tokenizer(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=getattr(torch, dtype)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return tok, model


def target_config(hf_dir: str) -> dict:
    """config.json as its text model's (a multimodal checkpoint's text_config), with the values heads read filled
    in as the compiler reads them (head_dim, rope_theta: a config may leave the first implicit and spell the second
    inside rope_parameters)."""
    with open(os.path.join(hf_dir, "config.json")) as f:
        cfg = json.load(f)
    facts = ModelConfig.from_hf(cfg)
    return text_model_config(cfg) | {"head_dim": facts.head_dim, "rope_theta": facts.rope_theta}


def check_head_target(hf_dir: str, arch: str) -> None:
    """An MTP or EAGLE head's decoder layer starts as the target's last one and attends as a grouped-query layer:
    a target of multi-head latent attention (DeepSeek-V3) has no such layer to start from, or to match."""
    with open(os.path.join(hf_dir, "config.json")) as f:
        if ModelConfig.from_hf(json.load(f)).is_mla:
            raise SpeccompileError(f"train-head --arch {arch}: the target's layers use multi-head latent attention "
                                   "(DeepSeek-V3), which a trained head's layer does not; draft with its own MTP "
                                   "module (--draft mtp:CHECKPOINT_DIR), or train --arch medusa")


def target_tensors(hf_dir: str) -> dict:
    """The target's tensors (those of its weight files: sources.weight_files) as a Llama checkpoint names them,
    which is what heads are initialised from: fused qkv_proj / gate_up_proj (Phi-3) split, RMSNorm weights stored
    as (scale - offset) (Gemma's 1 + weight) made plain scales."""
    with open(os.path.join(hf_dir, "config.json")) as f:
        raw = json.load(f)
    tensors = {}
    for f in weight_files(hf_dir):
        tensors |= {text_tensor_name(raw, k): v for k, v in load_file(f).items() if text_tensor_name(raw, k)}
    cfg = ModelConfig.from_hf(raw)
    for name in list(tensors):
        if name.endswith("self_attn.qkv_proj.weight"):
            q, k, v = torch.split(tensors.pop(name), [cfg.q_size, cfg.kv_size, cfg.kv_size])
            tensors |= {name.replace("qkv_proj", x): t for x, t in (("q_proj", q), ("k_proj", k), ("v_proj", v))}
        elif name.endswith("mlp.gate_up_proj.weight"):
            gate, up = tensors.pop(name).chunk(2)
            tensors |= {name.replace("gate_up_proj", "gate_proj"): gate, name.replace("gate_up_proj", "up_proj"): up}
        elif name.endswith("norm.weight") and cfg.norm_offset:
            tensors[name] = tensors[name].float() + cfg.norm_offset
    return tensors | _first_expert_as_mlp(tensors)


def output_head(tensors: dict) -> torch.Tensor:
    """The target's output head (float32 [vocab, H]), which the runtime scores MTP, EAGLE-1 and Medusa heads with:
    its lm_head, or the embedding where the two are tied."""
    return tensors.get("lm_head.weight", tensors["model.embed_tokens.weight"]).float()


def _first_expert_as_mlp(tensors: dict) -> dict:
    """A mixture-of-experts target's (Mixtral's) first expert under the dense MLP's names: a head's block is
    dense, and starts from the target's last layer."""
    out = {}
    for name in tensors:
        stem = name.partition("block_sparse_moe.experts.")[0]
        if name.endswith("block_sparse_moe.experts.0.w1.weight"):
            out |= {stem + f"mlp.{n}.weight": tensors[stem + f"block_sparse_moe.experts.0.{w}.weight"]
                    for n, w in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2"))}
        elif name.endswith("block_sparse_moe.experts.gate_up_proj"):  # stacked [E, 2I, H], gate first
            gate, up = tensors[name][0].chunk(2)
            out |= {stem + "mlp.gate_proj.weight": gate, stem + "mlp.up_proj.weight": up,
                    stem + "mlp.down_proj.weight": tensors[stem + "block_sparse_moe.experts.down_proj"][0]}
    return out
