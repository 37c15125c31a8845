"""Tiny random checkpoints of each architecture, written by transformers' own model class, with config.json
rewritten as the family's hub checkpoints spell it (tests/test_models*.py)."""
import json
import os

import numpy as np

from speccompile.compile.presets import separate_logits, tiny_tokenizer_files

VOCAB = 384
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
               rms_norm_eps=1e-6)


def _hub_rope(theta, scaling=None, **extra):
    """config.json edits: the hub's rope_theta + rope_scaling in place of transformers' newer rope_parameters."""
    return {"rope_theta": theta, "rope_scaling": scaling, **extra}


# name -> (transformers config class, model class, config kwargs, hub spelling edits or None: keep transformers'
# own spelling (rope_parameters)). Windows of 16 and original contexts of 64 or less: the test prompts run past both.
CASES = {
    "llama3": ("LlamaConfig", "LlamaForCausalLM",
               dict(_COMMON, tie_word_embeddings=False, head_dim=16,
                    rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                         high_freq_factor=4.0, original_max_position_embeddings=64)),
               _hub_rope(500000.0, dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                        original_max_position_embeddings=64))),
    "llama3-tied": ("LlamaConfig", "LlamaForCausalLM",
                    dict(_COMMON, tie_word_embeddings=True,
                         rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=32.0,
                                              low_freq_factor=1.0, high_freq_factor=4.0,
                                              original_max_position_embeddings=64)),
                    None),
    "llama-linear": ("LlamaConfig", "LlamaForCausalLM",
                     dict(_COMMON, rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0)),
                     _hub_rope(10000.0, dict(type="linear", factor=4.0))),
    "mistral-window": ("MistralConfig", "MistralForCausalLM", dict(_COMMON, sliding_window=16, head_dim=16),
                       _hub_rope(10000.0)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM",
              dict(_COMMON, head_dim=32, tie_word_embeddings=True, use_sliding_window=True, sliding_window=16,
                   max_window_layers=1, max_position_embeddings=256,
                   rope_parameters=dict(rope_type="yarn", rope_theta=1e6, factor=8.0,
                                                             original_max_position_embeddings=32)),
              _hub_rope(1e6, dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=32))),
    "mixtral-window": ("MixtralConfig", "MixtralForCausalLM",
                       dict(_COMMON, head_dim=16, sliding_window=16, num_local_experts=4, num_experts_per_tok=2),
                       _hub_rope(1e6)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM",
             dict(_COMMON, hidden_size=128, num_attention_heads=4, num_key_value_heads=2, sliding_window=24,
                  pad_token_id=0, rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                       partial_rotary_factor=0.5)),
             _hub_rope(10000.0, None, partial_rotary_factor=0.5)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(_COMMON, num_hidden_layers=4, head_dim=16, sliding_window=16, query_pre_attn_scalar=24,
                    layer_types=["sliding_attention", "full_attention"] * 2, pad_token_id=0,
                    rope_parameters={"full_attention": dict(rope_type="linear", rope_theta=1e6, factor=2.0),
                                     "sliding_attention": dict(rope_type="default", rope_theta=10000.0)}),
               _hub_rope(1e6, dict(rope_type="linear", factor=2.0), rope_local_base_freq=10000.0,
                         sliding_window_pattern=2, layer_types=None)),
}


def write_checkpoint(name: str, path: str, seed: int = 0, **overrides):
    """Write CASES[name] as a Hugging Face directory (safetensors, hub-spelled config.json, a tiny tokenizer) and
    return the transformers model it came from, in eval mode. overrides: other config values (attention_bias...)."""
    import torch
    import transformers
    config_cls, model_cls, kwargs, hub = CASES[name]
    cfg = getattr(transformers, config_cls)(**kwargs, **overrides)
    torch.manual_seed(seed)
    model = separate_logits(getattr(transformers, model_cls)(cfg).eval())
    model.save_pretrained(path)
    for fname, data in tiny_tokenizer_files().items():
        if fname == "tokenizer_config.json":  # the tiny BPE, not the family's own tokenizer class (Gemma's wants <unk>)
            data = json.dumps(json.loads(data) | {"tokenizer_class": "PreTrainedTokenizerFast"}).encode()
        with open(os.path.join(path, fname), "wb") as f:
            f.write(data)
    if hub is not None:
        def to_hub(c):
            c.pop("rope_parameters", None)
            c.update(hub)
        edit_config(path, to_hub)
    return model


def edit_config(path: str, change) -> None:
    """Apply change(config dict) to path/config.json; keys it sets to None are removed, those the file already
    held as null stay (transformers reads null as null, a key left out as its default: DeepSeek's q_lora_rank)."""
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    null = {k for k, v in cfg.items() if v is None}
    change(cfg)
    cfg = {k: v for k, v in cfg.items() if v is not None or k in null}
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)


def reference_logits(model, ids) -> np.ndarray:
    import torch
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids))[None]).logits[0].float().numpy()


def reference_greedy(model, ids, n: int) -> list[int]:
    import torch
    with torch.no_grad():
        out = model.generate(torch.tensor(np.asarray(ids))[None], max_new_tokens=n, do_sample=False,
                             eos_token_id=2, pad_token_id=0)
    return out[0, len(ids):].tolist()


def write_gemma3_multimodal(path: str, seed: int = 0):
    """A Gemma 3 checkpoint as the hub's 4B+ ones are: Gemma3ForConditionalGeneration (a tiny vision tower beside
    the text model of CASES["gemma3"]), its text_config in the hub's spelling, the eos ids at the top level."""
    import torch
    import transformers
    text = transformers.Gemma3TextConfig(**CASES["gemma3"][2])
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=32, patch_size=8)
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                    image_token_index=5, boi_token_index=3, eoi_token_index=4)
    torch.manual_seed(seed)
    model = separate_logits(transformers.Gemma3ForConditionalGeneration(cfg).eval())
    model.save_pretrained(path)
    for fname, data in tiny_tokenizer_files().items():
        if fname == "tokenizer_config.json":
            data = json.dumps(json.loads(data) | {"tokenizer_class": "PreTrainedTokenizerFast"}).encode()
        with open(os.path.join(path, fname), "wb") as f:
            f.write(data)

    def to_hub(c):
        t = c["text_config"]
        t.pop("rope_parameters")
        t.pop("layer_types")
        t.update(CASES["gemma3"][3])
        c["text_config"] = {k: v for k, v in t.items() if v is not None}
        c["eos_token_id"] = [2, 1]
    edit_config(path, to_hub)
    return model
