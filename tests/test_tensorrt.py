"""The TensorRT lowering of TreeAttention: the plugin node, its reference expansion, the kernels (in a CPU
emulator) and `build --backend tensorrt`.

Without a GPU these check everything but TensorRT itself: the plugin-lowered graph (valid ONNX; expanded to the
reference ops it equals the onnxruntime-lowered graph), the TensorRT form of the graph (norms expanded, opset 20;
expanded too, it still equals it), the CUDA kernels' source run on CPU threads against the numpy definition, the
bundle layout with a stand-in engine builder, and the clear refusal where TensorRT is missing. The tests that
build and run real engines are skipped unless TensorRT and a CUDA GPU are present.
"""
import ctypes
import os
import shutil
import subprocess
import types

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from speccompile.compile import trt_backend
from speccompile.plugins.tree_attention import tensorrt_plugin
from speccompile.compile.driver import build_bundle
from speccompile.format.bundle import read_manifest, write_weights
from speccompile.cli import main
from speccompile.errors import SpeccompileError, UnsupportedModelError
from speccompile.compile.graph.decoder import build_decoder
from speccompile.graphs.builder import GraphBuilder
from speccompile.plugins import tree_attention as ta
from speccompile.runtime.engine import ancestor_mask, session_options
from speccompile.compile.sources import load_checkpoint
from speccompile.compile.weights.decoder import lower_weights

from conftest import quiet, tree_attention_graph

KERNEL_DIR = tensorrt_plugin.PLUGIN_SOURCE_DIR
LMAX = 64


def toolchain_missing():
    try:
        trt_backend.require_toolchain()
    except trt_backend.TensorRTUnavailable as e:
        return str(e)
    return None


def gpu_missing():
    """Why the engine tests cannot run here (None: they can)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the tensorrt package is not installed"
    gpu, why = trt_backend.cuda_gpu()
    if gpu is None:
        return why
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "onnxruntime has no CUDAExecutionProvider (the tests hold GPU buffers as its OrtValues)"
    return None


GPU_MISSING = gpu_missing()
needs_gpu = pytest.mark.skipif(GPU_MISSING is not None, reason=f"needs TensorRT and a CUDA GPU: {GPU_MISSING}")


# --- the plugin node and its expansion ---------------------------------------------------------------------------

def tiny_graphs(tmp_path, attentions, preset="llama"):
    """{attention: path of the tiny preset's decoder graph with that lowering}, weights in one file beside them.
    fused=False everywhere, so the graphs differ in their attention only."""
    ck = load_checkpoint(f"tiny:{preset}")
    w = lower_weights(ck.config, ck.tensors, LMAX)
    refs = write_weights(str(tmp_path / "w.bin"), w, "w.bin")
    paths = {}
    for attention in attentions:
        g = build_decoder(ck.config, w, LMAX, attention=attention, fused=False, name=f"decoder_{attention}")
        paths[attention] = str(tmp_path / f"{attention}.onnx")
        onnx.save_model(g.to_model(refs), paths[attention])
    return ck.config, paths


def tree_step_feeds(tokens, committed, parents) -> dict:
    """A decoder step's inputs: S tree nodes after `committed` cache rows, the bias LMAX wide (as TensorRT takes it)."""
    S = len(tokens)
    anc = ancestor_mask(parents)
    bias = np.full((1, 1, S, LMAX), -np.inf, np.float32)
    bias[0, 0, :, :committed] = 0
    bias[0, 0, :, committed:committed + S][anc] = 0
    return {"input_ids": np.asarray(tokens, np.int64)[None],
            "position_ids": (committed + anc.sum(1) - 1).astype(np.int64)[None],
            "seqlens_k": np.array([committed + S - 1], np.int32), "attention_bias": bias,
            "logits_index": np.arange(S, dtype=np.int64)}


class OrtDecoder:
    """A decoder graph on onnxruntime CPU with its caches bound in place, as the runtime binds them."""

    def __init__(self, model, cfg):
        # the runtime's own session options: they agree with whatever thread pool earlier tests' runtimes set up
        self.sess = ort.InferenceSession(model, session_options(1), providers=["CPUExecutionProvider"])
        self.io = self.sess.io_binding()
        self.vocab, self.hidden = cfg.vocab_size, cfg.hidden_size
        shape = next(i.shape for i in self.sess.get_inputs() if i.name == "past_key.0")  # scratch slots included
        self.key = [np.zeros(shape, np.float32) for _ in range(cfg.num_hidden_layers)]
        self.value = [np.zeros(shape, np.float32) for _ in range(cfg.num_hidden_layers)]
        for i in range(cfg.num_hidden_layers):
            for kind, arr in (("key", self.key[i]), ("value", self.value[i])):
                ov = ort.OrtValue.ortvalue_from_numpy(arr)
                self.io.bind_ortvalue_input(f"past_{kind}.{i}", ov)
                self.io.bind_ortvalue_output(f"present_{kind}.{i}", ov)

    def step(self, tokens, committed, parents):
        """S tokens after `committed` cache rows, a tree by `parents`; returns {output: array} for every row."""
        S = len(tokens)
        feeds = tree_step_feeds(tokens, committed, parents)
        for n, a in feeds.items():
            self.io.bind_cpu_input(n, a)
        out = {"logits": np.zeros((S, self.vocab), np.float32), "next_token": np.zeros(S, np.int64),
               "hidden_states": np.zeros((S, self.hidden), np.float32)}
        for n, a in out.items():
            self.io.bind_output(n, "cpu", 0, a.dtype, a.shape, a.ctypes.data)
        self.sess.run_with_iobinding(self.io)
        return out


def compare_decoders(a, b, cfg, tol=1e-4):
    """Same outputs and caches for a prefill chunk, then a tree step, then a single token."""
    rng = np.random.default_rng(0)
    parents = np.array([-1, 0, 0, 1, 2, 2, 4])
    committed = 0
    for tokens, parents_ in ((rng.integers(3, 384, 12), np.arange(-1, 11)), (rng.integers(3, 384, 7), parents),
                             (rng.integers(3, 384, 1), np.array([-1]))):
        out_a, out_b = a.step(tokens, committed, parents_), b.step(tokens, committed, parents_)
        for n in out_a:
            assert np.abs(out_a[n] - out_b[n]).max() <= (0 if n == "next_token" else tol), n
        committed += len(tokens)
        for i in range(cfg.num_hidden_layers):
            assert np.abs(a.key[i][:, :, :committed] - b.key[i][:, :, :committed]).max() < tol
            assert np.abs(a.value[i][:, :, :committed] - b.value[i][:, :, :committed]).max() < tol


def test_plugin_lowering_is_one_valid_node_per_layer(tmp_path):
    cfg, paths = tiny_graphs(tmp_path, ["plugin"])
    onnx.checker.check_model(paths["plugin"])  # by path: the external weights resolve beside it
    model = onnx.load(paths["plugin"], load_external_data=False)
    nodes = [n for n in model.graph.node if n.domain == ta.DOMAIN]
    assert [n.op_type for n in nodes] == [ta.OP_TYPE] * cfg.num_hidden_layers
    assert {o.domain: o.version for o in model.opset_import}[ta.DOMAIN] == 1
    node = nodes[0]
    assert list(node.input)[1:4] == ["past_key.0", "past_value.0", "seqlens_k"]
    assert list(node.input)[6:] == ["position_ids", "attention_bias"]
    assert list(node.output)[1:] == ["present_key.0", "present_value.0"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == pytest.approx({"num_heads": 4, "kv_num_heads": 2, "head_dim": 16, "rotary_interleaved": 0,
                                   "scale": 0.25})
    assert not any(n.op_type in ("GroupQueryAttention", "Attention") for n in model.graph.node)


@pytest.mark.parametrize("preset", ["llama", "qwen2"])
def test_expanded_plugin_graph_equals_ort_graph(tmp_path, preset):
    cfg, paths = tiny_graphs(tmp_path, ["ort", "plugin"], preset)
    expanded = ta.expand_plugin_nodes(onnx.load(paths["plugin"], load_external_data=False))
    assert not any(n.domain == ta.DOMAIN for n in expanded.graph.node)
    path = str(tmp_path / "expanded.onnx")
    onnx.save_model(expanded, path)
    compare_decoders(OrtDecoder(paths["ort"], cfg), OrtDecoder(path, cfg), cfg)


def test_tensorrt_form_is_opset20_and_still_equal(tmp_path):
    """prepare_graph (norms in primitive ops, opset 20) keeps the graph's meaning: expanded again for onnxruntime,
    it gives the ort graph's outputs."""
    cfg, paths = tiny_graphs(tmp_path, ["ort", "plugin"])
    prepared = trt_backend.prepare_graph(onnx.load(paths["plugin"], load_external_data=False))
    assert {o.domain: o.version for o in prepared.opset_import} == {"": 20, ta.DOMAIN: 1}
    assert {n.op_type for n in prepared.graph.node} & {"RMSNormalization", "SimplifiedLayerNormalization"} == set()
    assert sum(n.op_type == ta.OP_TYPE for n in prepared.graph.node) == cfg.num_hidden_layers
    onnx.save_model(prepared, str(tmp_path / "prepared.onnx"))
    trt_backend.check_graph(str(tmp_path / "prepared.onnx"))  # valid at opset 20
    path = str(tmp_path / "prepared-expanded.onnx")
    onnx.save_model(ta.expand_plugin_nodes(prepared), path)
    compare_decoders(OrtDecoder(paths["ort"], cfg), OrtDecoder(path, cfg), cfg)


def test_ops_without_tensorrt_form_are_refused():
    g = GraphBuilder("mla")
    g.op("GroupQueryAttention", ["q", "k", "v"], domain="com.microsoft", num_heads=4, kv_num_heads=1)
    with pytest.raises(UnsupportedModelError, match="GroupQueryAttention") as refused:
        trt_backend.check_lowerable(g.nodes, "target")
    # the backend named as each caller spells it: build_bundle's keyword, build's flag
    assert str(refused.value).startswith("backend='tensorrt': model 'target' uses")
    assert str(refused.value).endswith("build it with backend='onnxruntime'")
    assert refused.value.cli_message().startswith("--backend tensorrt: model 'target' uses")
    assert refused.value.cli_message().endswith("build it with --backend onnxruntime")


def test_profile_shapes():
    dims = {"input_ids": [1, "S"], "attention_bias": [1, 1, "S", 64], "logits_index": ["R"], "seqlens_k": [1]}
    shapes = trt_backend.profile_shapes(dims, {"S": (1, 5, 128), "R": (1, 5, 128)})
    assert shapes == {"input_ids": ((1, 1), (1, 5), (1, 128)), "logits_index": ((1,), (5,), (128,)),
                      "attention_bias": ((1, 1, 1, 64), (1, 1, 5, 64), (1, 1, 128, 64))}
    with pytest.raises(SpeccompileError, match="'T'"):
        trt_backend.profile_shapes({"x": ["T"]}, {})


# --- the CUDA kernels, on CPU threads ------------------------------------------------------------------------------

KERNEL_ARGTYPES = [ctypes.c_void_p] * 7 + [ctypes.c_int] + [ctypes.c_void_p] * 4 + [ctypes.c_int] * 6 + [ctypes.c_float]


def kernel_library(lib, symbol):
    f = getattr(ctypes.CDLL(lib), symbol)
    f.restype, f.argtypes = ctypes.c_int, KERNEL_ARGTYPES
    return f


def build_emulator(out_dir):
    cxx = shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("needs a C++20 compiler (g++ or clang++) to build the kernel emulator")
    lib = os.path.join(out_dir, "libtree_attention_emulator.so")
    subprocess.run([cxx, "-std=c++20", "-O2", "-Wno-unknown-pragmas", "-shared", "-fPIC", "-pthread",
                    "-I", os.path.join(KERNEL_DIR, "emulator"), os.path.join(KERNEL_DIR, "emulator", "emulator.cpp"),
                    "-o", lib], check=True, capture_output=True)
    return kernel_library(lib, "speccompile_tree_attention_emulate")


def build_cuda_check(out_dir):
    """The kernels compiled by nvcc for this machine's GPU, behind the emulator's entry point (kernel_check.cu)."""
    nvcc, (gpu, why) = shutil.which("nvcc"), trt_backend.cuda_gpu()
    if nvcc is None or gpu is None:
        pytest.skip(f"needs nvcc and a CUDA GPU to run the kernels: {why or 'no nvcc on PATH'}")
    lib = os.path.join(out_dir, "libtree_attention_check.so")
    subprocess.run([nvcc, "-std=c++17", "-O2", "-arch=native", "-shared", "-Xcompiler", "-fPIC",
                    os.path.join(KERNEL_DIR, "kernel_check.cu"), os.path.join(KERNEL_DIR, "tree_attention_kernels.cu"),
                    "-o", lib], check=True, capture_output=True)
    return kernel_library(lib, "speccompile_tree_attention_cuda")


@pytest.fixture(scope="module", params=["emulator", "cuda"])
def kernels(request, tmp_path_factory):
    """The kernels' own source run on CPU threads (emulator) or on the GPU (cuda): one C entry point, host arrays."""
    out_dir = str(tmp_path_factory.mktemp(request.param))
    return (build_emulator if request.param == "emulator" else build_cuda_check)(out_dir)


def random_case(rng, hq, hkv, d, committed, n):
    parents = np.array([-1] + [int(rng.integers(-1, i)) for i in range(1, n)])
    anc = ancestor_mask(parents)
    qkv = rng.standard_normal((1, n, (hq + 2 * hkv) * d)).astype(np.float32)
    key = np.zeros((1, hkv, LMAX, d), np.float32)
    value = np.zeros_like(key)
    key[:, :, :committed] = rng.standard_normal((1, hkv, committed, d))
    value[:, :, :committed] = rng.standard_normal((1, hkv, committed, d))
    cos, sin = ta.rope_tables(LMAX + 1, d, 10000.0)  # as the graphs declare them: lmax + 1 rows
    pos = (committed + anc.sum(1) - 1)[None].astype(np.int64)
    bias = np.full((1, 1, n, LMAX), -np.inf, np.float32)
    bias[0, 0, :, :committed] = 0
    bias[0, 0, :, committed:committed + n][anc] = 0
    return dict(qkv=qkv, key=key, value=value, cos=cos, sin=sin, pos=pos, bias=bias, committed=committed)


def check_against_definition(c, y, present_key, present_value, hq, hkv, d, tol=1e-4):
    P, S = c["committed"], c["qkv"].shape[1]
    ref_y, ref_k, ref_v = ta.reference_numpy(c["qkv"], c["key"], c["value"], P, c["cos"], c["sin"], c["pos"],
                                             c["bias"], hq, hkv, d)
    assert np.abs(y - ref_y).max() < tol
    assert np.abs(present_key[0, :, P:P + S] - ref_k).max() < tol
    assert np.abs(present_value[0, :, P:P + S] - ref_v).max() < tol
    assert np.array_equal(present_key[:, :, :P], c["key"][:, :, :P])  # the committed rows are kept
    assert np.array_equal(present_value[:, :, :P], c["value"][:, :, :P])


@pytest.mark.parametrize("hq,hkv,d", [(4, 2, 16), (6, 2, 64), (3, 3, 40), (2, 1, 256)])
def test_kernels_match_definition(kernels, hq, hkv, d):
    """The kernels' own source (tree_attention_kernels.cuh) on CPU threads and on the GPU: head dims below, between
    and at the warp's multiples, GQA and MHA, int64 and int32 positions, in-place and separate caches."""
    rng = np.random.default_rng(d)
    for trial in range(2):
        c = random_case(rng, hq, hkv, d, committed=int(rng.integers(0, 40)), n=int(rng.integers(1, 10)))
        S = c["qkv"].shape[1]
        in_place, pos64 = trial == 0, trial == 0
        pos = c["pos"] if pos64 else c["pos"].astype(np.int32)
        key, value = c["key"].copy(), c["value"].copy()
        present_key, present_value = (key, value) if in_place else (np.full_like(key, 7), np.full_like(value, 7))
        y = np.zeros((1, S, hq * d), np.float32)
        seqlens = np.array([c["committed"] + S - 1], np.int32)
        ptr = lambda a: a.ctypes.data  # noqa: E731
        assert kernels(ptr(c["qkv"]), ptr(key), ptr(value), ptr(seqlens), ptr(c["cos"]), ptr(c["sin"]), ptr(pos),
                        int(pos64), ptr(c["bias"]), ptr(y), ptr(present_key), ptr(present_value), S, hq, hkv, d, LMAX,
                        LMAX, d ** -0.5) == 0
        check_against_definition(c, y, present_key, present_value, hq, hkv, d)


def test_kernel_sources_compile(tmp_path):
    """nvcc compiles the kernels (no GPU needed)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("needs nvcc (a CUDA toolkit) to compile the kernels")
    subprocess.run([nvcc, "-std=c++17", "-arch=sm_80", "-c", os.path.join(KERNEL_DIR, "tree_attention_kernels.cu"),
                    "-o", str(tmp_path / "kernels.o")], check=True, capture_output=True)


def test_plugin_sources_compile(tmp_path):
    """nvcc compiles the plugin against TensorRT's headers at $TENSORRT_ROOT (no GPU needed). A test of its own,
    so that without the headers it is reported skipped, never passed on the kernels alone."""
    nvcc, root = shutil.which("nvcc"), os.environ.get("TENSORRT_ROOT")
    if nvcc is None or not root:
        pytest.skip("needs nvcc and TensorRT's C++ headers ($TENSORRT_ROOT) to compile the plugin: "
                    f"{'no nvcc on PATH' if nvcc is None else 'TENSORRT_ROOT is not set'}")
    cuda_include = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "include")
    subprocess.run([nvcc, "-std=c++17", "-x", "cu", "-c", os.path.join(KERNEL_DIR, "tree_attention_plugin.cpp"),
                    "-I", os.path.join(root, "include"), "-I", cuda_include, "-o", str(tmp_path / "plugin.o")],
                   check=True, capture_output=True)


# --- build --backend tensorrt ----------------------------------------------------------------------------------------

@pytest.mark.skipif(toolchain_missing() is None, reason="TensorRT, a GPU and the plugin are all present here")
def test_backend_tensorrt_without_tensorrt_is_a_clear_error(tmp_path):
    out = tmp_path / "b"
    r = CliRunner().invoke(main, ["build", "tiny:llama", "--out", str(out), "--backend", "tensorrt"])
    assert r.exit_code == 2, r.output
    assert "error: --backend tensorrt needs TensorRT, a CUDA GPU and the TreeAttention plugin library" in r.output
    assert "missing here:" in r.output
    if GPU_MISSING is not None:
        assert "TensorRT Python package" in r.output or "CUDA GPU" in r.output
    assert not out.exists() and os.listdir(tmp_path) == []  # no bundle, no temporary directory either
    with pytest.raises(trt_backend.TensorRTUnavailable) as refused:  # the same failure, from Python
        build_bundle("tiny:llama", str(out), backend="tensorrt", progress=quiet)
    assert str(refused.value).startswith("backend='tensorrt' needs TensorRT, a CUDA GPU and the TreeAttention plugin")
    assert str(refused.value).endswith("Without them build with the default backend='onnxruntime'.")
    assert "--backend" not in str(refused.value)


@pytest.fixture
def stub_tensorrt(tmp_path, monkeypatch):
    """Stand-ins for TensorRT: a toolchain that is "present" and an engine builder that writes a placeholder and
    records what it was asked, so the bundle side of --backend tensorrt runs here. Real engines: test_engine_*."""
    lib = tmp_path / "libstub_plugin.so"
    lib.write_bytes(b"not a library")
    calls = []

    def build_engine(toolchain, onnx_path, engine_path, input_dims, bounds):
        onnx.checker.check_model(onnx_path)
        calls.append((os.path.basename(onnx_path), bounds))
        with open(engine_path, "wb") as f:
            f.write(b"stub engine")
        return {"profile": {n: [list(s) for s in shape]
                            for n, shape in trt_backend.profile_shapes(input_dims, bounds).items()}}

    toolchain = trt_backend.Toolchain(types.SimpleNamespace(__version__="10.99-stub"), str(lib), "stub GPU")
    monkeypatch.setattr(trt_backend, "require_toolchain", lambda: toolchain)
    monkeypatch.setattr(trt_backend, "build_engine", build_engine)
    return calls


def test_tensorrt_bundle_layout(tmp_path, stub_tensorrt):
    out = str(tmp_path / "b")
    build_bundle("tiny:llama", out, drafts=["lookup", "layerskip:2"], max_seq_len=LMAX, num_draft=3,
                 backend="tensorrt", progress=quiet)
    m = read_manifest(out)
    assert m["backend"] == "tensorrt"
    assert m["tensorrt"]["plugin_library"] == "tensorrt/libstub_plugin.so"
    assert sorted(name for name, _ in stub_tensorrt) == ["early_exit_2.trt.onnx", "target.trt.onnx"]
    assert all(b["S"] == (1, 4, 128) for _, b in stub_tensorrt)  # tuned for a verify block of 3 + 1 tokens
    for name in ("target", "early_exit_2"):
        e = m["models"][name]
        assert e["tensorrt"]["graph"] == f"{name}.trt.onnx" and e["tensorrt"]["engine"] == f"{name}.engine"
        assert e["tensorrt"]["profile"]["input_ids"] == [[1, 1], [1, 4], [1, 128]]
        assert e["attention"] == "reference"  # the CPU graph: the plugin node's expansion
        assert f"{name}.engine" in m["files"] and f"{name}.trt.onnx" in m["files"]
        trt_graph = onnx.load(os.path.join(out, e["tensorrt"]["graph"]), load_external_data=False)
        assert sum(n.op_type == ta.OP_TYPE for n in trt_graph.graph.node) == e["num_layers"]
        cpu_graph = onnx.load(os.path.join(out, e["graph"]), load_external_data=False)
        assert not any(n.domain == ta.DOMAIN for n in cpu_graph.graph.node)


def test_tensorrt_bundle_still_decodes_on_cpu(tmp_path, stub_tensorrt):
    """The CPU runtime, unchanged, runs a --backend tensorrt bundle (its graphs are the plugin's expansion) and
    decodes what a default bundle decodes."""
    import speccompile
    plain, trt = str(tmp_path / "plain"), str(tmp_path / "trt")
    build_bundle("tiny:llama", plain, drafts=["layerskip:2"], max_seq_len=128, progress=quiet)
    build_bundle("tiny:llama", trt, drafts=["layerskip:2"], max_seq_len=128, backend="tensorrt", progress=quiet)
    prompt = list(np.random.default_rng(3).integers(3, 384, 10))
    a = speccompile.load(plain, threads=1).generate(prompt, 24, drafter="layerskip:2")
    b = speccompile.load(trt, threads=1).generate(prompt, 24, drafter="layerskip:2")
    assert a.token_ids == b.token_ids


def test_failed_engine_build_leaves_no_bundle(tmp_path, stub_tensorrt, monkeypatch):
    def fail(*_a, **_k):
        raise SpeccompileError("TensorRT could not build an engine")

    monkeypatch.setattr(trt_backend, "build_engine", fail)
    with pytest.raises(SpeccompileError, match="could not build"):
        build_bundle("tiny:llama", str(tmp_path / "b"), drafts=["none"], max_seq_len=LMAX, backend="tensorrt",
                     progress=quiet)
    assert sorted(os.listdir(tmp_path)) == ["libstub_plugin.so"]  # neither the bundle nor its temporary directory


def test_mla_model_is_refused_before_writing(tmp_path, stub_tensorrt):
    pytest.importorskip("transformers")
    from speccompile.compile.presets import tiny_deepseek_checkpoint
    tiny_deepseek_checkpoint(str(tmp_path / "ck"))
    with pytest.raises(UnsupportedModelError, match="GroupQueryAttention"):
        build_bundle(str(tmp_path / "ck"), str(tmp_path / "b"), drafts=["none"], max_seq_len=LMAX,
                     backend="tensorrt", progress=quiet)
    assert not (tmp_path / "b").exists() and not stub_tensorrt


def test_head_drafters_build_for_tensorrt_at_the_default_draft_precision(tmp_path, stub_tensorrt):
    """The heads' int8 form is onnxruntime's MatMulNBits, which TensorRT does not take: a TensorRT build puts them
    in float32 (the default build, whose shipped MTP head is int8 by default, once failed here); Medusa's fused
    norm (SimplifiedLayerNormalization in the ONNX domain) gets its TensorRT form."""
    import safetensors.numpy as sn
    from speccompile.compile.presets import tiny_mtp_head
    from test_mtp import medusa_heads
    cfg = load_checkpoint("tiny:llama").config
    sn.save_file(tiny_mtp_head(cfg), str(tmp_path / "mtp.safetensors"))
    sn.save_file(medusa_heads(cfg, K=2), str(tmp_path / "medusa.safetensors"))
    notes = []
    build_bundle("tiny:llama", str(tmp_path / "b"), drafts=[f"mtp:{tmp_path}/mtp.safetensors",
                                                            f"medusa:{tmp_path}/medusa.safetensors"],
                 max_seq_len=LMAX, backend="tensorrt", progress=notes.append)
    assert any("draft heads in float32" in n for n in notes)
    built = sorted(name for name, _ in stub_tensorrt)
    assert "mtp_head.trt.onnx" in built and "medusa.trt.onnx" in built, built


def test_runtime_tensorrt_without_a_gpu_is_a_clear_error(fake_trt_bundle, monkeypatch):
    import speccompile
    from speccompile.runtime import trt_engine
    monkeypatch.setattr(trt_engine.TensorRTEngine, "buffer_device", "cuda")
    monkeypatch.setattr(trt_engine, "cuda_gpu", lambda: (None, "no NVIDIA driver: libcuda.so.1 not found"))
    with pytest.raises(SpeccompileError, match="needs a CUDA GPU: no NVIDIA driver"):
        speccompile.load(fake_trt_bundle, device="tensorrt")


def test_cost_model_calibrates_tensorrt_engines(tmp_path, monkeypatch, stub_tensorrt):
    """Calibration times each drafter's own graph by its input names, which a TensorRT engine has without an
    onnxruntime session (it once read `engine.session`)."""
    import safetensors.numpy as sn
    import speccompile
    from speccompile.compile.presets import tiny_mtp_head
    from speccompile.runtime.trt_engine import TensorRTEngine

    def build_engine(toolchain, onnx_path, engine_path, input_dims, bounds):
        with open(engine_path, "wb") as f:
            f.write(os.path.basename(onnx_path).replace(".trt.onnx", ".onnx").encode())
        return {"profile": {}}

    monkeypatch.setattr(trt_backend, "build_engine", build_engine)
    cfg = load_checkpoint("tiny:llama").config
    sn.save_file(tiny_mtp_head(cfg), str(tmp_path / "mtp.safetensors"))
    out = str(tmp_path / "trt")
    build_bundle("tiny:llama", out, drafts=[f"mtp:{tmp_path}/mtp.safetensors"], max_seq_len=128,
                 backend="tensorrt", progress=quiet)
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", FakeTensorRT(out))
    monkeypatch.setenv(trt_backend.PLUGIN_ENV, str(tmp_path / "libstub_plugin.so"))
    monkeypatch.setattr(TensorRTEngine, "buffer_device", "cpu")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    gen = speccompile.load(out, device="tensorrt")
    r = gen.generate(list(range(3, 13)), 8, drafter="mtp", tree="adaptive")
    assert len(r.token_ids) == 8


# --- real engines (a GPU with TensorRT) ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plugin_library(tmp_path_factory):
    """The plugin library: $SPECCOMPILE_TRT_PLUGIN or the source tree's build, else built here with CMake when
    nvcc and TensorRT's headers ($TENSORRT_ROOT) are at hand."""
    lib = trt_backend.plugin_library_path()
    if os.path.isfile(lib):
        return os.path.abspath(lib)
    if not (shutil.which("cmake") and shutil.which("nvcc") and os.environ.get("TENSORRT_ROOT")):
        pytest.skip(f"no plugin library at {lib}, and no cmake + nvcc + $TENSORRT_ROOT to build one")
    build = tmp_path_factory.mktemp("plugin-build")
    subprocess.run(["cmake", "-S", KERNEL_DIR, "-B", str(build), "-DCMAKE_CUDA_ARCHITECTURES=native"], check=True)
    subprocess.run(["cmake", "--build", str(build), "-j"], check=True)
    return str(build / os.path.basename(tensorrt_plugin.PLUGIN_LIBRARY))


def cuda_array(a):
    """A GPU copy of a numpy array, as an onnxruntime OrtValue (the tests' only GPU buffers)."""
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), "cuda", 0)


class TrtEngine:
    """A serialized engine run over OrtValue buffers on the GPU, on CUDA's legacy default stream: onnxruntime's
    copies back to the host (`OrtValue.numpy`) are synchronous on that stream, so they follow the engine's work."""

    def __init__(self, path, library):
        import tensorrt as trt
        trt_backend.load_plugin(trt, library)
        self.trt = trt
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        with open(path, "rb") as f:
            self.engine = self.runtime.deserialize_cuda_engine(f.read())
        assert self.engine is not None, "TensorRT could not deserialize the engine"
        self.context = self.engine.create_execution_context()

    def dtype(self, name):
        return np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(name)))

    def run(self, inputs, outputs=None):
        """inputs: name -> numpy array (cast to the engine's type) or GPU OrtValue; outputs: name -> GPU OrtValue to
        write into (e.g. the input cache itself, in place); the others are allocated. Returns them all."""
        trt = self.trt
        keep = {}
        for name, a in inputs.items():
            if isinstance(a, np.ndarray):
                a = cuda_array(a.astype(self.dtype(name)))
            keep[name] = a
            assert self.context.set_input_shape(name, tuple(a.shape())), (name, a.shape())
            self.context.set_tensor_address(name, a.data_ptr())
        result = dict(outputs or {})
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            if self.engine.get_tensor_mode(name) != trt.TensorIOMode.OUTPUT:
                continue
            if name not in result:
                shape = tuple(self.context.get_tensor_shape(name))
                result[name] = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), self.dtype(name).type, "cuda", 0)
            self.context.set_tensor_address(name, result[name].data_ptr())
        assert self.context.execute_async_v3(0)
        return result


@needs_gpu
def test_engine_op_matches_definition(tmp_path, plugin_library):
    """The plugin alone in an engine, against reference_numpy: random trees and cache lengths, caches bound in
    place (one buffer for past and present, as the runtime binds them) and as separate buffers."""
    import tensorrt as trt
    hq, hkv, d = 4, 2, 64
    g = tree_attention_graph("plugin", hq, hkv, d, LMAX, fixed_total_len=False)
    model = trt_backend.prepare_graph(g.to_model({}))
    onnx_path, engine_path = str(tmp_path / "op.onnx"), str(tmp_path / "op.engine")
    onnx.save_model(model, onnx_path)
    trt_backend.check_graph(onnx_path)
    dims = {i.name: [x.dim_param or x.dim_value for x in i.type.tensor_type.shape.dim] for i in model.graph.input}
    trt_backend.build_engine(trt_backend.Toolchain(trt, plugin_library, "gpu"), onnx_path, engine_path, dims,
                             {"S": (1, 8, 16)})
    engine = TrtEngine(engine_path, plugin_library)
    rng = np.random.default_rng(0)
    for trial in range(8):
        c = random_case(rng, hq, hkv, d, committed=int(rng.integers(0, 40)), n=int(rng.integers(1, 17)))
        S = c["qkv"].shape[1]
        key, value = cuda_array(c["key"]), cuda_array(c["value"])
        in_place = trial % 2 == 0
        outs = {"present_key": key, "present_value": value} if in_place else {}
        r = engine.run({"qkv": c["qkv"], "past_key": key, "past_value": value,
                        "seqlens_k": np.array([c["committed"] + S - 1], np.int32), "position_ids": c["pos"],
                        "attention_bias": c["bias"], "cos": c["cos"], "sin": c["sin"]}, outs)
        check_against_definition(c, r["y"].numpy(), r["present_key"].numpy(), r["present_value"].numpy(), hq, hkv, d)


@needs_gpu
def test_engine_model_matches_cpu_graph(tmp_path, plugin_library, monkeypatch):
    """build --backend tensorrt on the tiny llama, then the target engine against the bundle's CPU graph (the
    plugin's reference expansion): logits, argmax and caches of a prefill chunk and a tree step."""
    monkeypatch.setenv(trt_backend.PLUGIN_ENV, plugin_library)
    out = str(tmp_path / "b")
    build_bundle("tiny:llama", out, drafts=["none"], max_seq_len=LMAX, backend="tensorrt", progress=quiet)
    m = read_manifest(out)
    entry = m["models"]["target"]
    cfg = load_checkpoint("tiny:llama").config
    cpu = OrtDecoder(os.path.join(out, entry["graph"]), cfg)
    engine = TrtEngine(os.path.join(out, entry["tensorrt"]["engine"]),
                       os.path.join(out, m["tensorrt"]["plugin_library"]))
    caches = {f"past_{k}.{i}": cuda_array(np.zeros((1, cfg.num_key_value_heads, LMAX, cfg.head_dim), np.float32))
              for i in range(cfg.num_hidden_layers) for k in ("key", "value")}
    rng = np.random.default_rng(1)
    committed = 0
    for tokens, parents in ((rng.integers(3, 384, 12), np.arange(-1, 11)),
                            (rng.integers(3, 384, 6), np.array([-1, 0, 0, 1, 2, 4]))):
        S = len(tokens)
        ref = cpu.step(tokens, committed, parents)
        feeds = tree_step_feeds(tokens, committed, parents)
        for spec in entry["inputs"]:  # inputs this test does not drive (e.g. the verify extension's): zeros
            if spec["name"] not in feeds and not spec["name"].startswith("past_"):
                shape = [S if d in ("S", "R") else d for d in spec["shape"]]
                feeds[spec["name"]] = np.zeros(shape, spec["dtype"])
        r = engine.run(feeds | caches, {n.replace("past_", "present_"): t for n, t in caches.items()})
        assert np.abs(r["logits"].numpy() - ref["logits"]).max() < 1e-3
        assert np.array_equal(r["next_token"].numpy(), ref["next_token"])
        committed += S
        for i in range(cfg.num_hidden_layers):
            k = caches[f"past_key.{i}"].numpy()
            assert np.abs(k[:, :, :committed] - cpu.key[i][:, :, :committed]).max() < 1e-3


# --- the runtime's TensorRT engine (generate --backend tensorrt), driven through a stand-in for TensorRT ----------

class FakeTensorRT:
    """Just the TensorRT Python API the runtime uses. An "engine" is the bundle's CPU graph (the plugin's reference
    expansion), run by onnxruntime over the buffers at the addresses the runtime binds, so the runtime's binding,
    shapes, bias, cache sharing and copies are all exercised on the CPU."""
    TensorIOMode = types.SimpleNamespace(INPUT="input", OUTPUT="output")

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    def __init__(self, bundle_dir):
        self.bundle_dir, self.__version__ = bundle_dir, "10.99-fake"

    @staticmethod
    def nptype(dtype):
        return dtype

    def get_plugin_registry(self):
        return types.SimpleNamespace(get_creator=lambda *a: "registered")

    def Runtime(self, logger):
        fake = self

        class Runtime:
            def deserialize_cuda_engine(self, data):
                return FakeEngine(os.path.join(fake.bundle_dir, data.decode()))
        return Runtime()


class FakeEngine:
    def __init__(self, graph_path):
        self.session = ort.InferenceSession(graph_path, providers=["CPUExecutionProvider"])
        self.io = {**{i.name: ("input", i) for i in self.session.get_inputs()},
                   **{o.name: ("output", o) for o in self.session.get_outputs()}}
        self.names = list(self.io)
        self.num_io_tensors = len(self.names)

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return self.io[name][0]

    def get_tensor_dtype(self, name):
        t = self.io[name][1].type
        return np.dtype({"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32}[t])

    def create_execution_context(self):
        return FakeContext(self)


class FakeContext:
    def __init__(self, engine):
        self.engine, self.shapes, self.addresses = engine, {}, {}

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, address):
        self.addresses[name] = address

    def view(self, name, shape):
        dtype = self.engine.get_tensor_dtype(name)
        n = int(np.prod(shape)) * dtype.itemsize
        return np.frombuffer((ctypes.c_char * n).from_address(self.addresses[name]), dtype).reshape(shape)

    def execute_async_v3(self, stream):
        assert stream == 0
        feeds = {}
        for i in self.engine.session.get_inputs():
            shape = self.shapes.get(i.name) or tuple(i.shape)
            feeds[i.name] = self.view(i.name, shape).copy()
        results = self.engine.session.run(None, feeds)
        for o, r in zip(self.engine.session.get_outputs(), results):
            np.copyto(self.view(o.name, r.shape), r)  # present_* lands in the cache's own buffer
        return True


@pytest.fixture
def fake_trt_bundle(tmp_path, monkeypatch, stub_tensorrt):
    """A --backend tensorrt bundle whose engines name their CPU graphs, the fake TensorRT, host buffers."""
    from speccompile.runtime.trt_engine import TensorRTEngine

    def build_engine(toolchain, onnx_path, engine_path, input_dims, bounds):
        with open(engine_path, "wb") as f:
            f.write(os.path.basename(onnx_path).replace(".trt.onnx", ".onnx").encode())
        return {"profile": {}}

    monkeypatch.setattr(trt_backend, "build_engine", build_engine)
    out, tree = str(tmp_path / "trt"), tmp_path / "tree.json"
    tree.write_text("[[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 1, 0]]")
    build_bundle("tiny:llama", out, drafts=["layerskip:2", "lookup"], max_seq_len=128, backend="tensorrt",
                 tree=f"static:{tree}", progress=quiet)
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", FakeTensorRT(out))
    monkeypatch.setenv(trt_backend.PLUGIN_ENV, str(tmp_path / "libstub_plugin.so"))
    monkeypatch.setattr(TensorRTEngine, "buffer_device", "cpu")
    return out


def test_runtime_tensorrt_engine_decodes_like_onnxruntime(fake_trt_bundle, monkeypatch):
    """generate with device="tensorrt" (engines, device buffers, the compaction graph) == the same bundle on
    onnxruntime's CPU provider, token for token, speculative and plain; the verify extension is absent. Sampled
    with a seed (the tiny model's greedy output repeats one token), so trees accept paths that must be moved."""
    import speccompile
    from speccompile.runtime.trt_engine import TensorRTEngine
    from speccompile.runtime.kv_cache import DeviceKVCache
    moves = []
    compact = DeviceKVCache.compact
    monkeypatch.setattr(DeviceKVCache, "compact", lambda self, src, dst: (moves.append(
        not np.array_equal(src, np.arange(dst, dst + len(src)))), compact(self, src, dst))[1])
    cpu = speccompile.load(fake_trt_bundle, threads=1)
    trt = speccompile.load(fake_trt_bundle, device="tensorrt")
    assert isinstance(trt.target, TensorRTEngine) and isinstance(trt.target.cache, DeviceKVCache)
    assert not trt.target.verifies and not cpu.target.verifies
    rng = np.random.default_rng(5)
    outputs = set()
    for n in (9, 23):
        base = list(rng.integers(3, 384, n))
        prompt = base + base[:6]
        for drafter, speculate in (("layerskip:2", True), ("lookup", True), (None, False)):
            kw = dict(drafter=drafter, speculate=speculate, temperature=8.0, seed=n)
            want = cpu.generate(prompt, 24, **kw).token_ids
            assert trt.generate(prompt, 24, **kw).token_ids == want
            outputs.update(want)
    assert len(outputs) > 10 and any(moves), "degenerate check: too few distinct tokens or no path moved"


def test_runtime_tensorrt_clear_errors(tmp_path, fake_trt_bundle, monkeypatch):
    import speccompile
    plain = str(tmp_path / "plain")
    build_bundle("tiny:llama", plain, drafts=["none"], max_seq_len=64, progress=quiet)
    with pytest.raises(SpeccompileError, match="--backend tensorrt"):
        speccompile.load(plain, device="tensorrt")
    monkeypatch.setenv(trt_backend.PLUGIN_ENV, str(tmp_path / "missing.so"))
    with pytest.raises(SpeccompileError, match="plugin library"):
        speccompile.load(fake_trt_bundle, device="tensorrt")
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", None)  # import tensorrt -> ImportError
    with pytest.raises(SpeccompileError, match=r"TensorRT's Python package"):
        speccompile.load(fake_trt_bundle, device="tensorrt")


@needs_gpu
def test_engine_generation_matches_cpu(tmp_path, plugin_library, monkeypatch):
    """generate --backend tensorrt on real engines: greedy speculative output == the engines' own autoregressive
    output, and == the same bundle on onnxruntime's CPU provider (float32 engines without TF32)."""
    import speccompile
    monkeypatch.setenv(trt_backend.PLUGIN_ENV, plugin_library)
    out, tree = str(tmp_path / "b"), tmp_path / "tree.json"
    tree.write_text("[[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 1, 0]]")
    build_bundle("tiny:llama", out, drafts=["layerskip:2", "lookup"], max_seq_len=LMAX, backend="tensorrt",
                 tree=f"static:{tree}", progress=quiet)
    cpu = speccompile.load(out, threads=1)
    gpu = speccompile.load(out, device="tensorrt")
    rng = np.random.default_rng(6)
    for n in (9, 23):
        base = list(rng.integers(3, 384, n))
        prompt = base + base[:6]
        plain = gpu.generate(prompt, 24, speculate=False).token_ids
        assert plain == cpu.generate(prompt, 24, speculate=False).token_ids
        for drafter in ("layerskip:2", "lookup"):
            assert gpu.generate(prompt, 24, drafter=drafter).token_ids == plain
