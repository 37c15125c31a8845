"""The runtime on a GPU (`--device cuda`): the KV cache in device memory (DeviceKVCache), compacted there by the
bundle's KV compaction graph, the step's small inputs and outputs copied by onnxruntime.

Here, without a GPU, the device code path runs with `cpu` OrtValues (Engine.resident_on_cpu): the compaction graph
against numpy, and whole decodes against the host cache token for token; and a missing CUDA provider is one clear
error. The tests marked needs_cuda run on a machine with onnxruntime-gpu and a CUDA GPU (tools/gpu_check.sh)."""
import ctypes
import json
import os

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

import speccompile
from speccompile.cli import main
from speccompile.compile.driver import build_bundle
from speccompile.compile.graph.kv_compact import build_kv_compact, cache_names
from speccompile.compile.trt_backend import cuda_gpu
from speccompile.errors import SpeccompileError
from speccompile.runtime.engine import Engine
from speccompile.runtime.kv_cache import DeviceKVCache, KVCache

from conftest import quiet


def cuda_missing():
    """Why the CUDA tests cannot run here (None: they can)."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"this onnxruntime has no CUDAExecutionProvider ({', '.join(ort.get_available_providers())})"
    gpu, why = cuda_gpu()
    return None if gpu else why


CUDA_MISSING = cuda_missing()
needs_cuda = pytest.mark.skipif(CUDA_MISSING is not None, reason=f"needs a CUDA GPU: {CUDA_MISSING}")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]
LMAX = 128
TREE = [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 1, 0]]
# float16 on the GPU against float32 on the CPU: |logit difference| within this fraction of the largest |logit|
LOGIT_TOLERANCE = 0.01


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    tree = root / "tree.json"
    tree.write_text(json.dumps(TREE))
    out = {}
    for dtype in ("float32", "float16"):
        out[dtype] = str(root / dtype)
        build_bundle("tiny:llama", out[dtype], drafts=["layerskip:2", "lookup"], max_seq_len=LMAX, dtype=dtype,
                     tree=f"static:{tree}", progress=quiet)
    return out


def prompts(n=3, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        base = list(rng.integers(3, 384, 10 + 7 * i))
        out.append(base + base[:5])  # a repeat, for lookup
    return out


class CopyAtBind(ort.IOBinding):
    """onnxruntime's binding as it behaves for a graph on a device, here on the CPU: a host input is copied when it
    is bound, so refilling its buffer afterwards changes nothing the graph reads."""

    def bind_input(self, name, device_type, device_id, element_type, shape, buffer_ptr):
        dtype = np.dtype(element_type)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        snapshot = np.frombuffer(ctypes.string_at(buffer_ptr, nbytes), dtype).copy().reshape(shape)
        self._snapshots = {**getattr(self, "_snapshots", {}), name: snapshot}  # alive while bound
        super().bind_input(name, device_type, device_id, element_type, shape, snapshot.ctypes.data)


@pytest.fixture
def copy_at_bind(monkeypatch):
    monkeypatch.setattr(ort.InferenceSession, "io_binding", lambda self: CopyAtBind(self))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_compaction_graph_matches_numpy(device, dtype, copy_at_bind):
    """Random accepted paths (overlapping their destination or not) moved by the graph on `device` == numpy."""
    layers, heads, dim = 3, 2, 8
    session = ort.InferenceSession(build_kv_compact(layers, heads, LMAX, dim, dtype).SerializeToString(),
                                   providers=["CUDAExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"])
    host = KVCache(layers, heads, LMAX, dim, dtype)
    dev = DeviceKVCache(layers, heads, LMAX, dim, dtype, device, session)
    rng = np.random.default_rng(0)
    host.key[:] = rng.standard_normal(host.key.shape)
    host.value[:] = rng.standard_normal(host.value.shape)
    for name, ov in dev.ortvalues():  # the same start
        kind, i = name.split(".")
        ov.update_inplace(np.ascontiguousarray(getattr(host, kind)[int(i)]))
    for _ in range(20):
        dst = int(rng.integers(0, LMAX - 20))
        n = int(rng.integers(1, 8))
        src = np.sort(rng.choice(np.arange(dst, dst + 20), n, replace=False))
        host.compact(src, dst)
        dev.compact(src, dst)
    assert [n for n, _ in dev.ortvalues()] == cache_names(layers)
    for i in range(layers):
        assert np.array_equal(dev.layer("key", i), host.key[i])
        assert np.array_equal(dev.layer("value", i), host.value[i])


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_device_cache_path_decodes_like_the_host_cache(bundles, dtype, monkeypatch):
    """The device path (OrtValues, the compaction graph, inputs copied when bound as on a GPU) on the CPU: token
    for token the host path's output, with a tree drafter whose accepted paths need compaction (counted, so the
    check is not vacuous)."""
    host = speccompile.load(bundles[dtype], threads=1)
    want = [host.generate(p, max_new_tokens=24, drafter="layerskip:2").token_ids for p in prompts()]
    monkeypatch.setattr(Engine, "resident_on_cpu", True)
    monkeypatch.setattr(ort.InferenceSession, "io_binding", lambda self: CopyAtBind(self))
    moves = []
    compact = DeviceKVCache.compact
    monkeypatch.setattr(DeviceKVCache, "compact", lambda self, src, dst: (moves.append(
        not np.array_equal(src, np.arange(dst, dst + len(src)))), compact(self, src, dst))[1])
    dev = speccompile.load(bundles[dtype], threads=1)
    assert isinstance(dev.target.cache, DeviceKVCache)
    got = [dev.generate(p, max_new_tokens=24, drafter="layerskip:2").token_ids for p in prompts()]
    assert got == want
    assert any(moves), "no accepted path needed moving: the compaction graph went untested"


@pytest.mark.skipif(CUDA_MISSING is None, reason="this machine has a CUDA GPU and onnxruntime's CUDA provider")
def test_missing_cuda_is_one_clear_error(bundles):
    with pytest.raises(SpeccompileError, match=r"CUDAExecutionProvider.*SPECCOMPILE_ONNXRUNTIME=gpu"):
        speccompile.load(bundles["float16"], device="cuda")
    for command in (["generate", bundles["float16"], "hi", "--no-chat"], ["serve", bundles["float16"], "--port", "0"]):
        r = CliRunner().invoke(main, [*command, "--device", "cuda"])
        assert r.exit_code == 2 and r.output.count("error:") == 1 and "CUDAExecutionProvider" in r.output, r.output


@needs_cuda
def test_cuda_greedy_speculation_is_lossless(bundles):
    """On the GPU (float16, the cache in device memory): speculative greedy output == autoregressive, with a tree
    and with lookup."""
    g = speccompile.load(bundles["float16"], device="cuda")
    assert isinstance(g.target.cache, DeviceKVCache)
    for p in prompts():
        plain = g.generate(p, max_new_tokens=32, speculate=False).token_ids
        for drafter in ("layerskip:2", "lookup"):
            assert g.generate(p, max_new_tokens=32, drafter=drafter).token_ids == plain


@needs_cuda
def test_cuda_bfloat16_greedy_speculation_is_lossless(tmp_path):
    """bfloat16 runs only on the CUDA provider: a tiny bundle's speculative greedy output == its autoregressive."""
    out = str(tmp_path / "bf16")
    build_bundle("tiny:llama", out, drafts=["layerskip:2", "lookup"], max_seq_len=LMAX, dtype="bfloat16",
                 progress=quiet)
    g = speccompile.load(out, device="cuda")
    for p in prompts():
        plain = g.generate(p, max_new_tokens=24, speculate=False).token_ids
        assert g.generate(p, max_new_tokens=24, drafter="layerskip:2").token_ids == plain


@needs_cuda
def test_cuda_float16_logits_agree_with_cpu_float32(bundles):
    rng = np.random.default_rng(2)
    prompt = rng.integers(3, 384, 40)
    out = {}
    for dtype, device in (("float32", "cpu"), ("float16", "cuda")):
        m = json.load(open(os.path.join(bundles[dtype], "manifest.json")))
        e = Engine(bundles[dtype], m["models"]["target"], threads=1, device=device)
        logits, _ = e.forward(prompt, rows=np.arange(len(prompt)))
        out[dtype] = logits.copy()
    a, b = out["float32"], out["float16"]
    assert np.abs(a - b).max() <= LOGIT_TOLERANCE * np.abs(a).max()


def test_dtypes_without_kernels_on_the_device_are_refused():
    from speccompile.runtime.engine import check_device_dtype
    with pytest.raises(SpeccompileError, match="^device='cuda' runs float16.*--dtype float16"):
        check_device_dtype({"kv_cache": {"dtype": "float32"}, "attention": "ort"}, "cuda")
    with pytest.raises(SpeccompileError, match="generate with device='cuda'"):
        check_device_dtype({"kv_cache": {"dtype": "bfloat16"}, "attention": "ort"}, "cpu")
    for dtype, device in (("float16", "cuda"), ("bfloat16", "cuda"), ("float32", "cpu"), ("float16", "cpu")):
        check_device_dtype({"kv_cache": {"dtype": dtype}, "attention": "ort"}, device)
    check_device_dtype({"kv_cache": {"dtype": "float32"}, "attention": "reference"}, "cuda")


@pytest.mark.parametrize("choice, wheel", [("cpu", "onnxruntime>="), ("gpu", "onnxruntime-gpu[cuda,cudnn]>=")])
def test_install_depends_on_exactly_one_onnxruntime(tmp_path, choice, wheel):
    """setup.py's dependency list for SPECCOMPILE_ONNXRUNTIME=cpu|gpu: one onnxruntime wheel, never both."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, SPECCOMPILE_ONNXRUNTIME=choice)
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "-e", str(tmp_path)], cwd=root, env=env,
                   check=True, capture_output=True)
    requires = next(tmp_path.glob("*.egg-info")).joinpath("requires.txt").read_text().split("\n[")[0].split()
    runtimes = [r for r in requires if r.startswith("onnxruntime")]
    assert len(runtimes) == 1 and runtimes[0].startswith(wheel), runtimes


def test_device_check_script_parses():
    """tools/gpu_check.sh runs only on a GPU machine: here bash checks that it parses (a typo would cost a lent
    machine's minutes)."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run(["bash", "-n", os.path.join(root, "tools", "gpu_check.sh")], check=True)


def test_gpu_bench_passes_only_divergences_at_ties():
    """tools/gpu_bench.py's verdict: a divergence passes only within 2 units in the last place of the bundle
    dtype at the largest |logit| (float16: 0.0156 at 16-32), never when one output just stops earlier."""
    import importlib.util
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("gpu_bench", os.path.join(root, "tools", "gpu_bench.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.near_tie({"margin": 0.0, "max_abs_logit": 19.3})
    assert bench.near_tie({"margin": -0.031, "max_abs_logit": 30.7})
    assert not bench.near_tie({"margin": 0.033, "max_abs_logit": 30.7})
    assert bench.near_tie({"margin": 0.25, "max_abs_logit": 30.7}, "bfloat16")
    assert not bench.near_tie({"margin": 0.01, "max_abs_logit": 30.7}, "float32")
    assert not bench.near_tie({"position": 5, "prefix_only": True})
    assert bench.first_difference([1, 2, 3], [1, 2, 4]) == (2, 4)
    assert bench.first_difference([1, 2, 3], [1, 2]) == (2, -1)
