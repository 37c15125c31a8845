"""GGUF read without torch (speccompile.compile.gguf, gguf_tokenizer) against transformers' GGUF loader, a build
in a process where torch and transformers cannot be imported, and GGUF's quantized blocks as onnxruntime's
MatMulNBits (speccompile.compile.quantize.nbits) against gguf's own dequantization."""
import json
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from speccompile.compile.gguf import read_gguf, unpermute_rope_rows
from speccompile.compile.quantize.nbits import emit_nbits_matmul, pack_gguf_matrix
from speccompile.compile.sources import default_model_path, load_checkpoint
from speccompile.errors import CheckpointError, UnsupportedModelError
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
    assert config == ModelConfig.from_hf(hf)
    for fname, data in files.items():
        (tmp_path / fname).write_bytes(data)
    ours = BundleTokenizer(str(tmp_path))
    ref = transformers.AutoTokenizer.from_pretrained(d, gguf_file=name)
    strings = tokenizer_strings()
    chats = [ours.apply_chat_template([{"role": "user", "content": s}]) for s in strings[:50]]
    assert chats[0] == ref.apply_chat_template([{"role": "user", "content": strings[0]}], tokenize=False,
                                               add_generation_prompt=True)
    for s in strings + chats:
        ids = ours.encode(s)
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
    from speccompile.compile.sources import read_safetensors
    ref = {"b": torch.randn(4, 6).bfloat16(), "a": torch.randn(3), "h": torch.randn(5).half()}
    path = str(tmp_path / "w.safetensors")
    save_file(ref, path)
    got = read_safetensors(path)
    for k, v in ref.items():
        assert got[k].dtype == np.float32 and np.array_equal(got[k], v.float().numpy()), k


def write_gguf(path, arch="llama", tokenizer_model="gpt2", tokens=("a", "b", "c"), **token_metadata):
    """A one-layer GGUF with the given tokenizer metadata (token_metadata: scores, token_types, bos_token_id ...)."""
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
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
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


def test_sentencepiece_gguf_tokenizer_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    corpus = " ".join(tokenizer_strings(n_random=0))
    tokens, types, scores = sentencepiece_vocab(corpus)
    f = tmp_path / "sp.gguf"
    write_gguf(f, tokenizer_model="llama", tokens=tokens, token_types=types, token_scores=scores,
               bos_token_id=1, eos_token_id=2, unk_token_id=0)
    _, _, files = read_gguf(str(f))
    for fname, data in files.items():
        (tmp_path / fname).write_bytes(data)
    ours = BundleTokenizer(str(tmp_path))
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="sp.gguf")
    for s in tokenizer_strings(n_random=200, seed=3):
        ids = ours.encode(s)
        assert ids == ref.encode(s, add_special_tokens=False), s
        assert ours.encode(s, add_special_tokens=True) == ref.encode(s, add_special_tokens=True), s
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), s


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


def write_tiny_llama_gguf(path, qtypes=(Q.Q8_0, Q.Q4_1, Q.Q4_0)):
    """The tiny:llama preset as llama.cpp would convert it: q/k rows permuted, matrices quantized in turn with
    `qtypes`, a byte-level vocabulary without merges."""
    from speccompile.compile.presets import tiny_checkpoint
    ckpt = tiny_checkpoint("llama")
    cfg = ckpt.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny llama")
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
    i = 0
    for name, t in ckpt.tensors.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        t = np.asarray(t, np.float32)
        if name.endswith("q_proj.weight") or name.endswith("k_proj.weight"):
            heads = cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads
            t = llama_cpp_permute(t, heads)
        if t.ndim == 2:
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
