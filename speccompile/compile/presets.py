"""Tiny random-weight checkpoints for tests: real configs of each architecture, a real (small) BPE tokenizer.

Nothing is downloaded: the tokenizer is trained here on a fixed text, the weights come from a seeded generator.
Weights are scaled so that logits are well separated: near-ties would make greedy comparisons meaningless.
"""
from __future__ import annotations

import dataclasses
import functools
import json

import numpy as np

from speccompile.compile.checkpoint import Checkpoint
from speccompile.compile.config import ModelConfig
from speccompile.compile.weights.decoder import expected_checkpoint_tensors
from speccompile.errors import CheckpointError

_CORPUS = """Speculative decoding makes a language model generate faster without changing what it generates.
A cheap drafter proposes several tokens, and the target verifies all of them in one forward pass.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)
Summarize the following article in three sentences. Translate this sentence into French.
What is the capital of France? The capital of France is Paris. 1 2 3 4 5 6 7 8 9 10
"""

_BASE = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
             max_position_embeddings=2048, tie_word_embeddings=False, qkv_bias=False)

PRESETS = {
    "llama": dict(_BASE, model_type="llama", tie_word_embeddings=True),
    "qwen2": dict(_BASE, model_type="qwen2", qkv_bias=True, rope_theta=1e6),
    "mistral": dict(_BASE, model_type="mistral", num_hidden_layers=3, sliding_window=4096),
    # A smaller model with the llama preset's tokenizer: a draft model for the tiny targets.
    "llama-draft": dict(_BASE, model_type="llama", num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True),
}


@functools.lru_cache(maxsize=None)
def tiny_tokenizer_files(vocab_size: int = 384) -> dict[str, bytes]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>",
                                                                         "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_CORPUS] * 4, trainer)
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    cfg = {"eos_token": "<|im_end|>", "bos_token": "<|im_start|>", "chat_template": template}
    return {"tokenizer.json": tok.to_str().encode(), "tokenizer_config.json": json.dumps(cfg).encode()}


def tiny_checkpoint(name: str, seed: int | None = None) -> Checkpoint:
    if name not in PRESETS:
        raise CheckpointError(f"unknown tiny preset {name!r}; choose from {', '.join(PRESETS)}")
    cfg = ModelConfig.from_dict(dict(PRESETS[name], eos_token_ids=(2,), bos_token_id=1))
    rng = np.random.default_rng(seed if seed is not None else sum(map(ord, name)))
    tensors = {}
    for tname, shape in expected_checkpoint_tensors(cfg).items():
        if tname.endswith("norm.weight"):
            tensors[tname] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        elif tname == "model.embed_tokens.weight" or tname == "lm_head.weight":
            tensors[tname] = rng.standard_normal(shape).astype(np.float32)
        else:
            fan_in = shape[-1] if len(shape) == 2 else shape[0]
            tensors[tname] = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
    return Checkpoint(cfg, tensors, tiny_tokenizer_files(), {"kind": "tiny", "path": f"tiny:{name}",
                                                             "sha256": f"seed-{seed}"})


def tiny_mtp_head(cfg: ModelConfig, seed: int = 0, repeat_last: bool = False) -> dict[str, np.ndarray]:
    """A random MTP head (mtp.* tensor names) for a tiny target: tests lower and decode with it.

    repeat_last: a head that predicts its input token again (its block adds nothing, eh_proj passes the token
    embedding through and the tied output head scores it highest), so it is often right on the repetitive
    output of a random tiny model, and tests see drafts accepted."""
    rng = np.random.default_rng(seed)
    H = cfg.hidden_size
    block = expected_checkpoint_tensors(dataclasses.replace(cfg, num_hidden_layers=1))
    out = {}
    for name, shape in block.items():
        if not name.startswith("model.layers.0."):
            continue
        new = "mtp.layer." + name[len("model.layers.0."):]
        out[new] = ((1.0 + 0.1 * rng.standard_normal(shape)) if name.endswith("norm.weight") else
                    rng.standard_normal(shape) / np.sqrt(shape[-1] if len(shape) == 2 else shape[0]))
    out |= {"mtp.enorm.weight": np.ones(H), "mtp.hnorm.weight": np.ones(H), "mtp.norm.weight": np.ones(H),
            "mtp.eh_proj.weight": rng.standard_normal((H, 2 * H)) / np.sqrt(2 * H)}
    if repeat_last:
        out["mtp.layer.self_attn.o_proj.weight"] = np.zeros_like(out["mtp.layer.self_attn.o_proj.weight"])
        out["mtp.layer.mlp.down_proj.weight"] = np.zeros_like(out["mtp.layer.mlp.down_proj.weight"])
        out["mtp.eh_proj.weight"] = np.concatenate([np.eye(H), np.zeros((H, H))], 1)
    return {k: np.asarray(v, np.float32) for k, v in out.items()}


def separate_logits(model):
    """Re-initialise a torch model's weights at the scale the tiny presets use (norms near 1, unit embeddings,
    1/sqrt(fan_in) matrices), so that logits and routing decisions are well separated rather than near-ties."""
    import torch
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif "embed" in name or "lm_head" in name:
                p.normal_(0, 1)
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model


def tiny_deepseek_checkpoint(path, q_lora_rank=None, seed=0, with_mtp=False, **overrides):
    """Write a tiny DeepSeek-V3 checkpoint (HF directory) with transformers, and return the torch model: 3 layers
    (1 dense, 2 MoE with 8 experts in 4 groups), MLA with a 32-dim latent; weights scaled so logits and routing
    decisions are well separated; overrides: any config values (rope_parameters, n_group, ...). with_mtp adds an MTP
    module (layer num_hidden_layers, DeepSeek names) built to repeat its input token, so drafts get accepted on a
    random model's repetitive output."""
    import os

    import torch
    import transformers
    cfg = transformers.DeepseekV3Config(**{
        "vocab_size": 384, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4, "n_shared_experts": 1,
        "n_routed_experts": 8, "routed_scaling_factor": 2.5, "kv_lora_rank": 32, "q_lora_rank": q_lora_rank,
        "qk_rope_head_dim": 16, "v_head_dim": 16, "qk_nope_head_dim": 16, "n_group": 4, "topk_group": 2,
        "num_experts_per_tok": 2, "first_k_dense_replace": 1, "max_position_embeddings": 2048, "bos_token_id": 1,
        "eos_token_id": 2, **overrides})
    torch.manual_seed(seed)
    model = separate_logits(transformers.DeepseekV3ForCausalLM(cfg).eval())
    with torch.no_grad():
        for mod in model.modules():
            if hasattr(mod, "e_score_correction_bias"):
                mod.e_score_correction_bias.copy_(0.1 * torch.randn_like(mod.e_score_correction_bias))
    model.save_pretrained(path)
    for name, data in tiny_tokenizer_files().items():
        with open(os.path.join(path, name), "wb") as f:
            f.write(data)
    if with_mtp:  # the MTP module as DeepSeek-V3 stores it: layer num_hidden_layers, an MoE block that repeats
        L, H = cfg.num_hidden_layers, cfg.hidden_size  # its input token (see presets.tiny_mtp_head)
        sd = {k: v.numpy() for k, v in model.state_dict().items()}
        mtp = {}
        from safetensors import safe_open
        with safe_open(os.path.join(path, "model.safetensors"), "np") as f:
            for k in f.keys():
                if k.startswith(f"model.layers.{L - 1}."):
                    mtp[k.replace(f"layers.{L - 1}.", f"layers.{L}.")] = f.get_tensor(k)
        p = f"model.layers.{L}."
        mtp[p + "self_attn.o_proj.weight"] = np.zeros_like(mtp[p + "self_attn.o_proj.weight"])
        for k in list(mtp):
            if k.endswith("down_proj.weight"):
                mtp[k] = np.zeros_like(mtp[k])
        mtp[p + "enorm.weight"] = np.ones(H, np.float32)
        mtp[p + "hnorm.weight"] = np.ones(H, np.float32)
        mtp[p + "eh_proj.weight"] = np.concatenate([np.eye(H), np.zeros((H, H))], 1).astype(np.float32)
        mtp[p + "shared_head.norm.weight"] = np.ones(H, np.float32)
        mtp[p + "shared_head.head.weight"] = sd["lm_head.weight"]
        _shard_with_index(path, mtp)
    return model


def _shard_with_index(path: str, extra: dict) -> None:
    """model.safetensors and `extra` as two shards under a model.safetensors.index.json, as DeepSeek-V3 ships its
    MTP layer: in the index beside the target's layers (a lone extra file beside model.safetensors is not read)."""
    import json
    import os

    from safetensors import safe_open
    from safetensors.numpy import save_file
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    os.rename(os.path.join(path, "model.safetensors"), os.path.join(path, first))
    save_file(extra, os.path.join(path, second))
    with safe_open(os.path.join(path, first), "np") as f:
        weight_map = {k: first for k in f.keys()} | {k: second for k in extra}
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
