"""RoPE variants and bad input: DeepSeek-V3 with YaRN (mscale, mscale_all_dim) against transformers past its original
context, with its MTP module drafting; the RoPE table against transformers' own inverse frequencies; --max-seq-len
fitted to a short-context model; an unknown RoPE type, a missing and a misshapen tensor, each one error line."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from speccompile.compile.config import ModelConfig  # noqa: E402
from speccompile.compile.driver import build_bundle  # noqa: E402
from speccompile.compile.presets import tiny_deepseek_checkpoint  # noqa: E402
from speccompile.compile.rope import rope_parameters, rope_tables  # noqa: E402
from speccompile.errors import UnsupportedModelError  # noqa: E402
from speccompile.format.bundle import read_manifest  # noqa: E402
from speccompile.runtime.engine import Engine  # noqa: E402

from conftest import assert_lossless, quiet, random_prompts  # noqa: E402
from models_util import edit_config, reference_logits, write_checkpoint  # noqa: E402
from test_errors import assert_cli_error, cli  # noqa: E402

YARN = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32, beta_fast=32, beta_slow=1,
            mscale=0.8, mscale_all_dim=0.6)


def _deepseek_hub_spelling(c):
    """DeepSeek-V3/R1's config.json: rope_scaling with "type", rope_theta beside it."""
    p = c.pop("rope_parameters")
    c["rope_theta"] = p.pop("rope_theta")
    c["rope_scaling"] = {"type": p.pop("rope_type"), **p}


def test_deepseek_yarn_matches_transformers_and_mtp_is_lossless(tmp_path):
    ck = str(tmp_path / "ck")
    model = tiny_deepseek_checkpoint(ck, with_mtp=True, max_position_embeddings=128,
                                     rope_parameters=dict(YARN, rope_theta=10000.0))
    edit_config(ck, _deepseek_hub_spelling)
    out = str(tmp_path / "b")
    build_bundle(ck, out, drafts=[f"mtp:{ck}"], progress=quiet)
    m = read_manifest(out)
    assert m["max_seq_len"] == 128  # the model's own context, under the default 2048
    _assert_yarn_logits_match(model, out)
    import speccompile
    g = speccompile.load(out, threads=1)
    assert max(assert_lossless(g, "mtp", random_prompts(3), 24)) > 1.0


def test_deepseek_yarn_expanded_cache_matches_transformers(tmp_path):
    """The expanded MLA cache (build_bundle's mla_cache="expanded") scales its softmax by YaRN's mscale^2 too:
    its own attention node, which no test with YaRN built."""
    ck = str(tmp_path / "ck")
    model = tiny_deepseek_checkpoint(ck, 24, max_position_embeddings=128,
                                     rope_parameters=dict(YARN, rope_theta=10000.0))
    edit_config(ck, _deepseek_hub_spelling)
    out = str(tmp_path / "b")
    build_bundle(ck, out, drafts=["none"], mla_cache="expanded", progress=quiet)
    _assert_yarn_logits_match(model, out)


def _assert_yarn_logits_match(model, out):
    """Logits past the original context (32) against transformers', prefilled then one token at a time."""
    eng = Engine(out, read_manifest(out)["models"]["target"], threads=1, max_rows=48)
    ids = np.random.default_rng(4).integers(3, 384, 60)
    ref = reference_logits(model, ids)
    logits, _ = eng.forward(ids[:48], rows=np.arange(48))
    assert np.abs(logits - ref[:48]).max() < 1e-4
    eng.cache.truncate(48)
    for t in range(48, 60):
        logits, _ = eng.forward(ids[t:t + 1])
        eng.cache.truncate(t + 1)
        assert np.abs(logits[0] - ref[t]).max() < 1e-4, t


@pytest.mark.parametrize("params", [
    dict(rope_type="linear", factor=3.0),
    dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
         original_max_position_embeddings=64),
    dict(YARN), dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=16, truncate=False),
    dict(rope_type="longrope", original_max_position_embeddings=256, short_factor=[1.0 + i / 8 for i in range(8)],
         long_factor=[2.0] * 8),
])
def test_rope_tables_match_transformers(params):
    """cos/sin (times the attention factor) against transformers' own RoPE module for the same config."""
    cfg = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16, max_position_embeddings=512,
                                   rope_parameters=dict(params, rope_theta=10000.0))
    rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(cfg)
    pos = torch.arange(200)[None]
    cos, sin = rotary(torch.zeros(1, 200, 16), pos)
    p = rope_parameters({"rope_parameters": dict(params, rope_theta=10000.0)})
    ours_cos, ours_sin = rope_tables(p, 16, 200, 512)
    assert ours_cos.shape == (201, 8)  # a row past max_seq_len for the fused attention's pad row
    ours_cos, ours_sin = ours_cos[:200], ours_sin[:200]
    assert np.abs(ours_cos - cos[0, :, :8].numpy()).max() < 2e-5
    assert np.abs(ours_sin - sin[0, :, :8].numpy()).max() < 2e-5


@pytest.mark.parametrize("params", [dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0),
                                    dict(rope_type="yarn", factor=4.0)])
@pytest.mark.parametrize("spelling", ["rope_parameters", "rope_scaling"])
def test_original_context_left_out_is_max_position_embeddings(params, spelling):
    """llama3 or YaRN parameters without original_max_position_embeddings: transformers takes the model's
    max_position_embeddings for it, and so does the table."""
    def hf():  # transformers' config fills the dict it is given in: each reader gets its own
        rope = dict(params, rope_theta=10000.0)
        return dict(hidden_size=64, num_attention_heads=4, head_dim=16, max_position_embeddings=256,
                    **({"rope_parameters": rope} if spelling == "rope_parameters" else
                       {"rope_scaling": rope, "rope_theta": rope.pop("rope_theta")}))
    rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(transformers.LlamaConfig(**hf()))
    cos, sin = rotary(torch.zeros(1, 300, 16), torch.arange(300)[None])
    p = rope_parameters(hf())
    assert p["original_max_position_embeddings"] == 256
    ours_cos, ours_sin = rope_tables(p, 16, 300, 256)
    assert np.abs(ours_cos[:300] - cos[0, :, :8].numpy()).max() < 2e-5
    assert np.abs(ours_sin[:300] - sin[0, :, :8].numpy()).max() < 2e-5


def test_longrope_beyond_its_original_context_is_refused(tmp_path):
    ck = str(tmp_path / "ck")
    write_checkpoint("llama-linear", ck)
    edit_config(ck, lambda c: c.update(rope_scaling={"type": "longrope", "short_factor": [1.0] * 8,
                                                     "long_factor": [2.0] * 8},
                                       original_max_position_embeddings=64))
    assert_cli_error(cli("build", ck, "--out", tmp_path / "b", "--draft", "none"), "longrope", "--max-seq-len 64")
    with pytest.raises(UnsupportedModelError, match="compile with max_seq_len=64 or less"):  # Python's spelling
        build_bundle(ck, str(tmp_path / "b"), drafts=["none"], max_seq_len=128, progress=quiet)
    build_bundle(ck, str(tmp_path / "b"), drafts=["none"], max_seq_len=64, progress=quiet)


@pytest.mark.parametrize("rope,words", [({"type": "dynamic", "factor": 2.0}, ["'dynamic'", "dynamic NTK"]),
                                        ({"rope_type": "ntk-by-parts", "factor": 2.0}, ["'ntk-by-parts'"])])
def test_unknown_rope_type_is_one_error_line(tmp_path, rope, words):
    ck = str(tmp_path / "ck")
    write_checkpoint("llama-linear", ck)
    edit_config(ck, lambda c: c.update(rope_scaling=rope))
    assert_cli_error(cli("build", ck, "--out", tmp_path / "b"), "unsupported RoPE type", *words)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("case,tensor", [("phi3", "model.layers.1.self_attn.qkv_proj.weight"),
                                         ("qwen3", "model.layers.0.self_attn.k_norm.weight"),
                                         ("gemma3", "model.layers.2.pre_feedforward_layernorm.weight")])
def test_missing_or_misshapen_tensor_is_one_error_line(tmp_path, case, tensor):
    from safetensors.numpy import load_file, save_file
    ck = tmp_path / "ck"
    write_checkpoint(case, str(ck))
    tensors = load_file(str(ck / "model.safetensors"))
    good = tensors.pop(tensor)
    save_file(tensors, str(ck / "model.safetensors"))
    assert_cli_error(cli("build", ck, "--out", tmp_path / "b"), "missing tensor", tensor)
    tensors[tensor] = good[..., :-1]
    save_file(tensors, str(ck / "model.safetensors"))
    assert_cli_error(cli("build", ck, "--out", tmp_path / "b"), tensor, "shape")


def test_hub_spellings_agree():
    """One model's config in the hub's spelling and in transformers' newer rope_parameters reads the same."""
    base = dict(model_type="llama", vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=4096)
    scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=1024)
    old = ModelConfig.from_hf(dict(base, rope_theta=500000.0, rope_scaling=dict(scaling, rope_type="llama3")))
    new = ModelConfig.from_hf(dict(base, rope_parameters=dict(scaling, rope_type="llama3", rope_theta=500000.0)))
    assert old == new and old.rope["rope_type"] == "llama3" and old.rope_theta == 500000.0
    json.dumps(old.to_dict())  # the manifest stores it
    assert ModelConfig.from_dict(old.to_dict()) == old


def test_gemma3_hub_config_leaves_defaults_out():
    """gemma-3-4b-it's config.json as published: the text model's values transformers defaults are left out
    (vocabulary, context, head_dim, window, activation), the eos ids at the top level, linear RoPE on global layers
    only."""
    hub = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "eos_token_id": [1, 106],
           "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                           "num_hidden_layers": 34, "num_attention_heads": 8, "num_key_value_heads": 4,
                           "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024},
           "vision_config": {"model_type": "siglip_vision_model"}}
    cfg = ModelConfig.from_hf(hub)
    assert (cfg.model_type, cfg.vocab_size, cfg.head_dim, cfg.max_position_embeddings) == ("gemma3_text", 262208,
                                                                                            256, 131072)
    assert cfg.eos_token_ids == (1, 106) and cfg.tie_word_embeddings and cfg.hidden_act == "gelu_tanh"
    assert cfg.rope == {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0}
    assert cfg.rope_local == {"rope_type": "default", "rope_theta": 10000.0}
    assert [cfg.is_sliding(i) for i in range(6)] == [True] * 5 + [False] and cfg.sliding_window == 1024
    assert cfg.attn_scale_factor == 1.0 and cfg.embed_scale == 2560 ** 0.5
