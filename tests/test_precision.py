"""`build --dtype`: float16 and bfloat16 graphs, weights and KV caches (compile/precision.py), checked against
the float32 graphs on onnxruntime's CPU provider, which has float16 kernels for every op of the decoder graphs
(GroupQueryAttention, MatMul, the norms, the verify extension); bfloat16 has none for MatMul, so its graphs are
checked for their types here and run only on the CUDA provider (tests/test_gpu.py, tools/gpu_check.sh)."""
import json
import os
import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto

import speccompile
from speccompile.compile.driver import build_bundle
from speccompile.errors import SpeccompileError
from speccompile.runtime.engine import Engine

from conftest import op_types, quiet

LMAX = 128
# float16 against float32 logits: |difference| at most this fraction of the largest |logit| (float16 keeps 11
# significant bits; over 4 layers of products and sums the drift stays well under 1%)
LOGIT_TOLERANCE = 0.01


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    out = {}
    for dtype in ("float32", "float16", "bfloat16"):
        out[dtype] = str(root / dtype)
        build_bundle("tiny:llama", out[dtype], drafts=["layerskip:2", "lookup"], max_seq_len=LMAX, num_draft=3,
                     dtype=dtype, progress=quiet)
    return out


def engine(bundle):
    m = json.load(open(os.path.join(bundle, "manifest.json")))
    return Engine(bundle, m["models"]["target"], threads=1)


def test_manifest_records_dtype_and_runtime_cache_follows(bundles):
    for dtype, storage in (("float32", np.float32), ("float16", np.float16)):
        m = json.load(open(os.path.join(bundles[dtype], "manifest.json")))
        assert m["dtype"] == dtype
        target = m["models"]["target"]
        assert target["kv_cache"]["dtype"] == dtype
        assert {i["dtype"] for i in target["inputs"] if i["name"].startswith("past_")} == {dtype}
        floats = {r["dtype"] for r in m["weights"]["target.bin"].values()} - {"int64", "int32", "uint8", "int8"}
        assert floats == {dtype}, floats
        assert engine(bundles[dtype]).cache.key.dtype == storage


def test_float16_weights_take_half_the_bytes(bundles):
    size = {d: os.path.getsize(os.path.join(bundles[d], "target.bin")) for d in ("float32", "float16")}
    assert size["float16"] < 0.55 * size["float32"]


def test_inspect_shows_a_float16_bundle_as_built(bundles):
    """`inspect` of a float16 bundle: its float matrices as float16, its KV cache at 2 bytes an element (half the
    float32 bundle's), and no int8 screen of the output head, which only float32 builds get."""
    from speccompile.format.bundle import read_manifest
    from speccompile.format.summary import describe
    text = {}
    for dtype in ("float32", "float16"):
        m = read_manifest(bundles[dtype])
        m["models"]["target"]["kv_cache"]["max_seq_len"] = 1 << 16  # MiB that one decimal shows
        text[dtype] = describe(bundles[dtype], m, True)
    kv = {d: float(re.search(r"KV cache ([\d.]+) MiB", lines[3]).group(1)) for d, lines in text.items()}
    assert kv["float16"] > 0 and kv["float16"] == kv["float32"] / 2
    weights = "\n".join(line for line in text["float16"] if line.startswith("    ") or line.startswith("weights"))
    assert "qkv        float16 layers 0-3" in weights and "float32" not in weights
    assert "its exact greedy int8 screen" not in "\n".join(text["float16"])
    assert "no int8 screen" in text["float16"][-3] and "screened head" in text["float32"][-3]


def test_float16_logits_agree_with_float32(bundles):
    """A prefill chunk and a tree step: every row's logits within LOGIT_TOLERANCE, and the same argmax wherever
    the float32 top two are further apart than twice that."""
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, 384, 40)
    tree = rng.integers(3, 384, 6)
    parents = np.array([-1, 0, 0, 1, 2, 4])
    results = {}
    for dtype in ("float32", "float16"):
        e = engine(bundles[dtype])
        logits, _ = e.forward(prompt, rows=np.arange(len(prompt)))
        rows = [logits.copy()]
        e.cache.truncate(len(prompt))
        depth = np.array([0, 1, 1, 2, 2, 3])
        logits, _ = e.forward(tree, positions=len(prompt) + depth, parents=parents, rows=np.arange(6))
        rows.append(logits.copy())
        results[dtype] = np.concatenate(rows)
    a, b = results["float32"], results["float16"]
    scale = np.abs(a).max()
    assert np.abs(a - b).max() <= LOGIT_TOLERANCE * scale
    top2 = np.sort(a, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * LOGIT_TOLERANCE * scale
    assert clear.sum() > len(a) // 2  # the check is not vacuous
    assert np.array_equal(a[clear].argmax(1), b[clear].argmax(1))


def test_float16_greedy_speculation_is_lossless(bundles):
    """Within a float16 bundle, speculative greedy output == its own autoregressive output (a tree drafts)."""
    g = speccompile.load(bundles["float16"], threads=1)
    rng = np.random.default_rng(1)
    for n in (12, 30):
        base = list(rng.integers(3, 384, n))
        prompt = base + base[:6]
        plain = g.generate(prompt, max_new_tokens=24, speculate=False).token_ids
        for drafter, tree in (("layerskip:2", "static:" + _tree_file()), ("lookup", None)):
            assert g.generate(prompt, max_new_tokens=24, drafter=drafter, tree=tree).token_ids == plain


def test_float16_sampled_speculation_accepts_on_the_host(bundles):
    """A float16 graph's own acceptance would take softmax(logits / T) in float16: logits / T past 65504 at a low
    temperature is infinite (every draft rejected, token 0 drawn), and at T 0.7 probabilities are off by a percent.
    Sampled drafts are accepted on the host from the logits, in float64: speculative sampling returns what plain
    sampling returns with the same seed, at any temperature the sampler takes."""
    g = speccompile.load(bundles["float16"], threads=1)
    assert g.target.verifies and not g.target.verifies_sampled
    rng = np.random.default_rng(2)
    base = list(rng.integers(3, 384, 14))
    prompt = base + base[:6]
    for temperature in (1e-4, 0.7):
        plain = g.generate(prompt, 24, speculate=False, temperature=temperature, seed=3).token_ids
        assert g.generate(prompt, 24, drafter="lookup", temperature=temperature, seed=3).token_ids == plain


def _tree_file():
    import tempfile
    path = os.path.join(tempfile.mkdtemp(), "tree.json")
    with open(path, "w") as f:
        json.dump([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]], f)
    return path


def test_bfloat16_graphs_are_bfloat16_through_and_refused_on_cpu(bundles):
    m = json.load(open(os.path.join(bundles["bfloat16"], "manifest.json")))
    for name, entry in m["models"].items():
        g = onnx.load(os.path.join(bundles["bfloat16"], entry["graph"]), load_external_data=False)
        seen = {i.name for i in (*g.graph.input, *g.graph.initializer)}
        for n in g.graph.node:  # topological order (onnx's checker knows not onnxruntime's norm ops)
            assert all(x in seen or not x for x in n.input if n.op_type != "If"), n.name
            seen.update(n.output)
        types = {v.type.tensor_type.elem_type for v in (*g.graph.input, *g.graph.output, *g.graph.value_info)}
        types |= {t.data_type for t in g.graph.initializer}
        assert TensorProto.FLOAT16 not in types and TensorProto.BFLOAT16 in types
        caches = [v for v in g.graph.input if v.name.startswith("past_")]
        assert caches and all(v.type.tensor_type.elem_type == TensorProto.BFLOAT16 for v in caches)
    with pytest.raises(SpeccompileError, match="generate with device='cuda'"):
        speccompile.load(bundles["bfloat16"], threads=1)


def test_float32_islands_run_a_bfloat16_bundle_on_the_cpu(bundles, tmp_path, monkeypatch):
    """The islands (compile/float32_islands.py) checked where they can be: with every op type of the graphs in
    float32 islands, a bfloat16 bundle needs no bfloat16 kernel, so the CPU runs it; a cast missed, misplaced or
    mistyped (in the verify extension's subgraphs too) fails its load or its output. Speculation equals its
    autoregressive output, which follows float32's."""
    from speccompile.compile import precision
    from speccompile.runtime import engine
    ops = set()
    for name in ("target.onnx", "early_exit_2.onnx"):
        ops |= op_types(onnx.load(os.path.join(bundles["float32"], name), load_external_data=False).graph)
    # a bfloat16 build keeps onnxruntime's attention (speccompile's kernel, which a float32 build may use, is float32)
    monkeypatch.setattr(precision, "BFLOAT16_FLOAT32_OPS", tuple((ops | {"GroupQueryAttention"}) - {"Cast", "If"}))
    out = str(tmp_path / "bf16")
    build_bundle("tiny:llama", out, drafts=["layerskip:2", "lookup"], max_seq_len=LMAX, num_draft=3,
                 dtype="bfloat16", progress=quiet)
    monkeypatch.setattr(engine, "check_device_dtype", lambda entry, device: None)
    bf16, f32 = speccompile.load(out, threads=1), speccompile.load(bundles["float32"], threads=1)
    rng = np.random.default_rng(1)
    for n in (12, 20):
        base = [int(t) for t in rng.integers(3, 384, n)]
        prompt = base + base[:5]
        plain = bf16.generate(prompt, max_new_tokens=16, speculate=False).token_ids
        assert bf16.generate(prompt, max_new_tokens=16, drafter="layerskip:2").token_ids == plain
        reference = f32.generate(prompt, max_new_tokens=16, speculate=False).token_ids
        assert sum(a == b for a, b in zip(plain, reference)) >= 12


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_early_exit_over_gemma3_sliding_layers_alone(tmp_path, dtype):
    """Gemma 3's first layers slide, with RoPE tables of their own: an early exit over them reads none of the
    global layers' tables the target reads. It builds in float16 (it was refused: those tables would have been
    float16 in the target and float32 in the early exit) and, in float16, speculates losslessly."""
    pytest.importorskip("transformers")
    from models_util import write_checkpoint
    write_checkpoint("gemma3", str(tmp_path / "ck"))
    out = str(tmp_path / "b")
    build_bundle(str(tmp_path / "ck"), out, drafts=["layerskip:1"], max_seq_len=LMAX, dtype=dtype, progress=quiet)
    early_exit = onnx.load(os.path.join(out, "early_exit_1.onnx"), load_external_data=False)
    assert {t.name for t in early_exit.graph.initializer} >= {"rope_local.cos", "rope_local.sin"}
    assert "rope.cos" not in {t.name for t in early_exit.graph.initializer}
    if dtype == "float16":
        g = speccompile.load(out, threads=1)
        prompt = [int(t) for t in np.random.default_rng(4).integers(3, 384, 30)]
        plain = g.generate(prompt, 40, speculate=False).token_ids
        assert g.generate(prompt, 40, drafter="layerskip:1").token_ids == plain


def test_unknown_dtype_and_tensorrt_float16_are_refused(tmp_path):
    with pytest.raises(SpeccompileError, match="^dtype='float8': choose"):
        build_bundle("tiny:llama", str(tmp_path / "a"), drafts=["none"], max_seq_len=LMAX, dtype="float8",
                     progress=quiet)
    with pytest.raises(SpeccompileError, match="float32 engines"):
        build_bundle("tiny:llama", str(tmp_path / "b"), drafts=["none"], max_seq_len=LMAX, dtype="float16",
                     backend="tensorrt", progress=quiet)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("kind", ["medusa", "eagle3"])
def test_bfloat16_with_drafters_run_on_the_cpu_is_refused(tmp_path, kind):
    """Medusa heads and EAGLE-3's fc graph run on onnxruntime's CPU provider on every device, and bfloat16 has no
    CPU kernels: such a bundle would load nowhere (on CUDA: 'cannot load medusa.onnx ... rebuild the bundle'), so
    the build refuses it before writing anything."""
    from safetensors import numpy as safetensors_numpy
    from speccompile.compile.sources import load_checkpoint
    from test_mtp import medusa_heads
    head = tmp_path / "head.safetensors"
    if kind == "medusa":  # a head that builds: only the dtype refuses it
        cfg = load_checkpoint("tiny:llama").config
        safetensors_numpy.save_file(medusa_heads(cfg, prefix="medusa_head."), str(head))
    else:  # refused before the head is read
        head.write_bytes(b"")
    with pytest.raises(SpeccompileError, match=f"dtype='bfloat16' with drafts='{kind}'.*dtype='float16'"):
        build_bundle("tiny:llama", str(tmp_path / "b"), drafts=[f"{kind}:{head}"], max_seq_len=LMAX,
                     dtype="bfloat16", progress=quiet)
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_default_model_float16_agrees_with_float32(tmp_path):
    """SmolLM2-135M with its MTP head (float weights: the dtypes are what is compared), float16 against float32 on
    the CPU provider: prefill logits within 1% of the
    largest |logit| with the same argmax on every row, the same 32 greedy tokens, and speculative == autoregressive
    within the float16 bundle."""
    prompt = "Explain step by step how to make a cup of tea."
    out = {}
    for dtype in ("float32", "float16"):
        out[dtype] = str(tmp_path / dtype)
        build_bundle(None, out[dtype], max_seq_len=256, dtype=dtype, weights="float32", progress=quiet)
    gens = {d: speccompile.load(b, threads=2) for d, b in out.items()}
    ids = np.array(gens["float32"].tokenizer.encode(prompt))
    logits = {d: engine(b).forward(ids, rows=np.arange(len(ids)))[0].copy() for d, b in out.items()}
    a, b = logits["float32"], logits["float16"]
    assert np.abs(a - b).max() <= LOGIT_TOLERANCE * np.abs(a).max()
    assert np.array_equal(a.argmax(1), b.argmax(1))
    plain = {d: g.generate(prompt, max_new_tokens=32, speculate=False).token_ids for d, g in gens.items()}
    assert plain["float16"] == plain["float32"]
    assert gens["float16"].generate(prompt, max_new_tokens=32).token_ids == plain["float16"]


def test_float16_weights_are_clipped_to_its_finite_range():
    """A float32 weight past float16's largest finite value becomes that value, not infinity (an infinite weight
    turns every product it is in to inf or NaN); only the named weights are cast, and bfloat16, which has
    float32's range, is not clipped."""
    from speccompile.compile.precision import FLOAT16_MAX, cast_weights, numpy_dtype
    w = np.array([1e6, -1e6, 1.5, 65504.0], np.float32)
    out = cast_weights({"big": w, "kept": w}, {"big"}, "float16")
    assert out["big"].dtype == np.float16 and np.isfinite(out["big"]).all()
    assert out["big"].tolist() == [FLOAT16_MAX, -FLOAT16_MAX, 1.5, 65504.0]
    assert out["kept"] is w
    bf16 = cast_weights({"big": w}, {"big"}, "bfloat16")["big"]
    assert bf16.dtype == numpy_dtype("bfloat16") and bf16.astype(np.float32)[0] > 9e5


def test_manifest_inputs_and_outputs_are_typed_as_the_graphs_are(bundles):
    """Each model entry lists its graph's inputs and outputs with their dtypes: in a reduced-precision bundle the
    KV caches take the build's dtype, every other float input and output (logits, hidden states, the attention
    bias) stays float32 in the graph, and the manifest says the same."""
    from onnx import helper
    for dtype in ("float16", "bfloat16"):
        m = json.load(open(os.path.join(bundles[dtype], "manifest.json")))
        for name, entry in m["models"].items():
            g = onnx.load(os.path.join(bundles[dtype], entry["graph"]), load_external_data=False).graph
            graph_types = {v.name: helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name
                           for v in (*g.input, *g.output)}
            listed = {io["name"]: io["dtype"] for io in (*entry.get("inputs", ()), *entry.get("outputs", ()))}
            assert listed and {n: graph_types[n] for n in listed} == listed, name
            assert {"float32", dtype} <= set(listed.values()), name


# the ops the CUDA provider refused in bfloat16 (precision.BFLOAT16_FLOAT32_OPS)
CUDA_BFLOAT16_REFUSED = ("Pad", "Greater", "ReduceMin")


def test_bfloat16_graphs_run_the_ops_cuda_refuses_in_float32(bundles):
    """The CPU cannot check which ops the CUDA provider runs in bfloat16 (tests/test_gpu.py does): checked here,
    every Pad, Greater and ReduceMin of a bfloat16 graph (subgraphs too) reads float32 copies, not bfloat16 (nor
    float16, which would overflow past 65504 where bfloat16 does not), and its float outputs are cast back."""
    from speccompile.compile.float32_islands import tensor_types
    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16}
    seen = set()

    def check(graph, types):
        for n in graph.node:
            for a in n.attribute:
                for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    check(sub, types)
            if n.op_type in CUDA_BFLOAT16_REFUSED:
                read = [types[x] for x in n.input if types.get(x) in floats]  # none: a comparison of integers
                assert set(read) <= {TensorProto.FLOAT}, (n.name, read)
                if read:
                    seen.add(n.op_type)
                made = [types[x] for x in n.output if types.get(x) in floats]
                assert set(made) <= {TensorProto.FLOAT}, (n.name, made)

    for name in ("target.onnx", "early_exit_2.onnx"):
        g = onnx.load(os.path.join(bundles["bfloat16"], name), load_external_data=False).graph
        check(g, tensor_types(g))
    assert seen == set(CUDA_BFLOAT16_REFUSED)  # each op type is checked on a float input at least
