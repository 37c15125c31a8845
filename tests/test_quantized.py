"""Quantized target weights (`build --weights`, speccompile.compile.quantize.target_weights): a GGUF's own blocks
as MatMulNBits and float checkpoints quantized to int8/int4, on tiny models. Checked: each block format through
the graph's own product against numpy's dequantization; formats recorded and shown; logits against the float32
build of the same checkpoint within a stated tolerance; speculation lossless (greedy token for token, sampled in
distribution) over a quantized target, with prompt lookup, an early exit and an MTP head."""
import os

import gguf
import numpy as np
import onnx
import pytest
from gguf import GGMLQuantizationType as Q
from safetensors import numpy as safetensors_numpy

import speccompile
from speccompile.compile.driver import build_bundle
from speccompile.compile.graph.linear import gated_product, matmul
from speccompile.compile.presets import tiny_mtp_head
from speccompile.compile.quantize import kernel_form
from speccompile.compile.quantize.nbits import join_rows, nbits_product, pack_gguf_matrix
from speccompile.compile.quantize.target_weights import DENSE_MATRICES
from speccompile.compile.sources import load_checkpoint
from speccompile.format.bundle import read_manifest
from speccompile.format.requirements import opset_imports
from speccompile.graphs import KERNEL_DOMAIN
from speccompile.format.summary import describe, pass_weight_bytes
from speccompile.graphs.builder import GraphBuilder
from speccompile.plugins import q4_matmul
from speccompile.runtime.engine import Engine
from speccompile.runtime.row_parity import match_rows
from speccompile.runtime.sessions import open_session
from tools_util import tool
from conftest import assert_lossless, quiet, random_prompts
from test_decoding import test_sampled_speculative_matches_target_distribution as sampled_distribution_check
from test_gguf import synthetic_blocks, write_tiny_llama_gguf

GGUF_TYPES = (Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q5_0, Q.Q5_1)  # what gguf-py quantizes (the K formats it only reads)
DRAFTS = ["lookup", "layerskip:2"]
# logits of a quantized build against the float32 build of the same checkpoint, as a share of the largest logit
TOLERANCE = {"source": 0.03, "int8": 0.02, "int4": 0.25}


def run_product(tmp_path, weights: dict, key: str, x: np.ndarray, level: int | None = None,
                gated: bool = False, floats: bool = False, slack: float | None = None) -> np.ndarray:
    """x @ W[key] through linear.matmul, the product every decoder graph emits (or, given a MatMulNBits accuracy
    level, nbits_product at that level; gated: linear.gated_product, silu of its first half times its second;
    floats: MatMulQ8F over MatMulQ8 records W[key], x as it is; slack: MatMulQ8Bound over them, its two outputs
    stacked [2, R, N]), in onnxruntime."""
    import onnx
    import onnxruntime as ort
    g = GraphBuilder("product")
    W = {name: g.weight(name, array) for name, array in weights.items()}
    x_in = g.input("x", "float32", ["R", x.shape[1]])
    if floats or slack is not None:
        tiles, blocks, _ = weights[key].shape
        op = q4_matmul.OP_TYPE_Q8F if floats else q4_matmul.OP_TYPE_Q8_BOUND
        extra = {} if floats else {"slack": slack}
        y = g.op(op, [x_in, W[key]], n_out=1 if floats else 2, domain=q4_matmul.DOMAIN, K=blocks * 32, N=tiles * 16,
                 **extra)
        y = y[0] if floats else g.op("Concat", [g.op("Unsqueeze", [o, g.const(np.array([0]))])[0] for o in y],
                                     axis=0)[0]
    else:
        y = (gated_product(g, x_in, W, key) if gated else matmul(g, x_in, W, key) if level is None
             else nbits_product(g, x_in, W, key, level))
    g.output(g.op("Identity", [y], outputs=["y"])[0], "float32", None)
    refs, offset = {}, 0
    with open(tmp_path / "w.bin", "wb") as f:
        for name, array in weights.items():
            data = np.ascontiguousarray(array).tobytes()
            f.write(data)
            refs[name] = {"location": "w.bin", "offset": offset, "length": len(data)}
            offset += len(data)
    onnx.save(g.to_model(refs), str(tmp_path / "m.onnx"))
    # the runtime's own opening: a MatMulQ4 product gets speccompile's kernel library
    return open_session(str(tmp_path / "m.onnx"), ort.SessionOptions(), ["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("types", [(t,) for t in (*GGUF_TYPES, Q.Q4_K, Q.Q5_K, Q.Q6_K)] +
                         [(Q.Q4_K, Q.Q6_K), (Q.Q4_1, Q.Q8_0, Q.Q6_K)])
def test_block_formats_through_the_graph_product(tmp_path, types):
    """Each block format, alone or several joined along the outputs (q, k, v of different types, as K-quant files
    mix them): at accuracy level 0 the graph's product equals x @ (numpy's dequantization)^T within float32
    rounding; at the builds' level 4 within the rounding of x to int8 per block of 32 (half a step of max|x_b|/127
    per element), and each row the same whatever the rows beside it (two rows or more)."""
    k, rows = 512, (32, 16, 16)
    raws = [synthetic_blocks(t, rows[i], k, seed=i) for i, t in enumerate(types)]
    w = np.concatenate([gguf.quants.dequantize(r, t).astype(np.float32) for r, t in zip(raws, types)])
    packed = join_rows([pack_gguf_matrix(r, t, (rows[i], k)) for i, (r, t) in enumerate(zip(raws, types))])
    np.testing.assert_allclose(packed.dequantize(), w, rtol=1e-6, atol=1e-6 * np.abs(w).max())
    x = np.random.default_rng(1).standard_normal((5, k)).astype(np.float32)
    y = run_product(tmp_path, packed.weights("m"), "m", x, level=0)
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    bound = 2e-6 * (np.abs(x).astype(np.float64) @ np.abs(w).T)
    assert y.shape == ref.shape and np.all(np.abs(y - ref) <= bound), np.abs(y - ref).max()
    y4 = run_product(tmp_path, packed.weights("m"), "m", x, level=4)
    half_step = np.abs(x).reshape(len(x), -1, 32).max(-1) / 254  # [rows, K/32]
    l1 = np.abs(w).reshape(len(w), -1, 32).sum(-1)  # [N, K/32]
    assert np.all(np.abs(y4 - ref) <= 1.01 * half_step @ l1.T + bound), np.abs(y4 - ref).max()
    # rows of a product of two rows or more do not depend on each other (one row alone may take another kernel
    # on some CPUs: runtime/row_parity.py measures that and pads one-token steps)
    assert np.array_equal(run_product(tmp_path, packed.weights("m"), "m", x[2:4], level=4), y4[2:4])


@pytest.fixture(scope="module")
def gguf_bundles(tmp_path_factory):
    """A tiny llama GGUF with its matrices in GGUF_TYPES, built with --weights source (lookup, an early exit and
    an MTP head) and --weights float32 (the float reference: the same file dequantized), both with onnxruntime's
    products; and, where speccompile's MatMulQ4 kernel runs, --weights source with it ("kernel")."""
    d = tmp_path_factory.mktemp("quantized")
    write_tiny_llama_gguf(d / "tiny.gguf", qtypes=GGUF_TYPES)
    cfg = load_checkpoint(str(d / "tiny.gguf"), progress=quiet).config
    safetensors_numpy.save_file(tiny_mtp_head(cfg, repeat_last=True), str(d / "head.safetensors"))
    drafts = DRAFTS + [f"mtp:{d / 'head.safetensors'}"]
    for weights in ("source", "float32"):
        build_bundle(str(d / "tiny.gguf"), str(d / weights), drafts=drafts, max_seq_len=256, num_draft=4,
                     weights=weights, kernels="onnxruntime", progress=quiet)
    if q4_matmul.unavailable() is None:
        build_bundle(str(d / "tiny.gguf"), str(d / "kernel"), drafts=drafts, max_seq_len=256, num_draft=4,
                     weights="source", kernels="speccompile", progress=quiet)
    return d


def quantized(name: str):
    """A parameter naming a quantized build of gguf_bundles; "kernel" skipped where MatMulQ4 cannot run."""
    why = q4_matmul.unavailable() if name == "kernel" else None
    return pytest.param(name, marks=pytest.mark.skipif(why is not None, reason=f"MatMulQ4 cannot run here: {why}"))


BUILDS = [quantized("source"), quantized("kernel")]


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
    names = set(m["weights"]["target.bin"])
    for key, fmt in layers.items():
        i, name = key[1:].split(".")
        types = sorted({stored[f"model.layers.{i}.{hf}.weight"].ggml_type.name.lower() for hf in DENSE_MATRICES[name]})
        assert fmt.split(" ")[0] == "+".join(types), (key, fmt)
        if len(types) == 1:  # a format alone stored in other bits than its own says so, as a mixed one does: Q5
            # blocks, and a Q4 gate (or up) widened to 8 bits where it joins an 8-bit up (or gate) as gate_up
            kept = f"l{i}.gate_up" if name in ("gate", "up") and f"l{i}.gate_up.nbits_scales" in names else key
            bits = 4 if kept + ".nbits4" in names else 8
            assert (" as 8-bit blocks" in fmt) == (int(types[0][1]) != bits), (key, fmt)
    assert any(f.startswith("q5") and "+" not in f.split(" ")[0] for f in layers.values())
    assert any(f.startswith("q4") and " as 8-bit blocks" in f for k, f in layers.items() if k.endswith((".gate", ".up")))
    assert "l0.qkv" not in names and "l0.qkv.nbits_scales" in names and {"l0.qkv.nbits4", "l0.qkv.nbits8"} & names
    lines = "\n".join(describe(str(gguf_bundles / "source"), m, True))
    assert "--weights source" in lines and "q4_1" in lines and "decode step reads" in lines
    full = read_manifest(str(gguf_bundles / "float32"))
    assert m["files"]["target.bin"]["bytes"] < full["files"]["target.bin"]["bytes"]


def test_offset_cost_tool_drops_exactly_the_offset_products(gguf_bundles, tmp_path):
    """tools/offset_cost.py times the target against a copy without the products of the blocks' minimums: the copy
    must lose every offset product and nothing else, and still run (its logits then differ)."""
    offset_cost = tool("offset_cost")
    bundle = str(gguf_bundles / "source")
    entry = read_manifest(bundle)["models"]["target"]
    model = onnx.load(os.path.join(bundle, entry["graph"]), load_external_data=False)
    offsets = {i.name for i in model.graph.initializer if i.name.endswith(".nbits_offsets")}
    products = sum(n.op_type == "MatMulNBits" for n in model.graph.node)
    assert offsets and offset_cost.without_offsets(model) == len(offsets)
    assert not offsets & {i for n in model.graph.node for i in n.input}
    assert sum(n.op_type == "MatMulNBits" for n in model.graph.node) == products
    bare = offset_cost.stripped_engine(bundle, entry, 1, str(tmp_path))
    prompt = np.arange(3, 9)
    logits, _ = bare.forward(prompt, rows=np.arange(len(prompt)))
    assert np.isfinite(logits).all() and not np.allclose(logits, target_logits(bundle, prompt), atol=1e-3)


def test_decode_step_reads_one_row_of_the_embedding_and_rope_tables(tmp_path):
    """An untied model's decode step gathers one row of its embedding (lm_head is its head) and one row of each
    cos/sin table; the float32 head, or the screen in its place, is read whole."""
    out = str(tmp_path / "b")
    build_bundle("tiny:qwen2", out, drafts=["lookup"], max_seq_len=64, progress=quiet)
    m = read_manifest(out)
    t = m["models"]["target"]
    assert not t["config"]["tie_word_embeddings"]
    sizes = {n: r["length"] for f in t["weights"] for n, r in m["weights"][f].items() if n in t["initializers"]}
    screen = sum(v for n, v in sizes.items() if n.startswith("head_screen."))
    whole = {"embed", "lm_head", "rope.cos", "rope.sin"}
    assert whole <= set(sizes) and screen
    rest = sum(v for n, v in sizes.items() if n not in whole and not n.startswith("head_screen."))
    rows = 4 * t["config"]["hidden_size"] + 2 * 4 * t["config"]["head_dim"] // 2  # float32 rows
    assert pass_weight_bytes(m, t, 0) == {"full": rest + rows + sizes["lm_head"], "screened": rest + rows + screen}
    assert f"decode step reads {(rest + rows + screen) / 2**20:.1f} MiB" in "\n".join(describe(out, m, True))


def test_decode_step_without_a_screen_names_no_screened_head(tmp_path):
    """Without the head's int8 screen (--no-head-screen) every step reads the float32 head: inspect gives that one
    figure, not a "screened head" one."""
    out = str(tmp_path / "b")
    build_bundle("tiny:llama", out, drafts=["lookup"], max_seq_len=64, head_screen=False, progress=quiet)
    m = read_manifest(out)
    step = pass_weight_bytes(m, m["models"]["target"], 0)
    assert step["full"] == step["screened"]
    lines = [line for line in describe(out, m, True) if line.startswith("decode step reads")]
    assert len(lines) == 1 and lines[0].startswith(f"decode step reads {step['full'] / 2**20:.1f} MiB of weights")
    assert "screened" not in lines[0]


@pytest.mark.parametrize("build", BUILDS)
def test_source_logits_match_the_float_reference(gguf_bundles, build):
    """The GGUF's blocks compute its dequantized weights exactly (the product test above); at the builds' accuracy
    level 4, x rounded to int8 per block as llama.cpp rounds it to Q8 blocks, the logits stay within
    TOLERANCE["source"] of the float32 build's largest logit."""
    prompt = np.array(random_prompts(3)[2], np.int64)
    q, f = (target_logits(str(gguf_bundles / w), prompt) for w in (build, "float32"))
    err = np.abs(q - f).max() / np.abs(f).max()
    print(f"{build}: logits error {err:.2e} of the largest float32 logit, greedy agreement "
          f"{np.mean(q.argmax(-1) == f.argmax(-1)):.2f}")
    assert 0 < err <= TOLERANCE["source"]


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("pad", [False, True], ids=["measured", "pad"])
@pytest.mark.parametrize("drafter", ["lookup", "layerskip:2", "mtp"])
def test_greedy_speculation_over_a_quantized_target_is_lossless(gguf_bundles, drafter, pad, build):
    """pad: one-token steps with a pad row, as on a CPU whose one-row product kernel differs (runtime/row_parity)."""
    g = speccompile.load(str(gguf_bundles / build), threads=1)
    g.target.min_rows = 2 if pad else g.target.min_rows
    accepted = assert_lossless(g, drafter, random_prompts(6), 32)
    assert drafter == "lookup" or max(accepted) > 1.0  # the graph drafters read the quantized target's states


def test_trees_over_a_quantized_target_verify_one_path(gguf_bundles, monkeypatch, tmp_path):
    """A target rounding activations to int8 verifies one path a pass (graphs.trees_exact): asked for a tree, or
    drafting adaptively, every verify block is a chain (no node but the first child of its parent) and the output
    is plain decoding's. The float32 build keeps its trees. (The 4-bit default's MTP tree, adaptive:
    tests/test_smollm2.py.)"""
    from speccompile.runtime.engine import Engine as RuntimeEngine
    blocks = []
    verify = RuntimeEngine.verify

    def recording(self, tokens, positions, parents, *args, **kw):
        blocks.append(np.asarray(parents).copy())
        return verify(self, tokens, positions, parents, *args, **kw)

    monkeypatch.setattr(RuntimeEngine, "verify", recording)
    (tmp_path / "tree.json").write_text("[[0], [1], [2], [0, 0], [1, 0], [0, 0, 0]]")
    branching = f"static:{tmp_path / 'tree.json'}"
    g = speccompile.load(str(gguf_bundles / "source"), threads=1)
    assert not g.trees_exact
    for drafter, tree in (("mtp", "dynamic:6+lookup:4"), ("layerskip:2", branching), ("mtp", "adaptive")):
        blocks.clear()
        assert_lossless(g, drafter, random_prompts(4), 24, tree=tree)
        assert blocks and all(np.array_equal(b, np.arange(len(b)) - 1) for b in blocks), (drafter, tree)
    f32 = speccompile.load(str(gguf_bundles / "float32"), threads=1)
    blocks.clear()
    assert f32.trees_exact
    assert_lossless(f32, "layerskip:2", random_prompts(4), 24, tree=branching)
    assert any(not np.array_equal(b, np.arange(len(b)) - 1) for b in blocks)


@pytest.mark.parametrize("build", BUILDS)
def test_sampled_speculation_over_a_quantized_target_keeps_its_distribution(gguf_bundles, build):
    sampled_distribution_check(speccompile.load(str(gguf_bundles / build), threads=1), "layerskip:2")


@pytest.mark.parametrize("build", [quantized("kernel")])
def test_the_kernel_build_runs_its_q4_matrices_through_matmulq4(gguf_bundles, build):
    """--kernels speccompile: every Q4_0 / Q4_1 matrix (joined with no other format) in MatMulQ4's layout, the
    rest in MatMulNBits'; the output head's int8 screen and the MTP head's int8 matrices in MatMulQ8's on a CPU
    where it beats MatMulNBits (AVX-512 VNNI); recorded
    in the manifest, shown by inspect, its graphs importing the kernels' domain; speccompile's attention kernel."""
    m = read_manifest(str(gguf_bundles / build))
    q, names = m["quantization"], set(m["weights"]["target.bin"])
    kernel = set(q["kernel_matrices"])
    q4 = {k for k in kernel if k + ".q4blocks" in names}
    assert q4 and all(k + ".nbits_scales" not in names for k in q4)
    head = set(m["weights"]["mtp.bin"])
    if kernel_form.kernels_pay():  # MatMulQ8 where it beats MatMulNBits: AVX-512 VNNI
        assert kernel - q4 == {"head_screen.codes"} and "head_screen.scales" not in names
        assert {k for k in head if k.endswith(".int8")} and not {k for k in head if k.endswith(".int8_scales")}
    else:
        assert kernel == q4 and "head_screen.scales" in names and {k for k in head if k.endswith(".int8_scales")}
    assert all(KERNEL_DOMAIN in dict(opset_imports(open(gguf_bundles / build / model["graph"], "rb").read()))
               for name, model in m["models"].items() if name in ("target", "target_batch", "mtp_head"))
    for key, fmt in q["formats"].items():
        layer = key.rsplit(".", 1)[0]
        joined = key.endswith((".gate", ".up")) and {f"{layer}.gate_up.q4blocks", f"{layer}.gate_up.nbits_scales"} & names
        stored, parts = ((f"{layer}.gate_up", [q["formats"][f"{layer}.gate"], q["formats"][f"{layer}.up"]]) if joined
                         else (key, [fmt]))
        if fmt != "float32":
            assert (stored in q4) == all(" as " not in p and set(p.split("+")) <= {"q4_0", "q4_1"}
                                             for p in parts), (key, fmt)
    assert "speccompile.kernels" in m["runtime"]["op_domains"]
    # --attention auto: the layers' products on the kernels, so the attention too (the tiny heads fit it)
    assert {e["attention"] for e in m["models"].values() if "attention" in e} == {"kernel"}
    # a layer whose gate and up matrices joined in MatMulQ4's layout runs them with their gate: MatMulQ4SiLU
    nodes = onnx.load(str(gguf_bundles / build / m["models"]["target"]["graph"]), load_external_data=False).graph.node
    gated = {k + ".q4blocks" for k in q4 if k.endswith(".gate_up")}
    assert gated and sorted(n.input[1] for n in nodes if n.op_type == "MatMulQ4SiLU") == sorted(gated)
    assert f"{len(kernel)} products by speccompile's own kernels" in "\n".join(describe(str(gguf_bundles / build),
                                                                                        m, True))


@pytest.fixture(scope="module")
def float_checkpoint_bundles(tmp_path_factory):
    d = tmp_path_factory.mktemp("float-quantized")
    for weights in ("float32", "int8", "int4"):
        build_bundle("tiny:llama", str(d / weights), drafts=DRAFTS, max_seq_len=256, num_draft=4, weights=weights,
                     progress=quiet)
    return d




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


def test_int4_over_a_quantized_gguf_says_it_requantizes(gguf_bundles, tmp_path):
    """--weights int4 over a GGUF's blocks rounds its dequantized weights a second time: each matrix's format names
    the blocks it came from (--weights source would have kept them exactly)."""
    out = str(tmp_path / "int4")
    build_bundle(str(gguf_bundles / "tiny.gguf"), out, drafts=["lookup"], max_seq_len=64, weights="int4",
                 progress=quiet)
    stored = load_checkpoint(str(gguf_bundles / "tiny.gguf"), progress=quiet).stored
    layers = {k: v for k, v in read_manifest(out)["quantization"]["formats"].items() if k.startswith("l")}
    assert len(layers) == 5 * 4
    for key, fmt in layers.items():
        i, name = key[1:].split(".")
        types = sorted({stored[f"model.layers.{i}.{hf}.weight"].ggml_type.name.lower() for hf in DENSE_MATRICES[name]})
        assert fmt == "int4 requantized from " + "+".join(types), (key, fmt)


def test_the_head_fallback_names_the_screen_only_where_there_is_one(tmp_path):
    """The output head stays float32 in a quantized build; the reason given names its int8 screen only where the
    bundle has one (not under --no-head-screen)."""
    for head_screen in (True, False):
        out = str(tmp_path / str(head_screen))
        build_bundle("tiny:llama", out, drafts=["lookup"], max_seq_len=64, weights="int8", head_screen=head_screen,
                     progress=quiet)
        m = read_manifest(out)
        has_screen = any(n.startswith("head_screen.") for n in m["weights"]["target.bin"])
        assert has_screen == head_screen
        assert ("screen reads a quantized copy" in m["quantization"]["fallbacks"]["embed"]) == has_screen


def test_graphs_without_matmulnbits_name_every_fallback(tmp_path):
    """Reference-attention (unfused) graphs have no MatMulNBits: every matrix stays float32, each named."""
    out = str(tmp_path / "b")
    build_bundle("tiny:llama", out, drafts=["lookup"], max_seq_len=64, attention="reference", fused=False,
                 weights="int4", progress=quiet)
    q = read_manifest(out)["quantization"]
    assert set(q["formats"].values()) == {"float32"}
    assert all("MatMulNBits" in why for k, why in q["fallbacks"].items() if k.startswith("l"))


@pytest.mark.parametrize("weights", BUILDS + ["float32"])
@pytest.mark.parametrize("rule", ["measured", "pad"])
def test_rows_are_computed_alike_whatever_the_rows_beside_them(gguf_bundles, weights, rule):
    """Exactness needs more than close logits: accuracy level 4 rounds each product's input to int8, so a
    last-bit difference between a one-row step and a pass of many rows would flip roundings and grow into other
    tokens. Token by token, one row a pass, every logit and hidden state equals the prefill's bit for bit (the
    attention's pad row, speccompile.plugins.tree_attention; the products' where this machine's one-row kernel
    differs, runtime/row_parity.py -- "pad" forces it), up to the context's last slot (the pad row then lands in
    the scratch slot)."""
    bundle = str(gguf_bundles / weights)
    entry = read_manifest(bundle)["models"]["target"]
    L, tail = entry["kv_cache"]["max_seq_len"], 12
    prompt = np.random.default_rng(3).integers(3, entry["config"]["vocab_size"], L)
    whole = Engine(bundle, entry, threads=1)
    logits, hidden = [], []
    for start in range(0, L, 64):  # chunks of many rows
        out, _ = whole.forward(prompt[start:start + 64], rows=np.arange(64))
        whole.cache.truncate(start + 64)
        logits.append(out.copy()), hidden.append(whole.hidden[:64].copy())
    logits, hidden = np.concatenate(logits), np.concatenate(hidden)
    alone = Engine(bundle, entry, threads=1)
    if rule == "pad":
        alone.min_rows = 2
    else:
        assert match_rows(alone) in (1, 2) and alone.cache.length == 0 and alone.passes == 0
    for start in range(0, L - tail, 64):  # the same prefix, its last chunk shorter
        chunk = prompt[start:min(start + 64, L - tail)]
        alone.forward(chunk, rows=np.arange(len(chunk)))
        alone.cache.truncate(start + len(chunk))
    for i in range(L - tail, L):
        alone.cache.truncate(i)  # commit the tokens before
        row, _ = alone.forward(prompt[i:i + 1])
        assert np.array_equal(row[0], logits[i]) and np.array_equal(alone.hidden[0], hidden[i]), i


def test_a_matrix_of_partial_blocks_stays_float32_and_says_why():
    """--weights int8|int4 quantizes blocks of 32 along a matrix's input size; a matrix whose input size is not a
    multiple of 32 (hidden 48, say) would leave its last inputs out of every block: it stays float32, named."""
    from speccompile.compile.quantize.target_weights import quantize_target
    rng = np.random.default_rng(0)
    weights = {"l0.down": rng.standard_normal((72, 64)).astype(np.float32),
               "l0.o": rng.standard_normal((64, 64)).astype(np.float32)}
    for mode in ("int8", "int4"):
        out, report = quantize_target(weights, None, mode)
        assert report.formats == {"l0.down": "float32", "l0.o": mode}
        assert "72 is not a multiple of 32" in report.fallbacks["l0.down"]
        assert out["l0.down"] is weights["l0.down"] and "l0.o" not in out


def test_int8_blocks_round_to_the_nearest_code():
    """The draft heads' and the head screen's int8 blocks (quantize/int8.py): one scale per block of 32 along a
    row, max|block| / 127, and each code the nearest one: every weight within half a step of its code's value
    (plus float32 rounding), the block's largest weight on its code exactly."""
    from speccompile.compile.quantize.int8 import BLOCK, int8_blocks
    rows = np.random.default_rng(0).standard_normal((8, 4 * BLOCK)).astype(np.float32)
    codes, scales = int8_blocks(rows)
    blocks = rows.reshape(8, 4, BLOCK)
    step = scales.reshape(8, 4, 1)
    assert np.allclose(step[..., 0], np.abs(blocks).max(-1) / 127)
    values = (codes.astype(np.float32) - 128) * step
    assert np.all(np.abs(values - blocks) <= step / 2 * (1 + 1e-5))
    assert np.array_equal(np.abs(codes.astype(np.int32) - 128).max(-1), np.full((8, 4), 127))
