"""GGUF read without torch (speccompile.compile.gguf, gguf_tokenizer) against transformers' GGUF loader, a build
in a process where torch and transformers cannot be imported, and GGUF's quantized blocks as onnxruntime's
MatMulNBits (speccompile.compile.quantize.nbits) against gguf's own dequantization."""
import dataclasses
import json
import math
import os
import re
import subprocess
import sys

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from speccompile.compile.gguf import read_gguf, unpermute_rope_rows
from speccompile.compile.quantize.nbits import emit_nbits_matmul, pack_gguf_matrix
from speccompile.compile.sources import default_model_path, load_checkpoint
from speccompile.errors import CheckpointError, ConfigError, UnsupportedModelError
from speccompile.graphs.builder import GraphBuilder
from speccompile.runtime.tokenizer import BundleTokenizer

try:
    DEFAULT_GGUF, NO_MODEL = default_model_path(), ""
except CheckpointError as e:
    DEFAULT_GGUF, NO_MODEL = None, f"default model unavailable: {e}"
needs_model = pytest.mark.skipif(DEFAULT_GGUF is None, reason=NO_MODEL)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tokenizer_strings(n_random=300, seed=0) -> list[str]:
    """Spec-Bench prompts, their chat-template renderings, and random text mixing scripts, digits, whitespace,
    punctuation and the model's special tokens."""
    with open(os.path.join(REPO, "speccompile", "data", "bench_prompts.jsonl")) as f:
        prompts = [turn for line in f for turn in json.loads(line)["turns"]]
    pieces = ["hello", " world", "  ", "\n", "\n\n", "\t", "123", "4567", "3.14", "don't", "I'm", "you'll",
              "ÄÖÜ", "éàç", "日本語", "中文", "😀", "🚀🚀", "<|im_start|>", "<|im_end|>", "<|endoftext|>",
              "def f(x):", "    return x", "{}", "[]", "!?", "--", "...", "ß", "Ωμέγα", "кириллица", "  leading",
              "trailing  "]
    rng = np.random.default_rng(seed)
    random = ["".join(rng.choice(pieces, rng.integers(1, 12))) for _ in range(n_random)]
    return prompts + random


def test_unpermute_inverts_llama_cpp_permute():
    """convert_hf_to_gguf.py's permute, inverted: rows interleaved per head come back as two halves."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3 * 8, 5)).astype(np.float32)
    n_head = 3
    permuted = w.reshape(n_head, 2, w.shape[0] // n_head // 2, 5).swapaxes(1, 2).reshape(w.shape)  # llama.cpp
    assert np.array_equal(unpermute_rope_rows(permuted, n_head), w)


@needs_model
@pytest.mark.slow
def test_default_config_and_tokenizer_match_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    d, name = os.path.split(DEFAULT_GGUF)
    config, _, files = read_gguf(DEFAULT_GGUF)
    hf = transformers.AutoConfig.from_pretrained(d, gguf_file=name).to_dict()
    from speccompile.compile.config import ModelConfig
    expected = ModelConfig.from_hf(hf)
    assert dataclasses.replace(config, eos_token_ids=expected.eos_token_ids) == expected
    # generation also ends at <|endoftext|> (id 0), an end-of-turn token llama.cpp knows by its text
    assert config.eos_token_ids == (*expected.eos_token_ids, 0)
    for fname, data in files.items():
        (tmp_path / fname).write_bytes(data)
    ours = BundleTokenizer(str(tmp_path))
    ref = transformers.AutoTokenizer.from_pretrained(d, gguf_file=name)
    strings = tokenizer_strings()
    chats = [ours.apply_chat_template([{"role": "user", "content": s}]) for s in strings[:50]]
    assert chats[0] == ref.apply_chat_template([{"role": "user", "content": strings[0]}], tokenize=False,
                                               add_generation_prompt=True)
    prompts = tokenizer_strings(n_random=0)
    prompts = set(prompts + chats[:len(prompts)])
    for s in strings + chats:
        ids = ours.encode(s)
        # transformers splits "smollm" text as GPT-2 (we split as llama.cpp: test_default_gguf_tokenizes_as_llama_cpp);
        # the two agree on text where no run of spaces meets a digit, as in these prompts
        if s in prompts:
            assert ids == ref.encode(s, add_special_tokens=False), s
            assert ours.encode(s, add_special_tokens=True) == ref.encode(s, add_special_tokens=True), s
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), s
    assert ours.eos_token_ids == {ref.eos_token_id} and ours.bos_token == ref.bos_token


@needs_model
@pytest.mark.slow
def test_default_tensors_bitwise_equal_transformers():
    """Every tensor bitwise equal to transformers' dequantized, unpermuted state dict (both use gguf's
    dequantization; the permutation only moves rows)."""
    transformers = pytest.importorskip("transformers")
    d, name = os.path.split(DEFAULT_GGUF)
    ours = load_checkpoint(DEFAULT_GGUF, progress=lambda *_: None).tensors
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype="float32")
    ref = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    assert set(ours) == set(ref)
    for k, v in ref.items():
        assert ours[k].dtype == np.float32 and np.array_equal(ours[k].view(np.uint32), v.view(np.uint32)), k


NO_TORCH = "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"


def test_build_without_torch_or_transformers(tmp_path):
    """`speccompile build` from a tiny preset, a safetensors directory and a quantized GGUF, and loading the
    default GGUF, in a process where importing torch or transformers fails."""
    write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    script = NO_TORCH + f"""
from speccompile.cli import main
from speccompile.compile.presets import tiny_checkpoint
from speccompile.compile.sources import save_hf_dir, load_checkpoint, default_model_path
from speccompile.errors import CheckpointError
save_hf_dir(tiny_checkpoint("llama"), {str(tmp_path / "hf")!r})
for source, out in (("tiny:llama", "preset"), ("hf", "hf-bundle"), ("tiny.gguf", "gguf-bundle")):
    source = source if source.startswith("tiny:") else {str(tmp_path)!r} + "/" + source
    main(["build", source, "--out", {str(tmp_path)!r} + "/" + out, "--draft", "lookup", "--max-seq-len", "128"],
         standalone_mode=False)
try:
    path = default_model_path()
except CheckpointError:
    path = None
if path:
    print("default gguf tensors", len(load_checkpoint(path, progress=lambda *_: None).tensors))
print("torch imported:", sys.modules.get("torch") is not None, sys.modules.get("transformers") is not None)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "torch imported: False False" in out.stdout
    for bundle in ("preset", "hf-bundle", "gguf-bundle"):
        assert (tmp_path / bundle / "manifest.json").exists(), bundle
    if DEFAULT_GGUF:
        assert "default gguf tensors 273" in out.stdout


def test_bfloat16_safetensors_widen_exactly(tmp_path):
    """numpy has no bfloat16: read_safetensors widens its bits itself, equal to torch's .float()."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file
    from speccompile.compile.safetensors_files import read_safetensors
    ref = {"b": torch.randn(4, 6).bfloat16(), "a": torch.randn(3), "h": torch.randn(5).half()}
    path = str(tmp_path / "w.safetensors")
    save_file(ref, path)
    got = read_safetensors(path)
    for k, v in ref.items():
        assert got[k].dtype == np.float32 and np.array_equal(got[k], v.float().numpy()), k


def write_gguf(path, arch="llama", tokenizer_model="gpt2", tokens=("a", "b", "c"), tensors=None, floats=None,
               **token_metadata):
    """A one-layer GGUF with the given tokenizer metadata (token_metadata: scores, token_types, bos_token_id ...),
    float keys by their full names and tensors besides the embedding."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model(tokenizer_model)
    w.add_token_list(list(tokens))
    for key, value in token_metadata.items():
        getattr(w, f"add_{key}")(value)
    for key, value in (floats or {}).items():
        w.add_float32(key, value)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
    for name, value in (tensors or {}).items():
        w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def sentencepiece_vocab(text: str):
    """A Llama-2-style vocabulary: <unk> <s> </s>, the 256 byte pieces, then "▁"-spelled pieces of `text` scored
    by frequency (so merges must be derived from scores, as for files without merges)."""
    from collections import Counter
    spelled = "▁" + text.replace(" ", "▁")
    counts = Counter(spelled[i:i + n] for n in (1, 2, 3, 4) for i in range(len(spelled) - n + 1))
    pieces = [p for p, _ in counts.most_common(400)]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    return tokens, types, scores


def sentencepiece_gguf(tmp_path, corpus: str, space_prefix: bool):
    """A GGUF of sentencepiece_vocab(corpus) plus an added "<|user|>" and a control "<tool>" token, alone in its
    folder (llama.cpp reads it there), and our tokenizer made from it; space_prefix None: no add_space_prefix key."""
    tokens, types, scores = sentencepiece_vocab(corpus)
    f = tmp_path / "gguf" / "sp.gguf"
    f.parent.mkdir()
    write_gguf(f, tokenizer_model="llama", tokens=tokens + ["<|user|>", "<tool>"], token_types=types + [4, 3],
               token_scores=scores + [0.0, 0.0], bos_token_id=1, eos_token_id=2, unk_token_id=0,
               rope_dimension_count=4, **({} if space_prefix is None else {"add_space_prefix": space_prefix}))
    for fname, data in read_gguf(str(f))[2].items():
        (tmp_path / fname).write_bytes(data)
    return f, BundleTokenizer(str(tmp_path))


@pytest.mark.parametrize("space_prefix", [True, False, None])
def test_sentencepiece_gguf_tokenizer_matches_llama_cpp(tmp_path, space_prefix):
    """A Llama-2-style vocabulary (merges from scores, byte fallback) with an added and a control token, against
    llama.cpp's own tokenizer (the GGUF alone in its folder): a "▁" before the text and before the text after each
    special or added token ("<s>[INST]"), also where the text begins with a space; decoding gives the text back."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python, the reference tokenizer, not installed")
    f, ours = sentencepiece_gguf(tmp_path, " ".join(tokenizer_strings(n_random=0)), space_prefix)
    ref = llama_cpp.Llama(model_path=str(f), vocab_only=True, verbose=False)
    specials = ["<s>[INST] hi [/INST]", "<s>hi</s>", "<|user|>\nhi</s><|user|> x", "<tool> y<tool>z"]
    for s in tokenizer_strings(n_random=200, seed=3) + [" lead", "  two  spaces", " ", "\n\nx"] + specials:
        ids = ours.encode(s)
        assert ids == ref.tokenize(s.encode(), add_bos=False, special=True), s
        assert ours.encode(s, add_special_tokens=True) == ref.tokenize(s.encode(), add_bos=True, special=True), s
        assert s in specials or ours.decode(ids) == s


# ids llama.cpp (llama-cpp-python 0.3.36, vocab_only) gave for these strings over sentencepiece_vocab(GOLDEN_CORPUS)
# plus an added "<|user|>" (371) and a control "<tool>" (372): the check that runs without llama-cpp-python
GOLDEN_CORPUS = "hi [INST] lead two spaces x y z"
GOLDEN_IDS = {
    True: {"<s>[INST] hi [/INST]": [1, 345, 319, 281, 314, 50, 286, 319], " lead": [259, 291, 324],
           "  two  spaces": [259, 259, 296, 329, 361, 335], "\n\nx": [259, 13, 13, 278],
           "<|user|>\nhi</s><|user|> x": [371, 259, 13, 282, 2, 371, 259, 307],
           "<tool> y<tool>z": [372, 259, 309, 372, 311]},
    False: {"<s>[INST] hi [/INST]": [1, 346, 289, 281, 314, 50, 286, 319], " lead": [291, 324],
            "  two  spaces": [259, 296, 329, 361, 335], "\n\nx": [13, 13, 278],
            "<|user|>\nhi</s><|user|> x": [371, 13, 282, 2, 371, 307], "<tool> y<tool>z": [372, 309, 372, 280]},
}


@pytest.mark.parametrize("space_prefix", [True, False, None])
def test_sentencepiece_gguf_tokenizer_gives_llama_cpps_ids(tmp_path, space_prefix):
    """The spaces llama.cpp puts before text and after special and added tokens, as ids it gave (GOLDEN_IDS); a
    file without add_space_prefix gets them as one that says true (llama.cpp's default)."""
    _, tok = sentencepiece_gguf(tmp_path, GOLDEN_CORPUS, space_prefix)
    golden = GOLDEN_IDS[space_prefix is not False]
    assert {s: tok.encode(s) for s in golden} == golden


HF_TO_GGUF = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
              "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def gguf_name(hf_name: str) -> str:
    stem, suffix = hf_name.rsplit(".", 1)
    if stem in HF_TO_GGUF:
        return f"{HF_TO_GGUF[stem]}.{suffix}"
    _, _, layer, rest = stem.split(".", 3)
    return f"blk.{layer}.{HF_TO_GGUF[rest]}.{suffix}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_llama_gguf(path, qtypes=(Q.Q8_0, Q.Q4_1, Q.Q4_0), split_max_tensors=0, ckpt=None, name="tiny llama",
                          extra_tensors=None, arch="llama", **metadata):
    """The tiny:llama preset (or `ckpt`, a llama-block checkpoint) as llama.cpp would convert it: q/k rows (and
    biases) permuted, matrices quantized in turn with `qtypes` (none: float32), a byte-level vocabulary without
    merges; extra_tensors: written first, as they are (rope_freqs.weight); metadata: more keys, by GGUFWriter's
    add_<key> method. split_max_tensors: split into shards of that many tensors, as gguf-split does
    (path-0000i-of-0000n.gguf); arch: the file's architecture (q/k rows are permuted for "llama" only, as
    convert_hf_to_gguf.py permutes them)."""
    from speccompile.compile.presets import tiny_checkpoint
    ckpt = ckpt or tiny_checkpoint("llama")
    cfg = ckpt.config
    w = gguf.GGUFWriter(str(path), arch, split_max_tensors=split_max_tensors)
    w.add_name(name)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([chr(0x100 + i) if i >= 3 else f"<|{i}|>" for i in range(cfg.vocab_size)])
    w.add_token_types([3, 3, 3] + [1] * (cfg.vocab_size - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for key, value in metadata.items():
        getattr(w, f"add_{key}")(value)
    for name, t in (extra_tensors or {}).items():
        w.add_tensor(name, t)
    i = 0
    for name, t in ckpt.tensors.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        t = np.asarray(t, np.float32)
        if arch == "llama" and re.search(r"[qk]_proj\.(weight|bias)$", name):
            heads = cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads
            t = llama_cpp_permute(t, heads)
        if t.ndim == 2 and qtypes:
            qtype, i = qtypes[i % len(qtypes)], i + 1
            w.add_tensor(gguf_name(name), gguf.quants.quantize(t, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name(name), t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return ckpt


def test_tiny_gguf_matches_transformers(tmp_path):
    """A tiny GQA llama GGUF (Q8_0/Q4_1/Q4_0): config equal and every tensor bitwise equal to transformers'
    loader; the q/k permutation is undone (the values match the preset's within the quantization's error)."""
    transformers = pytest.importorskip("transformers")
    ckpt = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    ours = load_checkpoint(str(tmp_path / "tiny.gguf"), progress=lambda *_: None)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf", dtype="float32")
    from speccompile.compile.config import ModelConfig
    assert ours.config == ModelConfig.from_hf(model.config.to_dict())
    ref = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    assert set(ours.tensors) == set(ref)
    for k, v in ref.items():
        assert np.array_equal(ours.tensors[k].view(np.uint32), v.view(np.uint32)), k
        source = ckpt.tensors.get(k, ckpt.tensors["model.embed_tokens.weight"])  # lm_head: tied
        assert np.abs(ours.tensors[k] - source).max() <= 0.15 * np.abs(source).max(), k  # unpermuted, not scrambled


def gguf_bundle_logits(path: str, out: str, ids: np.ndarray) -> np.ndarray:
    """The logits a float32 bundle built from the GGUF `path` computes for `ids`."""
    from speccompile.compile.driver import build_bundle
    from speccompile.format.bundle import read_manifest
    from speccompile.runtime.engine import Engine
    build_bundle(path, out, drafts=["lookup"], max_seq_len=64, weights="float32", progress=lambda *_: None)
    eng = Engine(out, read_manifest(out)["models"]["target"], threads=1)
    return eng.forward(ids, rows=np.arange(len(ids)))[0]


def biased_llama(seed=0, mlp=False):
    """The tiny:llama preset with random q/k/v/o biases (a Hugging Face llama with attention_bias: true), and an
    up_proj bias if `mlp`."""
    from speccompile.compile.presets import tiny_checkpoint
    ckpt = tiny_checkpoint("llama")
    cfg = dataclasses.replace(ckpt.config, qkv_bias=True, o_bias=True)
    rng, tensors = np.random.default_rng(seed), dict(ckpt.tensors)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        for proj, n in (("q", cfg.q_size), ("k", cfg.kv_size), ("v", cfg.kv_size), ("o", cfg.hidden_size)):
            tensors[f"{p}self_attn.{proj}_proj.bias"] = rng.standard_normal(n).astype(np.float32)
        if mlp:
            tensors[f"{p}mlp.up_proj.bias"] = rng.standard_normal(cfg.intermediate_size).astype(np.float32)
    return dataclasses.replace(ckpt, config=cfg, tensors=tensors)


def test_llama_gguf_biases_are_added_as_llama_cpp_adds_them(tmp_path):
    """q/k/v/o biases in a "llama" GGUF (convert_hf_to_gguf writes those of attention_bias: true, q/k permuted)
    are optional tensors llama.cpp adds: the bundle computes the Hugging Face model's logits (they were dropped, as
    transformers' GGUF loader drops them); MLP biases are refused, not dropped."""
    transformers = pytest.importorskip("transformers")
    from models_util import reference_logits
    from speccompile.compile.sources import save_hf_dir
    ckpt = biased_llama()
    write_tiny_llama_gguf(tmp_path / "b.gguf", qtypes=(Q.F32,), ckpt=ckpt)
    save_hf_dir(ckpt, str(tmp_path / "hf"))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype="float32")
    ids = np.random.default_rng(0).integers(3, 384, 32)
    ref = reference_logits(model, ids)
    logits = gguf_bundle_logits(str(tmp_path / "b.gguf"), str(tmp_path / "bundle"), ids)
    assert np.abs(logits - ref).max() < 1e-4 * np.abs(ref).max()
    write_tiny_llama_gguf(tmp_path / "mlp.gguf", qtypes=(Q.F32,), ckpt=biased_llama(mlp=True))
    with pytest.raises(UnsupportedModelError, match=r"mlp\.gguf: GGUF with MLP biases"):
        read_gguf(str(tmp_path / "mlp.gguf"))



def test_qwen2_gguf_computes_the_hugging_face_models_logits(tmp_path):
    """A Qwen2 GGUF as convert_hf_to_gguf.py writes it (q/k rows as they are: llama.cpp rotates Qwen2 in the
    half-split order transformers uses, so nothing is permuted; q/k/v biases): the bundle computes the Hugging Face
    model's logits."""
    transformers = pytest.importorskip("transformers")
    from models_util import reference_logits
    from speccompile.compile.sources import save_hf_dir
    llama = biased_llama()
    tensors = {k: v for k, v in llama.tensors.items() if not k.endswith("o_proj.bias")}
    ckpt = dataclasses.replace(llama, tensors=tensors,
                               config=dataclasses.replace(llama.config, model_type="qwen2", o_bias=False))
    write_tiny_llama_gguf(tmp_path / "q.gguf", qtypes=(Q.F32,), ckpt=ckpt, arch="qwen2")
    save_hf_dir(ckpt, str(tmp_path / "hf"))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype="float32")
    assert type(model).__name__ == "Qwen2ForCausalLM"
    ids = np.random.default_rng(0).integers(3, 384, 32)
    ref = reference_logits(model, ids)
    logits = gguf_bundle_logits(str(tmp_path / "q.gguf"), str(tmp_path / "bundle"), ids)
    assert np.abs(logits - ref).max() < 1e-4 * np.abs(ref).max()

def test_llama_gguf_with_some_attention_biases_adds_the_ones_it_holds(tmp_path):
    """llama.cpp adds each optional attention bias a file holds: a file with q biases only, and o biases in one
    layer, computes the Hugging Face model whose other biases are zeros (it was refused for the missing ones)."""
    transformers = pytest.importorskip("transformers")
    from models_util import reference_logits
    from speccompile.compile.sources import save_hf_dir
    ckpt = biased_llama(seed=1)
    held = {k: v for k, v in ckpt.tensors.items()
            if not re.search(r"[kv]_proj\.bias$", k) and not k.endswith("layers.1.self_attn.o_proj.bias")}
    write_tiny_llama_gguf(tmp_path / "b.gguf", qtypes=(Q.F32,), ckpt=dataclasses.replace(ckpt, tensors=held))
    zeros = {k: (v if k in held else np.zeros_like(v)) for k, v in ckpt.tensors.items()}
    save_hf_dir(dataclasses.replace(ckpt, tensors=zeros), str(tmp_path / "hf"))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype="float32")
    ids = np.random.default_rng(1).integers(3, 384, 24)
    ref = reference_logits(model, ids)
    logits = gguf_bundle_logits(str(tmp_path / "b.gguf"), str(tmp_path / "bundle"), ids)
    assert np.abs(logits - ref).max() < 1e-4 * np.abs(ref).max()


def test_bench_compares_transformers_on_the_model_we_compile_from_a_gguf(tmp_path):
    """bench --compare-transformers on a llama GGUF with attention biases: transformers' GGUF loader drops them
    (another model), so bench hands transformers our reading of the file, whose logits are the bundle's."""
    pytest.importorskip("transformers")
    from models_util import reference_logits
    from speccompile.bench.peers import load_hf_model
    path = str(tmp_path / "b.gguf")
    write_tiny_llama_gguf(path, qtypes=(Q.F32,), ckpt=biased_llama(seed=2))
    ids = np.random.default_rng(2).integers(3, 384, 16)
    model = load_hf_model({"kind": "gguf", "path": path}, str(tmp_path / "work"))
    ours = gguf_bundle_logits(path, str(tmp_path / "bundle"), ids)
    assert np.abs(reference_logits(model, ids) - ours).max() < 1e-4 * np.abs(ours).max()
    plain = str(tmp_path / "plain.gguf")  # nothing dropped: transformers reads the file itself
    write_tiny_llama_gguf(plain, qtypes=(Q.F32,))
    assert load_hf_model({"kind": "gguf", "path": plain}, str(tmp_path / "work")).config.name_or_path == str(tmp_path)


def test_mistral_gguf_reads_no_sliding_window(tmp_path):
    """A "llama" GGUF named as convert_hf_to_gguf names Mistral's (general.name "Mistral 7B Instruct v0.3") states no
    window: it attends over the whole context, as llama.cpp runs it and transformers reads it (as llama); it slid
    attention over 4096 tokens, the default of transformers' Mistral config."""
    transformers = pytest.importorskip("transformers")
    from speccompile.compile.config import ModelConfig
    write_tiny_llama_gguf(tmp_path / "m.gguf", name="Mistral 7B Instruct v0.3")
    ours = read_gguf(str(tmp_path / "m.gguf"))[0]
    ref = transformers.AutoConfig.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    assert ours.model_type == "mistral" and ref.model_type == "llama"
    assert ours.sliding_window is None and ours.layer_types == ()
    assert dataclasses.replace(ours, model_type="llama") == ModelConfig.from_hf(ref.to_dict())


def test_split_gguf_reads_every_shard(tmp_path):
    """A split GGUF (gguf-split's shards) is read from its first shard as llama.cpp reads it: the same config and
    tensors as the whole file, every shard hashed; a later shard, a missing one or a shard renamed is one error
    saying which (the first shard alone was read as the model, and failed later on a missing tensor)."""
    write_tiny_llama_gguf(tmp_path / "whole.gguf")
    write_tiny_llama_gguf(tmp_path / "m.gguf", split_max_tensors=20)
    whole = load_checkpoint(str(tmp_path / "whole.gguf"), progress=lambda *_: None)
    split = load_checkpoint(str(tmp_path / "m-00001-of-00002.gguf"), progress=lambda *_: None)
    assert split.config == whole.config and set(split.tensors) == set(whole.tensors)
    for k, v in whole.tensors.items():
        assert np.array_equal(split.tensors[k], v), k
    digest = split.source["sha256"]
    with open(tmp_path / "m-00002-of-00002.gguf", "ab") as f:
        f.write(b"\0")  # the second shard changed: another source
    assert load_checkpoint(str(tmp_path / "m-00001-of-00002.gguf"), progress=lambda *_: None).source["sha256"] != digest
    with pytest.raises(CheckpointError, match=r"shard 2 of a split GGUF; build from its first shard, "
                                              r"m-00001-of-00002\.gguf"):
        load_checkpoint(str(tmp_path / "m-00002-of-00002.gguf"))
    os.rename(tmp_path / "m-00001-of-00002.gguf", tmp_path / "first.gguf")
    with pytest.raises(CheckpointError, match=r"first\.gguf: its split\.\* keys make it shard 1 of 2"):
        load_checkpoint(str(tmp_path / "first.gguf"))
    os.rename(tmp_path / "first.gguf", tmp_path / "m-00001-of-00002.gguf")
    os.remove(tmp_path / "m-00002-of-00002.gguf")
    with pytest.raises(CheckpointError, match=r"shard m-00002-of-00002\.gguf of this split GGUF is missing"):
        load_checkpoint(str(tmp_path / "m-00001-of-00002.gguf"))


def test_gguf_errors_name_the_file(tmp_path):
    f = tmp_path / "m.gguf"
    write_gguf(f, arch="gpt2")
    with pytest.raises(UnsupportedModelError, match="architecture 'gpt2'"):
        load_checkpoint(str(f))
    from click.testing import CliRunner
    from speccompile.cli import main
    result = CliRunner().invoke(main, ["build", str(f), "--out", str(tmp_path / "out")])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "m.gguf" in errors[0] and "gpt2" in errors[0], result.output
    write_gguf(f, tokenizer_model="bert")
    with pytest.raises(UnsupportedModelError, match="tokenizer 'bert'"):
        load_checkpoint(str(f))
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 40])  # tensor data cut short
    with pytest.raises(CheckpointError, match="m.gguf"):
        load_checkpoint(str(f))


@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_merges_outside_the_vocabulary_name_the_file(tmp_path, model):
    """A merge of a token the vocabulary lacks (tokenizers refuses it with a plain Exception) is bad tokenizer
    metadata naming the file, not an internal error."""
    f = tmp_path / "m.gguf"
    write_gguf(f, tokenizer_model=model, token_merges=["a zz"], token_scores=[0.0] * 3)
    with pytest.raises(CheckpointError, match=r"m\.gguf: bad tokenizer metadata .*zz"):
        load_checkpoint(str(f))


def test_gguf_config_errors_and_moe_name_the_file(tmp_path):
    """A ConfigError from the file's metadata names the file as an UnsupportedModelError does; a Mixtral GGUF
    (general.architecture llama, merged expert tensors) is refused as MoE, not as a missing tensor."""
    f = tmp_path / "m.gguf"
    write_gguf(f, vocab_size=0)
    with pytest.raises(ConfigError, match=r"m\.gguf: config value vocab_size = 0"):
        load_checkpoint(str(f))
    write_gguf(f, rope_scaling_type=gguf.RopeScalingType.LINEAR, rope_scaling_factor=-2.0)
    with pytest.raises(ConfigError, match=r"m\.gguf: config: RoPE parameter factor"):
        read_gguf(str(f))
    write_gguf(f, expert_count=4, tensors={"blk.0.ffn_gate_exps.weight": np.zeros((4, 16, 8), np.float32)})
    with pytest.raises(UnsupportedModelError, match=r"m\.gguf: MoE GGUF not supported"):
        load_checkpoint(str(f))
    write_gguf(f, tensors={"blk.0.ffn_up_exps.weight": np.zeros((4, 16, 8), np.float32)})
    with pytest.raises(UnsupportedModelError, match="MoE GGUF not supported"):
        read_gguf(str(f))


def test_tensor_errors_name_the_file_and_tensor(tmp_path):
    """A tensor of a type the gguf package cannot dequantize (integers here), or a q/k tensor whose rows do not
    split into its heads' rotary pairs: one error naming the file and the tensor as the file names it."""
    f = tmp_path / "m.gguf"
    write_gguf(f, tensors={"blk.0.ffn_down.weight": np.zeros((8, 16), np.int8)})
    with pytest.raises(UnsupportedModelError, match=r"m\.gguf: GGUF tensor blk\.0\.ffn_down\.weight is of type I8"):
        load_checkpoint(str(f))
    write_gguf(f, tensors={"blk.0.attn_k.weight": np.zeros((6, 8), np.float32)})  # 2 heads: rows in 4s
    with pytest.raises(CheckpointError, match=r"m\.gguf: GGUF tensor blk\.0\.attn_k\.weight has 6 rows"):
        load_checkpoint(str(f))


def test_end_of_turn_tokens_are_end_of_sequence_ids(tmp_path):
    f = tmp_path / "m.gguf"
    write_gguf(f, tokens=[f"t{i}" for i in range(8)], eos_token_id=2, eot_token_id=5, eom_token_id=6)
    assert read_gguf(str(f))[0].eos_token_ids == (2, 5, 6)
    write_gguf(f, tokens=[f"t{i}" for i in range(8)], eos_token_id=2, eot_token_id=2)
    assert read_gguf(str(f))[0].eos_token_ids == (2,)


def test_generation_stops_at_the_end_of_turn_token(tmp_path):
    """tokenizer.ggml.eot_token_id ends generation as llama.cpp ends it: a token the plain model generates mid-answer
    is the last one once the file names it the end of a turn."""
    import speccompile
    from speccompile.compile.driver import build_bundle
    prompt = [5, 6, 7, 8]
    write_tiny_llama_gguf(tmp_path / "plain.gguf")
    build_bundle(str(tmp_path / "plain.gguf"), str(tmp_path / "plain"), drafts=["lookup"], max_seq_len=64,
                 progress=lambda *_: None)
    sampled = dict(temperature=20.0, seed=0)  # the tiny model repeats its last token: sampled, its answer varies
    tokens = speccompile.load(str(tmp_path / "plain"), threads=1).generate(prompt, 12, **sampled).token_ids
    at = next(i for i in range(2, 12) if tokens[i] not in tokens[:i] and tokens[i] != 2)
    write_tiny_llama_gguf(tmp_path / "eot.gguf", eot_token_id=tokens[at])
    build_bundle(str(tmp_path / "eot.gguf"), str(tmp_path / "eot"), drafts=["lookup"], max_seq_len=64,
                 progress=lambda *_: None)
    g = speccompile.load(str(tmp_path / "eot"), threads=1)
    assert g.tokenizer.eos_token_ids == {2, tokens[at]}
    assert g.generate(prompt, 12, **sampled).token_ids == tokens[:at + 1]


@pytest.mark.parametrize("scaling", [
    dict(rope_scaling_type=gguf.RopeScalingType.LINEAR, rope_scaling_factor=4.0),
    dict(rope_scaling_factor=4.0),  # no type: llama.cpp reads a factor as linear
])
def test_gguf_linear_rope_scaling_matches_transformers(tmp_path, scaling):
    """rope.scaling.* linear, factor 4: the bundle computes transformers' logits for rope_scaling linear 4."""
    transformers = pytest.importorskip("transformers")
    from models_util import reference_logits
    from speccompile.compile.driver import build_bundle
    from speccompile.compile.sources import save_hf_dir
    from speccompile.format.bundle import read_manifest
    from speccompile.runtime.engine import Engine
    f = str(tmp_path / "lin.gguf")
    write_tiny_llama_gguf(f, **scaling)
    ckpt = load_checkpoint(f, progress=lambda *_: None)
    assert ckpt.config.rope == {"rope_type": "linear", "rope_theta": ckpt.config.rope_theta, "factor": 4.0}
    save_hf_dir(ckpt, str(tmp_path / "hf"))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype="float32")
    build_bundle(f, str(tmp_path / "b"), drafts=["lookup"], max_seq_len=64, weights="float32",
                 progress=lambda *_: None)
    eng = Engine(str(tmp_path / "b"), read_manifest(str(tmp_path / "b"))["models"]["target"], threads=1)
    ids = np.random.default_rng(0).integers(3, 384, 48)
    logits, _ = eng.forward(ids, rows=np.arange(len(ids)))
    ref = reference_logits(model, ids)
    assert np.abs(logits - ref).max() < 1e-4 * np.abs(ref).max()


def ggml_yarn_tables(theta, dim, n_pos, factor, original_context, beta_fast=32.0, beta_slow=1.0):
    """cos/sin of positions 0..n_pos-1 as llama.cpp computes them for YaRN (ggml's rope_yarn and
    ggml_rope_yarn_corr_dims), times its attention factor: 0.1 ln(factor) + 1 once llama_context's and the
    kernel's parts are multiplied."""
    def corr_dim(rotations):
        return dim * math.log(original_context / (rotations * 2 * math.pi)) / (2 * math.log(theta))
    low, high = max(0, math.floor(corr_dim(beta_fast))), min(dim - 1, math.ceil(corr_dim(beta_slow)))
    i = np.arange(dim // 2)
    ramp_mix = 1 - np.clip((i - low) / max(0.001, high - low), 0, 1)
    extrapolated = theta ** (-2.0 * i / dim)
    freq = extrapolated / factor * (1 - ramp_mix) + extrapolated * ramp_mix
    angles = np.arange(n_pos)[:, None] * freq
    return np.cos(angles) * (1 + 0.1 * math.log(factor)), np.sin(angles) * (1 + 0.1 * math.log(factor))


def test_gguf_yarn_rope_scaling_is_llama_cpps(tmp_path):
    from speccompile.compile.rope import rope_tables
    f = str(tmp_path / "yarn.gguf")
    write_tiny_llama_gguf(f, rope_scaling_type=gguf.RopeScalingType.YARN, rope_scaling_factor=4.0,
                          rope_scaling_orig_ctx_len=32, rope_scaling_yarn_beta_fast=8.0)
    cfg = read_gguf(f)[0]
    assert cfg.rope == {"rope_type": "yarn", "rope_theta": cfg.rope_theta, "original_max_position_embeddings": 32,
                        "factor": 4.0, "beta_fast": 8.0, "beta_slow": 1.0}
    cos, sin = rope_tables(cfg.rope, cfg.head_dim, 128, cfg.max_position_embeddings)
    ref_cos, ref_sin = ggml_yarn_tables(cfg.rope_theta, cfg.head_dim, 129, 4.0, 32, beta_fast=8.0)
    assert np.abs(cos - ref_cos).max() < 1e-5 and np.abs(sin - ref_sin).max() < 1e-5



def test_gguf_yarn_without_beta_keys_takes_llama_cpps_defaults(tmp_path):
    """A YaRN GGUF without yarn_beta_fast/slow keys (convert_hf_to_gguf.py writes them only where the config has
    them) rotates by llama.cpp's defaults, 32 and 1; the original context is long enough that both move the ramp
    (at a short one every beta clamps to the same ends)."""
    from speccompile.compile.rope import rope_tables
    f = str(tmp_path / "yarn.gguf")
    write_tiny_llama_gguf(f, rope_scaling_type=gguf.RopeScalingType.YARN, rope_scaling_factor=4.0,
                          rope_scaling_orig_ctx_len=4096)
    cfg = read_gguf(f)[0]
    cos, sin = rope_tables(cfg.rope, cfg.head_dim, 128, cfg.max_position_embeddings)
    ref_cos, ref_sin = ggml_yarn_tables(cfg.rope_theta, cfg.head_dim, 129, 4.0, 4096)
    assert np.abs(cos - ref_cos).max() < 1e-5 and np.abs(sin - ref_sin).max() < 1e-5

@pytest.mark.parametrize("metadata,floats,refused", [
    (dict(rope_scaling_type=gguf.RopeScalingType.NONE), {}, None),
    (dict(rope_scaling_type=gguf.RopeScalingType.LINEAR, rope_scaling_factor=1.0), {}, None),
    ({}, {"llama.rope.scale_linear": 2.0}, None),
    (dict(rope_scaling_type=gguf.RopeScalingType.NONE, rope_scaling_factor=4.0), {}, "contradictory"),
    (dict(rope_scaling_type=gguf.RopeScalingType.LONGROPE), {}, "llama.rope.scaling.type = 'longrope'"),
    (dict(rope_scaling_type=gguf.RopeScalingType.YARN, rope_scaling_factor=4.0, rope_scaling_yarn_attn_factor=0.8),
     {}, "llama.rope.scaling.yarn_attn_factor = 0.8"),
])
def test_gguf_rope_scaling_keys(tmp_path, metadata, floats, refused):
    """Scaling that changes nothing, the older rope.scale_linear, and what is refused, each by the key."""
    f = tmp_path / "m.gguf"
    write_gguf(f, floats=floats, **metadata)
    if refused:
        with pytest.raises(UnsupportedModelError, match=re.escape(refused)) as e:
            read_gguf(str(f))
        assert "m.gguf" in str(e.value) and "\n" not in str(e.value)
    else:
        rope = read_gguf(str(f))[0].rope
        assert rope == ({"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0} if floats else
                        {"rope_type": "default", "rope_theta": 10000.0})


@pytest.fixture(scope="module")
def crossing_merges():
    """A byte-level vocabulary whose merges were learned across spaces, digits, letters and punctuation (no
    pre-tokenizer), so any difference in how text is split shows; plus a token no merge reaches."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.train_from_iterator(tokenizer_strings(n_random=300), trainers.BpeTrainer(
        vocab_size=1200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(tok.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get) + ["zzqx"]
    return tokens, [" ".join(m) for m in model["merges"]]


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "dbrx", "qwen2", "tekken", "smollm", "gpt-4o", "falcon"])
def test_byte_level_text_splits_as_llama_cpp(tmp_path, crossing_merges, pre):
    """tokenizer.ggml.pre as llama.cpp reads it (one of each of its regex families), against llama.cpp's own
    tokenizer (llama-cpp-python, the vocabulary alone; control tokens in the text whole, as transformers takes
    them); "zzqx" is whole where llama.cpp ignores merges."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python, the reference tokenizer, not installed")
    tokens, merges = crossing_merges
    f = tmp_path / "m.gguf"
    write_gguf(f, tokens=tokens, token_types=[3, 3, 3] + [1] * (len(tokens) - 3), token_merges=merges,
               tokenizer_pre=pre, bos_token_id=1, eos_token_id=2, add_bos_token=False, rope_dimension_count=4)
    for fname, data in read_gguf(str(f))[2].items():
        (tmp_path / fname).write_bytes(data)
    ours = BundleTokenizer(str(tmp_path))
    ref = llama_cpp.Llama(model_path=str(f), vocab_only=True, verbose=False)
    for s in tokenizer_strings(n_random=200, seed=5) + ["Hello WORLD HeLLo éÉ ÀbC naïve", "a  1", "x \t 12", "zzqx"]:
        assert ours.encode(s) == ref.tokenize(s.encode(), add_bos=False, special=True), (pre, s)


# A byte-level vocabulary whose merges build each of these texts whole, left to right, so a text split other than
# llama.cpp's shows in the ids: digits in runs, spaces before digits, contractions in either case, cased letters,
# runs of spaces and newlines, punctuation before a newline or "/", falcon's punctuation and digit groups, and two
# chains that compete ("12345", "2345": merges ranked otherwise build other tokens); "zzqx" no merge reaches.
CROSSING_WORDS = ["12345", "2345", " 12", "  1", "'Dave", "'DAVE", "'s", "'S", "HeLLo", "LLo", " Hello", "hello",
                  " \n\n", "  \n", "\r\n", "?!\n", " ?!", "!/\n", "a/b", "éÉ", "ÀbC", "\t 12", "x  ", "...", "$+<=>",
                  "1000", " world"]
CROSSING_TEXT = "zzqx 12345  1 'Dave I'DAVE HeLLo  Hello\t 12 \n\n?!\n!/\nx  a/b éÉÀbC... $+<=>1000 world<s>hello"
# the ids llama.cpp (llama-cpp-python 0.3.36, vocab_only) gave for CROSSING_TEXT over crossing_words_vocab() by
# tokenizer.ggml.pre: the check of each regex family that runs without llama-cpp-python
CROSSING_IDS = {
    "gpt-2": [124, 124, 115, 122, 34, 261, 34, 265, 34, 41, 70, 99, 120, 103, 34, 75, 41, 70, 67, 88, 71, 34, 281, 34,
              34, 278, 110, 110, 113, 11, 34, 258, 293, 12, 297, 12, 301, 12, 122, 34, 34, 99, 49, 100, 34, 307, 310,
              317, 34, 321, 324, 329, 0, 292],
    "llama-bpe": [330, 34, 259, 54, 55, 34, 34, 51, 34, 41, 70, 99, 120, 103, 34, 75, 269, 67, 88, 71, 34, 281, 34, 288,
                  11, 34, 258, 294, 298, 302, 122, 34, 34, 99, 49, 100, 34, 307, 310, 317, 34, 321, 323, 50, 329, 0,
                  292],
    "dbrx": [124, 124, 115, 122, 34, 259, 54, 55, 34, 34, 51, 34, 41, 70, 99, 120, 103, 34, 75, 269, 67, 88, 71, 34,
             281, 34, 34, 278, 110, 110, 113, 11, 34, 258, 294, 298, 302, 122, 34, 34, 99, 49, 100, 34, 307, 310, 317,
             34, 321, 323, 50, 329, 0, 292],
    "qwen2": [124, 124, 115, 122, 34, 51, 52, 53, 54, 55, 34, 34, 51, 34, 41, 70, 99, 120, 103, 34, 75, 269, 67, 88, 71,
              34, 281, 34, 34, 278, 110, 110, 113, 11, 34, 51, 52, 294, 298, 302, 122, 34, 34, 99, 49, 100, 34, 307,
              310, 317, 34, 321, 51, 50, 50, 50, 329, 0, 292],
    "tekken": [330, 34, 51, 52, 53, 54, 55, 34, 34, 51, 34, 41, 70, 99, 120, 103, 34, 75, 275, 285, 283, 34, 288, 11,
               34, 51, 52, 294, 298, 302, 122, 34, 34, 99, 49, 100, 34, 307, 309, 69, 317, 34, 321, 51, 50, 50, 50,
               329, 0, 292],
    "smollm": [124, 124, 115, 122, 34, 51, 52, 53, 54, 55, 267, 51, 34, 41, 70, 99, 120, 103, 34, 75, 41, 70, 67, 88,
               71, 34, 281, 34, 34, 278, 110, 110, 113, 311, 51, 52, 293, 12, 297, 12, 301, 12, 122, 34, 34, 99, 49,
               100, 34, 307, 310, 317, 34, 321, 51, 50, 50, 50, 329, 0, 292],
    "gpt-4o": [124, 124, 115, 122, 34, 259, 54, 55, 34, 34, 51, 34, 41, 70, 99, 120, 103, 34, 75, 269, 67, 88, 71, 34,
               278, 283, 34, 34, 278, 110, 110, 113, 11, 34, 258, 294, 298, 302, 122, 34, 34, 99, 49, 100, 34, 307,
               309, 69, 317, 34, 321, 323, 50, 329, 0, 292],
    "falcon": [124, 124, 115, 122, 34, 259, 54, 55, 34, 265, 34, 41, 70, 99, 120, 103, 34, 75, 41, 70, 67, 88, 71, 34,
               281, 34, 34, 278, 110, 110, 113, 11, 34, 258, 294, 297, 12, 301, 12, 122, 34, 34, 99, 49, 100, 34, 307,
               310, 317, 34, 321, 323, 50, 329, 0, 292],
}


def crossing_words_vocab() -> tuple[list[str], list[str]]:
    """Control "<s>" "</s>", the 256 bytes in GPT-2's spelling, then for each of CROSSING_WORDS the merges that build
    it (each of its prefixes a token), then "zzqx"."""
    from speccompile.compile.gguf_tokenizer import bytes_to_unicode
    spelling = bytes_to_unicode()
    tokens, merges = ["<s>", "</s>"] + [spelling[b] for b in range(256)], []
    for word in CROSSING_WORDS:
        spelled = "".join(spelling[b] for b in word.encode())
        for i in range(2, len(spelled) + 1):
            if spelled[:i] not in tokens:
                tokens.append(spelled[:i])
                merges.append(f"{spelled[:i - 1]} {spelled[i - 1]}")
    return tokens + ["zzqx"], merges


@pytest.mark.parametrize("pre", list(CROSSING_IDS))
def test_byte_level_text_gives_llama_cpps_ids(tmp_path, pre):
    """Each regex family of tokenizer.ggml.pre, its merges' ranks and its ignore_merges, as the ids llama.cpp gave
    (CROSSING_IDS), and as llama.cpp gives them where llama-cpp-python is installed."""
    tokens, merges = crossing_words_vocab()
    f = tmp_path / "gguf" / "m.gguf"
    f.parent.mkdir()
    write_gguf(f, tokens=tokens, token_types=[3, 3] + [1] * (len(tokens) - 2), token_merges=merges, tokenizer_pre=pre,
               bos_token_id=0, eos_token_id=1, add_bos_token=False, rope_dimension_count=4)
    for fname, data in read_gguf(str(f))[2].items():
        (tmp_path / fname).write_bytes(data)
    ours = BundleTokenizer(str(tmp_path))
    assert ours.encode(CROSSING_TEXT) == CROSSING_IDS[pre]
    assert ours.decode(ours.encode(CROSSING_TEXT)) == CROSSING_TEXT.replace("<s>", "")
    try:
        import llama_cpp
    except ImportError:
        return
    ref = llama_cpp.Llama(model_path=str(f), vocab_only=True, verbose=False)
    assert ref.tokenize(CROSSING_TEXT.encode(), add_bos=False, special=True) == CROSSING_IDS[pre]


@pytest.mark.parametrize("pre", ["gpt-2", "default"])
def test_byte_level_text_gets_no_space_prefix(tmp_path, pre):
    """tokenizer.ggml.add_space_prefix = true in a byte-level file: llama.cpp reads it for sentencepiece text alone,
    so "hi" is the token "hi", not "Ġhi", and decodes as "hi"."""
    tokens, merges = crossing_words_vocab()
    tokens += ["hi", "Ġhi"]
    f = tmp_path / "m.gguf"
    write_gguf(f, tokens=tokens, token_types=[3, 3] + [1] * (len(tokens) - 2), token_merges=merges + ["h i", "Ġ hi"],
               tokenizer_pre=pre, bos_token_id=0, eos_token_id=1, add_bos_token=False, add_space_prefix=True)
    for fname, data in read_gguf(str(f))[2].items():
        (tmp_path / fname).write_bytes(data)
    tok = BundleTokenizer(str(tmp_path))
    assert tok.encode("hi hi") == [tokens.index("hi"), tokens.index("Ġhi")]
    assert tok.decode(tok.encode("hi hi")) == "hi hi"


def test_a_gguf_is_read_whatever_its_name(tmp_path):
    """llama.cpp reads a GGUF by its magic bytes: an upper-case .GGUF, or a file without the suffix, builds as the
    same model."""
    write_tiny_llama_gguf(tmp_path / "m.gguf")
    os.rename(tmp_path / "m.gguf", tmp_path / "m.GGUF")
    upper = load_checkpoint(str(tmp_path / "m.GGUF"))
    os.rename(tmp_path / "m.GGUF", tmp_path / "model")
    bare = load_checkpoint(str(tmp_path / "model"))
    assert upper.source["sha256"] == bare.source["sha256"] and set(upper.tensors) == set(bare.tensors)


def test_unknown_pre_tokenizer_is_refused(tmp_path):
    f = tmp_path / "m.gguf"
    write_gguf(f, tokenizer_pre="made-up-bpe")
    with pytest.raises(UnsupportedModelError, match=r"m\.gguf: GGUF tokenizer.ggml.pre 'made-up-bpe'") as e:
        load_checkpoint(str(f))
    assert "\n" not in str(e.value)
    for pre in ("gpt-2", "default", None):  # GPT-2's split, as transformers splits them
        write_gguf(f, **({"tokenizer_pre": pre} if pre else {}))
        tok = json.loads(read_gguf(str(f))[2]["tokenizer.json"])
        assert tok["pre_tokenizer"]["type"] == "ByteLevel" and tok["pre_tokenizer"]["use_regex"], pre


@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_end_of_turn_tokens_marked_plain_are_control_and_end_generation(tmp_path, model):
    """A file that marks <end_of_turn> a plain token (as some Gemma GGUFs do) and names only <eos> its end: as
    llama.cpp reads it, the token stays whole in a rendered chat and generation ends at it too."""
    tokens = ["<unk>", "<s>", "<eos>", "<end_of_turn>", "a", "b", "<", ">", "e", "n", "d"]
    f = tmp_path / "m.gguf"
    write_gguf(f, tokenizer_model=model, tokens=tokens, token_types=[2, 3, 3, 1] + [1] * 7,
               token_scores=[0.0] * len(tokens), token_merges=[], bos_token_id=1, eos_token_id=2, unk_token_id=0)
    config, _, files = read_gguf(str(f))
    assert config.eos_token_ids == (2, 3)
    for fname, data in files.items():
        (tmp_path / fname).write_bytes(data)
    tok = BundleTokenizer(str(tmp_path))
    assert 3 in tok.encode("a<end_of_turn>b") and tok.decode(tok.encode("a<end_of_turn>b")) == "ab"


def test_byte_level_added_tokens_keep_their_ids(tmp_path):
    """convert_hf_to_gguf.py writes a byte-level vocabulary's added tokens as their text, outside GPT-2's byte
    spelling: DeepSeek's control "<｜begin▁of▁sentence｜>", its user-defined "<｜User｜>" and a run of spaces beside
    the plain "ĠĠ". Each is matched whole with its own id, none is added past the vocabulary, and each decodes."""
    tokens = ["a", "b", "Ġ", "ĠĠ", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "  "]
    f = tmp_path / "m.gguf"
    write_gguf(f, tokens=tokens, token_types=[1, 1, 1, 1, 3, 3, 4, 4], token_merges=["Ġ Ġ"], tokenizer_pre="qwen2",
               bos_token_id=4, eos_token_id=5, add_bos_token=True)
    for fname, data in read_gguf(str(f))[2].items():
        (tmp_path / fname).write_bytes(data)
    tok = BundleTokenizer(str(tmp_path))
    assert tok.tok.get_vocab_size() == len(tokens) and tok.eos_token_ids == {5}
    assert tok.encode("<｜begin▁of▁sentence｜><｜User｜>a  b a b") == [4, 6, 0, 7, 1, 2, 0, 2, 1]
    assert tok.encode("b", add_special_tokens=True) == [4, 1]
    assert tok.decode([4, 6, 0, 7, 1, 3, 5]) == "<｜User｜>a  b  "
    write_gguf(f, tokens=["Ġ", "  "], token_types=[1, 4], token_merges=["Ġ Ġ"])  # the merge needs it as "ĠĠ"
    tokenizer = json.loads(read_gguf(str(f))[2]["tokenizer.json"])
    assert tokenizer["model"]["vocab"] == {"Ġ": 0, "ĠĠ": 1}


@pytest.mark.parametrize("pre, flag, bos", [("llama-bpe", None, True), ("tekken", None, True), ("qwen2", None, False),
                                             ("llama-bpe", False, False), ("qwen2", True, True)])
def test_bos_added_as_llama_cpp_adds_it(tmp_path, pre, flag, bos):
    """Without tokenizer.ggml.add_bos_token (early Llama 3 files), llama.cpp adds BOS for Llama 3's and Tekken's
    pre-tokenizers and for no other byte-level one; the flag, where given, decides."""
    f = tmp_path / "m.gguf"
    write_gguf(f, tokens=["a", "b", "<s>"], token_types=[1, 1, 3], tokenizer_pre=pre, bos_token_id=2,
               **({} if flag is None else {"add_bos_token": flag}))
    for fname, data in read_gguf(str(f))[2].items():
        (tmp_path / fname).write_bytes(data)
    assert BundleTokenizer(str(tmp_path)).encode("ab", add_special_tokens=True) == [2] * bos + [0, 1]



@pytest.mark.parametrize("pre, bos", [("qwen2", False), ("llama-bpe", True)])
def test_eos_added_as_llama_cpp_adds_it(tmp_path, pre, bos):
    """tokenizer.ggml.add_eos_token = true: llama.cpp ends a text with EOS where it adds special tokens (after BOS
    where it adds that), as it gave ids for this file."""
    f = tmp_path / "m.gguf"
    write_gguf(f, tokens=["a", "b", "<s>", "</s>"], token_types=[1, 1, 3, 3], tokenizer_pre=pre, bos_token_id=2,
               eos_token_id=3, add_eos_token=True)
    for fname, data in read_gguf(str(f))[2].items():
        (tmp_path / fname).write_bytes(data)
    tok = BundleTokenizer(str(tmp_path))
    assert tok.encode("ab", add_special_tokens=True) == [2] * bos + [0, 1, 3] and tok.encode("ab") == [0, 1]


def test_gguf_chat_template_renders_with_the_files_special_tokens(tmp_path):
    """tokenizer.chat_template is the bundle's chat template, given the texts of the file's BOS and EOS tokens."""
    template = ("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}"
                "{% if add_generation_prompt %}b{% endif %}")
    f = tmp_path / "m.gguf"
    write_gguf(f, tokens=["a", "b", "<s>", "</s>"], token_types=[1, 1, 3, 3], tokenizer_pre="qwen2", bos_token_id=2,
               eos_token_id=3, chat_template=template)
    for fname, data in read_gguf(str(f))[2].items():
        (tmp_path / fname).write_bytes(data)
    tok = BundleTokenizer(str(tmp_path))
    assert tok.apply_chat_template([{"role": "user", "content": "ab"}]) == "<s>ab</s>b"
    assert tok.encode_chat("ab") == [2, 0, 1, 3, 1]

@needs_model
def test_default_gguf_tokenizes_as_llama_cpp(tmp_path):
    """SmolLM2's tokenizer.ggml.pre "smollm": digits one by one, then GPT-2's split, as llama.cpp splits it (and the
    model's own tokenizer.json); GPT-2's split alone differs where a run of spaces meets a digit."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python, the reference tokenizer, not installed")
    for fname, data in read_gguf(DEFAULT_GGUF)[2].items():
        (tmp_path / fname).write_bytes(data)
    ours = BundleTokenizer(str(tmp_path))
    ref = llama_cpp.Llama(model_path=DEFAULT_GGUF, vocab_only=True, verbose=False)
    strings = tokenizer_strings()
    chats = [ours.apply_chat_template([{"role": "user", "content": s}]) for s in strings[:50]]
    for s in strings + chats + ["trailing  3.14", "a \t 12"]:
        assert ours.encode(s) == ref.tokenize(s.encode(), add_bos=False, special=True), s


def test_sentencepiece_without_space_prefix(tmp_path):
    """tokenizer.ggml.add_space_prefix = false: no "▁" before the first piece, none stripped in decoding (the
    pieces as llama.cpp gives them)."""
    tokens, types, scores = sentencepiece_vocab("hello world the quick brown fox hello there")
    pieces = {}
    for prefix in (True, False):
        d = tmp_path / str(prefix)
        d.mkdir()
        write_gguf(d / "sp.gguf", tokenizer_model="llama", tokens=tokens, token_types=types, token_scores=scores,
                   bos_token_id=1, eos_token_id=2, unk_token_id=0, add_space_prefix=prefix)
        for fname, data in read_gguf(str(d / "sp.gguf"))[2].items():
            (d / fname).write_bytes(data)
        tok = BundleTokenizer(str(d))
        pieces[prefix] = [tokens[i] for i in tok.encode("hello world")]
        assert tok.decode(tok.encode("hello world")) == "hello world"
        assert prefix or tok.decode(tok.encode(" hello")) == " hello"  # its own space kept
    assert pieces == {True: ["▁he", "llo▁", "wo", "rld"], False: ["hell", "o▁wo", "rld"]}


# ---- GGUF blocks as MatMulNBits (speccompile.compile.quantize.nbits), on synthetic blocks ----

def synthetic_blocks(ggml_type, n, k, seed=0) -> np.ndarray:
    """Raw rows of an [n, k] weight: gguf.quants.quantize where gguf-py implements it; for the K formats (which
    it only dequantizes) random blocks with f16 super-block scales of a weight's size."""
    rng = np.random.default_rng(seed)
    try:
        return gguf.quants.quantize(rng.standard_normal((n, k)).astype(np.float32) * 0.05, ggml_type)
    except NotImplementedError:
        block, size = gguf.GGML_QUANT_SIZES[ggml_type]
        raw = rng.integers(0, 256, (n, k // block, size), dtype=np.uint8)
        for at in {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}[ggml_type]:
            f16 = (rng.random((n, k // block)) * 2e-3).astype(np.float16)
            raw[..., at:at + 2] = f16[..., None].view(np.uint8)
        return raw.reshape(n, -1)


def run_nbits(tmp_path, packed, x, accuracy_level):
    g = GraphBuilder("nbits")
    n, k = packed.shape
    y = emit_nbits_matmul(g, g.input("x", "float32", [*x.shape[:-1], k]), packed, "w", accuracy_level)
    g.output(g.op("Identity", [y], outputs=["y"])[0], "float32", None)
    refs, offset = {}, 0
    with open(tmp_path / "w.bin", "wb") as f:
        for name, array in packed.weights("w").items():
            data = np.ascontiguousarray(array).tobytes()
            f.write(data)
            refs[name] = {"location": "w.bin", "offset": offset, "length": len(data)}
            offset += len(data)
    import onnx
    import onnxruntime as ort
    onnx.save(g.to_model(refs), str(tmp_path / "m.onnx"))
    return ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"x": x})[0]


@pytest.mark.parametrize("ggml_type", [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_gguf_blocks_as_matmulnbits(tmp_path, ggml_type):
    """The packed inputs encode exactly gguf's dequantized weight; onnxruntime's product at accuracy level 0
    equals the float32 product with that weight within float32 rounding."""
    n, k = 48, 512
    raw = synthetic_blocks(ggml_type, n, k)
    w = gguf.quants.dequantize(raw, ggml_type).astype(np.float32)
    packed = pack_gguf_matrix(raw, ggml_type, (n, k))
    if packed.offsets is None:  # (q - zero point) * scale: the same float32 operations as gguf's
        assert np.array_equal(packed.dequantize(), w)
    else:  # q * d + m regrouped as (q - 8) * d + (8 d + m)
        np.testing.assert_allclose(packed.dequantize(), w, rtol=1e-6, atol=1e-6 * np.abs(w).max())
    x = np.random.default_rng(1).standard_normal((2, 3, k)).astype(np.float32)
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    bound = 2e-6 * (np.abs(x).astype(np.float64) @ np.abs(w).T)  # float32 rounding of a K-term dot product
    exact = run_nbits(tmp_path, packed, x, accuracy_level=0)
    assert exact.shape == (2, 3, n) and np.all(np.abs(exact - ref) <= bound), np.abs(exact - ref).max()
    fast = run_nbits(tmp_path, packed, x, accuracy_level=4)
    rel = np.abs(fast - ref).max() / np.abs(ref).max()
    print(f"{ggml_type.name}: accuracy_level 4 max error {rel:.2e} of max |y|")
    assert rel < 0.05  # int8 activations: approximate by design


def test_unrepresentable_block_format_is_refused():
    with pytest.raises(ValueError, match="IQ4_NL"):
        pack_gguf_matrix(np.zeros((4, 18 * 2), np.uint8), Q.IQ4_NL, (4, 64))


@needs_model
def test_default_gguf_blocks_pack_exactly():
    """Every quantized matrix of the default GGUF (Q4_1 layers, a Q8_0 embedding) packs into MatMulNBits inputs
    that dequantize to gguf's own values bitwise."""
    _, tensors, _ = read_gguf(DEFAULT_GGUF)
    quantized = {k: t for k, t in tensors.items() if t.ggml_type not in (Q.F32, Q.F16)}
    assert {t.ggml_type for t in quantized.values()} == {Q.Q4_1, Q.Q8_0}
    for name, t in quantized.items():
        assert np.array_equal(pack_gguf_matrix(t.raw, t.ggml_type, t.shape).dequantize(), t.dequantize()), name


# ---- Llama 3.1 / 3.2 GGUFs: their llama3 RoPE scaling as convert_hf_to_gguf.py writes it, a rope_freqs tensor ----

def convert_rope_freqs(rope: dict, head_dim: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors: one factor per rotary frequency for llama3
    scaling (it reads the original context from the config's top level, 8192 where absent as in Llama 3.1's own
    config.json; here the model's own)."""
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, np.float32)


def write_llama3_gguf(ckpt, path) -> np.ndarray:
    """A llama3-RoPE checkpoint as convert_hf_to_gguf.py converts it, in float32: q/k rows permuted, no RoPE
    scaling key, the scaling as rope_freqs.weight (returned)."""
    factors = convert_rope_freqs(ckpt.config.rope, ckpt.config.head_dim)
    write_tiny_llama_gguf(path, qtypes=(), ckpt=ckpt, extra_tensors={"rope_freqs.weight": factors})
    return factors


def test_llama31_gguf_rope_freqs_are_llama_cpps(tmp_path):
    """A Llama 3.1-style GGUF (llama3 RoPE as a rope_freqs tensor; it was refused): its frequencies divided by the
    file's factors as ggml_rope_ext divides them; the float32 bundle computes the logits of transformers' model of
    the Hugging Face checkpoint past the original context (64), greedy speculation is lossless there, and the
    checkpoint saved for transformers (train-head's target) computes them too."""
    transformers = pytest.importorskip("transformers")
    import speccompile
    from conftest import assert_lossless, random_prompts
    from models_util import reference_greedy, reference_logits, write_checkpoint
    from speccompile.compile.driver import build_bundle
    from speccompile.compile.rope import rope_tables
    from speccompile.compile.sources import save_hf_dir
    from speccompile.format.bundle import read_manifest
    from speccompile.runtime.engine import Engine
    model = write_checkpoint("llama3", str(tmp_path / "ck"))
    f = str(tmp_path / "l.gguf")
    factors = write_llama3_gguf(load_checkpoint(str(tmp_path / "ck"), progress=lambda *_: None), f)
    assert 1 < len(set(factors.tolist())) and factors.max() == 8.0  # unscaled, smoothed and scaled frequencies
    cfg = read_gguf(f)[0]
    assert cfg.rope == {"rope_type": "freq_factors", "rope_theta": 500000.0, "freq_factors": factors.tolist()}
    cos, sin = rope_tables(cfg.rope, 16, 128, cfg.max_position_embeddings)
    angles = np.arange(129)[:, None] * 500000.0 ** (-np.arange(0, 16, 2) / 16) / factors  # ggml's theta
    assert np.abs(cos - np.cos(angles)).max() < 1e-5 and np.abs(sin - np.sin(angles)).max() < 1e-5
    build_bundle(f, str(tmp_path / "b"), drafts=["lookup", "layerskip:1"], max_seq_len=128, weights="float32",
                 progress=lambda *_: None)
    eng = Engine(str(tmp_path / "b"), read_manifest(str(tmp_path / "b"))["models"]["target"], threads=1, max_rows=96)
    ids = np.random.default_rng(0).integers(3, 384, 96)
    ref = reference_logits(model, ids)
    logits, _ = eng.forward(ids, rows=np.arange(len(ids)))
    assert np.abs(logits - ref).max() < 1e-4 * np.abs(ref).max()
    g = speccompile.load(str(tmp_path / "b"), threads=1)
    prompts = [p * 4 for p in random_prompts(2, seed=1)]  # 32 and 64 tokens, then 40 more
    ours = g.generate(prompts[1], 40, speculate=False).token_ids
    assert ours == reference_greedy(model, prompts[1], 40)[:len(ours)]
    for drafter in ("lookup", "layerskip:1"):
        assert_lossless(g, drafter, prompts, 40)
    save_hf_dir(load_checkpoint(f, progress=lambda *_: None), str(tmp_path / "hf"))
    saved = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype="float32")
    assert np.abs(reference_logits(saved, ids) - ref).max() < 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize("arch,factors,metadata,refused", [
    ("llama", [1.0, 2.0, 4.0], {}, (CheckpointError, r"rope_freqs\.weight has shape \[3\]: not one factor per "
                                                     r"rotary frequency \(2 ")),
    ("llama", [1.0, 0.0], {}, (CheckpointError, "not positive finite")),
    ("llama", [1.0, 4.0], dict(rope_scaling_type=gguf.RopeScalingType.LINEAR, rope_scaling_factor=2.0),
     (UnsupportedModelError, "beside linear RoPE scaling keys")),
    ("qwen2", [1.0, 4.0], {}, (UnsupportedModelError, "in a qwen2 file")),
    ("llama", [1.0, 4.0], {}, None),
])
def test_rope_freqs_not_reproduced_are_refused(tmp_path, arch, factors, metadata, refused):
    """A rope_freqs tensor of another length than the rotated head's frequencies, with a factor that is not a
    positive number, beside RoPE scaling keys, or in a file llama.cpp reads none from: one error naming the file."""
    f = tmp_path / "m.gguf"
    write_gguf(f, arch=arch, tensors={"rope_freqs.weight": np.asarray(factors, np.float32)}, rope_dimension_count=4,
               **metadata)
    if refused is None:
        assert read_gguf(str(f))[0].rope == {"rope_type": "freq_factors", "rope_theta": 10000.0,
                                             "freq_factors": factors}
        return
    with pytest.raises(refused[0], match=refused[1]) as e:
        read_gguf(str(f))
    assert "m.gguf" in str(e.value) and "\n" not in str(e.value)
