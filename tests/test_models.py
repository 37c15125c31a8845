"""Bring your own model: each architecture from a tiny random checkpoint that transformers' own model class wrote,
with config.json as the family's hub checkpoints spell it. Logits against transformers at every position of a
prompt longer than the RoPE variant's original context and the sliding window, greedy continuation token for token,
speculative output equal to autoregressive output (lookup, layer-skip, a tree)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from speccompile.compile.driver import build_bundle  # noqa: E402
from speccompile.errors import UnsupportedModelError  # noqa: E402
from speccompile.format.bundle import read_manifest  # noqa: E402
from speccompile.runtime.engine import Engine  # noqa: E402

from conftest import assert_lossless, quiet, random_prompts  # noqa: E402
from models_util import CASES, VOCAB, edit_config, reference_greedy, reference_logits, write_checkpoint  # noqa: E402

TOL = 1e-4
INT8_TOL = 2.0  # int8 rounding of these unit-scale logits; an o_proj bias dropped moves them far more
PROMPT_LEN, PREFILL = 80, 56  # past every case's original context (<= 64) and window (<= 24)


@pytest.fixture(scope="module", params=sorted(CASES))
def built(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    model = write_checkpoint(request.param, str(d / "ck"))
    out = str(d / "b")
    build_bundle(str(d / "ck"), out, drafts=["lookup", "layerskip:1"], max_seq_len=256, progress=quiet)
    return request.param, model, out


def test_logits_match_transformers_at_every_position(built):
    name, model, out = built
    m = read_manifest(out)
    eng = Engine(out, m["models"]["target"], threads=1, max_rows=PREFILL)
    ids = np.random.default_rng(7).integers(3, VOCAB, PROMPT_LEN)
    ref = reference_logits(model, ids)
    logits, _ = eng.forward(ids[:PREFILL], rows=np.arange(PREFILL))
    assert np.abs(logits - ref[:PREFILL]).max() < TOL, name
    eng.cache.truncate(PREFILL)
    for t in range(PREFILL, PROMPT_LEN):  # one token at a time over the cache: the window slides over committed rows
        logits, _ = eng.forward(ids[t:t + 1])
        eng.cache.truncate(t + 1)
        assert np.abs(logits[0] - ref[t]).max() < TOL, (name, t)


def test_greedy_continuation_equals_transformers(built):
    import speccompile
    name, model, out = built
    g = speccompile.load(out, threads=1)
    ids = [int(i) for i in np.random.default_rng(8).integers(3, VOCAB, 40)]
    ours = g.generate(ids, 24, speculate=False).token_ids
    theirs = reference_greedy(model, ids, 24)
    assert ours == theirs[:len(ours)] and len(ours) in (len(theirs), len(theirs) - 1), name  # theirs may end in EOS


@pytest.mark.parametrize("drafter,tree", [("lookup", None), ("layerskip:1", None), ("layerskip:1", "dynamic:6")])
def test_speculative_equals_autoregressive(built, drafter, tree):
    import speccompile
    g = speccompile.load(built[2], threads=1)
    assert_lossless(g, drafter, random_prompts(3, seed=1), 40, tree)


def test_gemma3_multimodal_checkpoint_builds_its_text_model(tmp_path):
    """Gemma 3's 4B+ checkpoints are Gemma3ForConditionalGeneration: the text model is read from text_config and
    the language_model.* tensors (the vision tower is left out), and matches the whole model on text."""
    from models_util import write_gemma3_multimodal
    model = write_gemma3_multimodal(str(tmp_path / "ck"))
    out = str(tmp_path / "b")
    build_bundle(str(tmp_path / "ck"), out, drafts=["lookup"], max_seq_len=128, progress=quiet)
    m = read_manifest(out)
    assert not any("vision" in n for n in m["weights"]["target.bin"])
    eng = Engine(out, m["models"]["target"], threads=1, max_rows=PROMPT_LEN)
    ids = np.random.default_rng(9).integers(6, VOCAB, PROMPT_LEN)
    logits, _ = eng.forward(ids, rows=np.arange(PROMPT_LEN))
    assert np.abs(logits - reference_logits(model, ids)).max() < TOL
    assert m["models"]["target"]["config"]["eos_token_ids"] == [2, 1]


@pytest.mark.parametrize("case", ["gemma3", "qwen3"])
def test_standard_ops_lowering_matches_transformers(tmp_path, case):
    """--attention reference (standard ONNX ops, what other runtimes and TensorRT read): the window, q/k norms and
    sandwich norms around it match transformers too."""
    model = write_checkpoint(case, str(tmp_path / "ck"))
    out = str(tmp_path / "b")
    build_bundle(str(tmp_path / "ck"), out, drafts=["none"], max_seq_len=128, attention="reference", progress=quiet)
    eng = Engine(out, read_manifest(out)["models"]["target"], threads=1, max_rows=PREFILL)
    ids = np.random.default_rng(7).integers(3, VOCAB, PROMPT_LEN)
    ref = reference_logits(model, ids)
    logits, _ = eng.forward(ids[:PREFILL], rows=np.arange(PREFILL))
    assert np.abs(logits - ref[:PREFILL]).max() < TOL
    eng.cache.truncate(PREFILL)
    for t in range(PREFILL, PROMPT_LEN):
        logits, _ = eng.forward(ids[t:t + 1])
        eng.cache.truncate(t + 1)
        assert np.abs(logits[0] - ref[t]).max() < TOL, t


def test_partial_rotary_needs_the_fused_kernel(tmp_path):
    from test_errors import assert_cli_error, cli
    write_checkpoint("phi3", str(tmp_path / "ck"))
    assert_cli_error(cli("build", tmp_path / "ck", "--out", tmp_path / "b", "--attention", "reference"),
                     "partial rotary", "--attention ort")
    with pytest.raises(UnsupportedModelError, match="lowered by attention='ort' only"):  # Python's spelling
        build_bundle(str(tmp_path / "ck"), str(tmp_path / "b"), attention="reference", fused=False, progress=quiet)


def _prefill_logits_diff(model, ck: str, out: str, **options) -> float:
    """Build ck (no drafter) and return the largest difference from transformers' logits over a prompt."""
    build_bundle(ck, out, drafts=["none"], max_seq_len=128, progress=quiet, **options)
    eng = Engine(out, read_manifest(out)["models"]["target"], threads=1, max_rows=PREFILL)
    ids = np.random.default_rng(7).integers(3, VOCAB, PREFILL)
    logits, _ = eng.forward(ids, rows=np.arange(PREFILL))
    return float(np.abs(logits - reference_logits(model, ids)[:PREFILL]).max())


@pytest.mark.parametrize("case", ["llama3", "qwen3", "gemma3"])
def test_attention_bias_matches_transformers(tmp_path, case):
    """attention_bias: true biases o_proj as well as q/k/v in these families' transformers classes."""
    model = write_checkpoint(case, str(tmp_path / "ck"), attention_bias=True)
    assert _prefill_logits_diff(model, str(tmp_path / "ck"), str(tmp_path / "b")) < TOL


@pytest.mark.parametrize("case", ["mistral-window", "mixtral-window", "phi3"])
def test_attention_bias_flag_is_ignored_where_transformers_ignores_it(tmp_path, case):
    """Mistral, Mixtral and Phi-3 attention has no biases whatever attention_bias says: no q_proj.bias is asked for."""
    model = write_checkpoint(case, str(tmp_path / "ck"))
    edit_config(str(tmp_path / "ck"), lambda c: c.update(attention_bias=True))
    assert _prefill_logits_diff(model, str(tmp_path / "ck"), str(tmp_path / "b")) < TOL


def test_o_proj_bias_in_a_quantized_build(tmp_path):
    """--weights int8: o_proj's bias is added after the packed product too (int8 rounding alone stays far below
    the bias's effect)."""
    model = write_checkpoint("llama3", str(tmp_path / "ck"), attention_bias=True)
    assert _prefill_logits_diff(model, str(tmp_path / "ck"), str(tmp_path / "b"), weights="int8") < INT8_TOL


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "mistral", "mixtral", "phi3", "gemma3_text",
                                        "deepseek_v3"])
def test_missing_fields_take_transformers_defaults(model_type):
    """A config.json that leaves a value out means what transformers' config class reads it as, family by family
    (Mixtral's rope_theta and rms_norm_eps, Qwen3's head_dim, DeepSeek-V3's rope_interleave and expert counts)."""
    from speccompile.compile.config import MLA_MOE_FIELDS, ModelConfig
    from speccompile.compile.families import ACTIVATIONS
    sizes = dict(vocab_size=384, hidden_size=256, intermediate_size=512, num_hidden_layers=30, num_attention_heads=32,
                 **({"use_sliding_window": True} if model_type.startswith("qwen") else {}))
    ours = ModelConfig.from_hf(dict(sizes, model_type=model_type))
    theirs = transformers.AutoConfig.for_model(model_type, **sizes)
    rope = theirs.rope_parameters
    assert ours.rope_theta == rope.get("full_attention", rope)["rope_theta"]
    if "sliding_attention" in rope:
        assert ours.rope_local["rope_theta"] == rope["sliding_attention"]["rope_theta"]
    act = getattr(theirs, "hidden_activation", None) or theirs.hidden_act
    assert (ours.rms_norm_eps, ours.max_position_embeddings, ours.tie_word_embeddings, ours.hidden_act) == (
        theirs.rms_norm_eps, theirs.max_position_embeddings, theirs.tie_word_embeddings, ACTIVATIONS[act])
    window = getattr(theirs, "sliding_window", None)
    types = getattr(theirs, "layer_types", None) or ["sliding_attention" if window else "full_attention"] * 30
    assert [ours.is_sliding(i) for i in range(30)] == [t == "sliding_attention" for t in types]
    assert ours.sliding_window == (window if "sliding_attention" in types else None)
    if model_type == "deepseek_v3":
        lowered = [k for k in MLA_MOE_FIELDS if k != "num_nextn_predict_layers"]  # that one only describes files
        assert {k: getattr(ours, k) for k in lowered} == {k: getattr(theirs, k) for k in lowered}
        return
    head_dim = getattr(theirs, "head_dim", None) or theirs.hidden_size // theirs.num_attention_heads
    assert (ours.head_dim, ours.num_key_value_heads) == (head_dim, theirs.num_key_value_heads)
    if model_type == "mixtral":
        assert (ours.n_routed_experts, ours.num_experts_per_tok) == (theirs.num_local_experts,
                                                                    theirs.num_experts_per_tok)


def test_generation_config_end_of_sequence_ids(tmp_path):
    """Instruct checkpoints list end-of-turn ids in generation_config.json only: the bundle stops at them as
    transformers' generate does."""
    import json

    import speccompile
    ck = str(tmp_path / "ck")
    model = write_checkpoint("llama3", ck)
    prompt = [int(i) for i in np.random.default_rng(8).integers(3, VOCAB, 12)]
    stop = reference_greedy(model, prompt, 8)[3]
    with open(f"{ck}/generation_config.json", "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": [2, stop]}, f)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(ck).eval()
    with torch.no_grad():
        expected = theirs.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt):]
    build_bundle(ck, str(tmp_path / "b"), drafts=["lookup"], max_seq_len=128, progress=quiet)
    assert read_manifest(str(tmp_path / "b"))["models"]["target"]["config"]["eos_token_ids"] == [2, stop]
    ours = speccompile.load(str(tmp_path / "b"), threads=1).generate(prompt, 8).token_ids
    assert ours == expected.tolist() and ours[-1] == stop
