"""Quantized target weights (`build --weights`, speccompile.compile.quantize.target_weights): a GGUF's own blocks
as MatMulNBits and float checkpoints quantized to int8/int4, on tiny models. Checked: each block format through
the graph's own product against numpy's dequantization; formats recorded and shown; logits against the float32
build of the same checkpoint within a stated tolerance; speculation lossless (greedy token for token, sampled in
distribution) over a quantized target, with prompt lookup, an early exit and an MTP head."""
import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from safetensors import numpy as safetensors_numpy

import speccompile
from speccompile.compile.driver import build_bundle
from speccompile.compile.graph.linear import matmul
from speccompile.compile.presets import tiny_mtp_head
from speccompile.compile.quantize.nbits import join_rows, pack_gguf_matrix
from speccompile.compile.quantize.target_weights import DENSE_MATRICES
from speccompile.compile.sources import load_checkpoint
from speccompile.format.bundle import read_manifest
from speccompile.format.summary import describe
from speccompile.graphs.builder import GraphBuilder
from speccompile.runtime.engine import Engine
from conftest import assert_lossless, quiet, random_prompts
from test_decoding import test_sampled_speculative_matches_target_distribution as sampled_distribution_check
from test_gguf import synthetic_blocks, write_tiny_llama_gguf

GGUF_TYPES = (Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q5_0, Q.Q5_1)  # what gguf-py quantizes (the K formats it only reads)
DRAFTS = ["lookup", "layerskip:2"]


def run_product(tmp_path, weights: dict, key: str, x: np.ndarray) -> np.ndarray:
    """x @ W[key] through linear.matmul, the product every decoder graph emits, in onnxruntime."""
    import onnx
    import onnxruntime as ort
    g = GraphBuilder("product")
    W = {name: g.weight(name, array) for name, array in weights.items()}
    y = matmul(g, g.input("x", "float32", ["R", x.shape[1]]), W, key)
    g.output(g.op("Identity", [y], outputs=["y"])[0], "float32", None)
    refs, offset = {}, 0
    with open(tmp_path / "w.bin", "wb") as f:
        for name, array in weights.items():
            data = np.ascontiguousarray(array).tobytes()
            f.write(data)
            refs[name] = {"location": "w.bin", "offset": offset, "length": len(data)}
            offset += len(data)
    onnx.save(g.to_model(refs), str(tmp_path / "m.onnx"))
    return ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"x": x})[0]


@pytest.mark.parametrize("types", [(t,) for t in (*GGUF_TYPES, Q.Q4_K, Q.Q5_K, Q.Q6_K)] +
                         [(Q.Q4_K, Q.Q6_K), (Q.Q4_1, Q.Q8_0, Q.Q6_K)])
def test_block_formats_through_the_graph_product(tmp_path, types):
    """Each block format, alone or several joined along the outputs (q, k, v of different types, as K-quant files
    mix them): the graph's product equals x @ (numpy's dequantization)^T within float32 rounding."""
    k, rows = 512, (32, 16, 16)
    raws = [synthetic_blocks(t, rows[i], k, seed=i) for i, t in enumerate(types)]
    w = np.concatenate([gguf.quants.dequantize(r, t).astype(np.float32) for r, t in zip(raws, types)])
    packed = join_rows([pack_gguf_matrix(r, t, (rows[i], k)) for i, (r, t) in enumerate(zip(raws, types))])
    np.testing.assert_allclose(packed.dequantize(), w, rtol=1e-6, atol=1e-6 * np.abs(w).max())
    x = np.random.default_rng(1).standard_normal((5, k)).astype(np.float32)
    y = run_product(tmp_path, packed.weights("m"), "m", x)
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    bound = 2e-6 * (np.abs(x).astype(np.float64) @ np.abs(w).T)
    assert y.shape == ref.shape and np.all(np.abs(y - ref) <= bound), np.abs(y - ref).max()


@pytest.fixture(scope="module")
def gguf_bundles(tmp_path_factory):
    """A tiny llama GGUF with its matrices in GGUF_TYPES, built with --weights source (lookup, an early exit and
    an MTP head) and --weights float32 (the float reference: the same file dequantized)."""
    d = tmp_path_factory.mktemp("quantized")
    write_tiny_llama_gguf(d / "tiny.gguf", qtypes=GGUF_TYPES)
    cfg = load_checkpoint(str(d / "tiny.gguf"), progress=quiet).config
    safetensors_numpy.save_file(tiny_mtp_head(cfg, repeat_last=True), str(d / "head.safetensors"))
    drafts = DRAFTS + [f"mtp:{d / 'head.safetensors'}"]
    for weights in ("source", "float32"):
        build_bundle(str(d / "tiny.gguf"), str(d / weights), drafts=drafts, max_seq_len=256, num_draft=4,
                     weights=weights, progress=quiet)
    return d


def target_logits(bundle: str, prompt: np.ndarray) -> np.ndarray:
    eng = Engine(bundle, read_manifest(bundle)["models"]["target"], threads=1)
    logits, _ = eng.forward(prompt, rows=np.arange(len(prompt)))
    return logits.copy()


def test_source_keeps_each_matrix_in_its_stored_format(gguf_bundles):
    m = read_manifest(str(gguf_bundles / "source"))
    q, stored = m["quantization"], load_checkpoint(str(gguf_bundles / "tiny.gguf"), progress=quiet).stored
    assert q["option"] == "source" and set(q["fallbacks"]) == {"embed"}  # the head: its exact screen instead
    layers = {k: v for k, v in q["formats"].items() if k.startswith("l")}
    assert len(layers) == 5 * 4
    for key, fmt in layers.items():
        i, name = key[1:].split(".")
        types = sorted({stored[f"model.layers.{i}.{hf}.weight"].ggml_type.name.lower() for hf in DENSE_MATRICES[name]})
        assert fmt.split(" ")[0] == "+".join(types), (key, fmt)
    names = set(m["weights"]["target.bin"])
    assert "l0.qkv" not in names and "l0.qkv.nbits_scales" in names and {"l0.qkv.nbits4", "l0.qkv.nbits8"} & names
    lines = "\n".join(describe(str(gguf_bundles / "source"), m, True))
    assert "--weights source" in lines and "q4_1" in lines and "decode step reads" in lines
    full = read_manifest(str(gguf_bundles / "float32"))
    assert m["files"]["target.bin"]["bytes"] < full["files"]["target.bin"]["bytes"]


def test_source_logits_match_the_float_reference(gguf_bundles):
    """The GGUF's blocks at accuracy level 0 compute its dequantized weights: logits equal the float32 build's
    within 1e-4 of their largest magnitude, the greedy tokens identical."""
    prompt = np.array(random_prompts(3)[2], np.int64)
    q, f = (target_logits(str(gguf_bundles / w), prompt) for w in ("source", "float32"))
    assert np.abs(q - f).max() <= 1e-4 * np.abs(f).max()
    assert np.array_equal(q.argmax(-1), f.argmax(-1))


@pytest.mark.parametrize("drafter", ["lookup", "layerskip:2", "mtp"])
def test_greedy_speculation_over_a_quantized_target_is_lossless(gguf_bundles, drafter):
    g = speccompile.load(str(gguf_bundles / "source"), threads=1)
    accepted = assert_lossless(g, drafter, random_prompts(6), 32)
    assert drafter == "lookup" or max(accepted) > 1.0  # the graph drafters read the quantized target's states


def test_sampled_speculation_over_a_quantized_target_keeps_its_distribution(gguf_bundles):
    sampled_distribution_check(speccompile.load(str(gguf_bundles / "source"), threads=1), "layerskip:2")


@pytest.fixture(scope="module")
def float_checkpoint_bundles(tmp_path_factory):
    d = tmp_path_factory.mktemp("float-quantized")
    for weights in ("float32", "int8", "int4"):
        build_bundle("tiny:llama", str(d / weights), drafts=DRAFTS, max_seq_len=256, num_draft=4, weights=weights,
                     progress=quiet)
    return d


# logits of a block-quantized float checkpoint against its float32 build, as a share of the largest logit
TOLERANCE = {"int8": 0.02, "int4": 0.25}


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_quantized_float_checkpoint(float_checkpoint_bundles, weights):
    """--weights int8/int4 on a float checkpoint: every layer matrix quantized, logits within TOLERANCE of the
    float32 build's, speculation lossless against the same bundle's plain decoding."""
    bundle = str(float_checkpoint_bundles / weights)
    q = read_manifest(bundle)["quantization"]
    assert {v for k, v in q["formats"].items() if k.startswith("l")} == {weights}
    prompt = np.array(random_prompts(3)[2], np.int64)
    ours, ref = target_logits(bundle, prompt), target_logits(str(float_checkpoint_bundles / "float32"), prompt)
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    print(f"{weights}: logits error {err:.2e} of the largest float32 logit")
    assert 0 < err <= TOLERANCE[weights]
    g = speccompile.load(bundle, threads=1)
    assert_lossless(g, "layerskip:2", random_prompts(4), 24)


def test_graphs_without_matmulnbits_name_every_fallback(tmp_path):
    """Reference-attention (unfused) graphs have no MatMulNBits: every matrix stays float32, each named."""
    out = str(tmp_path / "b")
    build_bundle("tiny:llama", out, drafts=["lookup"], max_seq_len=64, attention="reference", fused=False,
                 weights="int4", progress=quiet)
    q = read_manifest(out)["quantization"]
    assert set(q["formats"].values()) == {"float32"}
    assert all("MatMulNBits" in why for k, why in q["fallbacks"].items() if k.startswith("l"))
