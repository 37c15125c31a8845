"""`generate --backend tensorrt`: a model's TensorRT engine (`build --backend tensorrt`) behind the Engine interface.

The engine runs on the GPU with its KV cache in device memory: a DeviceKVCache (onnxruntime OrtValues on `cuda`,
compacted by the bundle's compaction graph through onnxruntime's CUDA provider), whose buffers the engine reads
and writes in place (past and present at one address). A pass copies the step's small inputs to the device, runs
the engine, and copies back next_token, the hidden states and, when the caller reads them, the logits rows.
TensorRT has no float64, so these engines have no verify extension (`verifies` is false): acceptance runs on the
host from the verify block's logits.

Every buffer is an OrtValue: onnxruntime's copies (`update_inplace`, `numpy`) are synchronous cudaMemcpy calls on
CUDA's legacy default stream, the stream the engine is enqueued on, so they are ordered after its work without
any CUDA Python package. The TreeAttention plugin library is this installation's build (or
$SPECCOMPILE_TRT_PLUGIN), never the copy inside the bundle.
"""
from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort

from speccompile.errors import BundleError, SpeccompileError, given
from speccompile.format.bundle import resolve_inside
from speccompile.graphs import MAX_STEP_TOKENS
from speccompile.plugins.tree_attention.tensorrt_plugin import (BUILD_PLUGIN, cuda_gpu, load_plugin,
                                                               plugin_library_path)
from speccompile.runtime.kv_cache import DeviceKVCache
from speccompile.runtime.sessions import NEG_INF, ancestor_mask, open_session, providers_for, session_options

LEGACY_DEFAULT_STREAM = 0
# how a caller asks for the TensorRT engines: device="tensorrt" in Python, --backend tensorrt on the command line
TENSORRT = given("device", "tensorrt", flag="--backend")


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise SpeccompileError(f"{TENSORRT} needs TensorRT's Python package ({e}): on a machine with an "
                               "NVIDIA GPU, pip install -e '.[tensorrt]' (docs/gpu.md)") from None
    return trt


class TensorRTEngine:
    """What Engine(..., device="tensorrt") makes (Engine.__new__): the same interface (`forward`, `cache`,
    `hidden`, ...) over a model's TensorRT engine."""

    buffer_device = "cuda"  # tests drive the same code with "cpu" OrtValues and a stand-in for TensorRT

    def __init__(self, bundle_dir: str, entry: dict, threads: int | None = None, device: str = "tensorrt",
                 max_rows: int = 64, prepack: bool = True, cache=None):
        if cache is not None:  # sequence slots are for the onnxruntime CPU path (Generator binds none here)
            raise SpeccompileError("TensorRT engines keep their own device caches: no batched cache slots")
        if "tensorrt" not in entry:
            raise SpeccompileError("this bundle has no TensorRT engines: build it with --backend tensorrt")
        self.entry, self.device, self.max_rows, self.verifies = entry, device, max_rows, False
        self.verifies_sampled = False
        # built without the exact greedy head (runtime/noise.py samples on the host)
        self.takes_noise = self.takes_noise_top_k = False
        self.trt = trt = import_tensorrt()
        self.engine = self._deserialize(resolve_inside(bundle_dir, entry["tensorrt"]["engine"]))
        self.context = self.engine.create_execution_context()
        kv = entry["kv_cache"]
        self.num_layers = entry["num_layers"]
        self.vocab_size = next(o["shape"][1] for o in entry["outputs"] if o["name"] == "logits")
        self.max_seq_len = kv["max_seq_len"]
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.types = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self.input_names = {n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT}
        providers = providers_for("cuda" if self.buffer_device == "cuda" else "cpu")
        compact = open_session(resolve_inside(bundle_dir, entry["kv_compact"]), session_options(1), providers)
        self.cache = DeviceKVCache(self.num_layers, kv["num_kv_heads"], self.max_seq_len, kv["head_dim"],
                                   kv.get("dtype", "float32"), self.buffer_device, compact)
        for name, ov in self.cache.ortvalues():  # bound once, in place
            for io in (f"past_{name}", f"present_{name}"):
                self.context.set_tensor_address(io, ov.data_ptr())
        hidden = entry["config"]["hidden_size"]
        self.hidden = np.zeros((MAX_STEP_TOKENS, hidden), np.float32)
        aux = next((o["shape"][1] for o in entry["outputs"] if o["name"] == "aux_hidden_states"), 0)
        self.aux = np.zeros((MAX_STEP_TOKENS, aux), np.float32) if aux else None
        self.logits = np.zeros((max_rows, self.vocab_size), np.float32)
        self.next_token = np.zeros((max_rows,), np.int64)
        self._buffers: dict[tuple[str, tuple[int, ...]], ort.OrtValue] = {}
        self.weight_bytes = sum(os.path.getsize(resolve_inside(bundle_dir, w)) for w in entry["weights"])

    def _deserialize(self, path: str):
        trt = self.trt
        library = plugin_library_path()
        if not os.path.isfile(library):
            raise SpeccompileError(f"{TENSORRT} needs the TreeAttention plugin library {library}: build it "
                                   f"({BUILD_PLUGIN}) or set $SPECCOMPILE_TRT_PLUGIN")
        if self.buffer_device == "cuda":  # TensorRT's own failure without one is a bare TypeError
            gpu, why = cuda_gpu()
            if gpu is None:
                raise SpeccompileError(f"{TENSORRT} needs a CUDA GPU: {why}")
        load_plugin(trt, library)
        try:
            self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        except TypeError as e:  # pybind11's "factory function returned nullptr": CUDA could not start
            raise SpeccompileError(f"TensorRT could not start its runtime on this GPU ({e})") from None
        with open(path, "rb") as f:
            engine = self._runtime.deserialize_cuda_engine(f.read())
        if engine is None:
            raise BundleError(f"TensorRT could not load {os.path.basename(path)} (built for another TensorRT "
                              "version or GPU: rebuild the bundle here with --backend tensorrt)")
        return engine

    def forward(self, tokens: np.ndarray, positions: np.ndarray | None = None, parents: np.ndarray | None = None,
                rows: np.ndarray | None = None, committed: int | None = None, hidden_in: np.ndarray | None = None,
                full_logits: bool = True, noise: np.ndarray | None = None):
        """As Engine.forward (its docstring): one step of S tokens, its K/V written at slots [length, length+S).
        The engines are built without the exact greedy head, so without its noise input (`takes_noise` false)."""
        if noise is not None:
            raise SpeccompileError("TensorRT engines take no sample_noise: sampling runs on the host")
        feeds, R = self._step_inputs(tokens, positions, parents, rows, committed, hidden_in)
        S = len(tokens)
        outputs = {"logits": (R, self.vocab_size), "next_token": (R,), "hidden_states": (S, self.hidden.shape[1])}
        if self.aux is not None:
            outputs["aux_hidden_states"] = (S, self.aux.shape[1])
        for name, array in feeds.items():
            ov = self._buffer(name, array.shape)
            ov.update_inplace(np.ascontiguousarray(array, self.types[name]))
            if not self.context.set_input_shape(name, array.shape):  # False: the engine's profile refuses it
                raise BundleError(f"the TensorRT engine refuses input {name} of shape {tuple(array.shape)}: "
                                  "rebuild the bundle with --backend tensorrt")
            self.context.set_tensor_address(name, ov.data_ptr())
        for name, shape in outputs.items():
            self.context.set_tensor_address(name, self._buffer(name, shape).data_ptr())
        if not self.context.execute_async_v3(LEGACY_DEFAULT_STREAM):
            raise SpeccompileError("TensorRT failed to run the engine (its log above says why)")
        self.next_token[:R] = self._buffers["next_token", (R,)].numpy()  # synchronous: after the engine's work
        self.hidden[:S] = self._buffers["hidden_states", outputs["hidden_states"]].numpy()
        if self.aux is not None:
            self.aux[:S] = self._buffers["aux_hidden_states", outputs["aux_hidden_states"]].numpy()
        if full_logits:
            self.logits[:R] = self._buffers["logits", (R, self.vocab_size)].numpy()
        return self.logits[:R], self.next_token[:R]

    def verify(self, *args, **kwargs):
        raise SpeccompileError("TensorRT engines have no verify extension: acceptance runs on the host")

    def _step_inputs(self, tokens, positions, parents, rows, committed, hidden_in) -> tuple[dict, int]:
        """The step's inputs as host arrays (the attention bias LMAX wide, as the engines take it), and R."""
        S, W = len(tokens), self.cache.length
        C = W if committed is None else committed
        if S > MAX_STEP_TOKENS:
            raise SpeccompileError(f"step of {S} tokens: at most {MAX_STEP_TOKENS} per pass")
        if W + S > self.max_seq_len:
            raise SpeccompileError(f"step of {S} tokens at length {W} exceeds the compiled context "
                                   f"{self.max_seq_len}")
        rows = np.array([S - 1]) if rows is None else np.asarray(rows)
        if len(rows) > self.max_rows:
            raise SpeccompileError(f"{len(rows)} logits rows requested; at most {self.max_rows}")
        region = W + S - C
        bias = np.full((1, 1, S, self.max_seq_len), NEG_INF, np.float32)
        bias[0, 0, :, :C] = 0.0
        visible = (np.tril(np.ones((region, region), bool)) if parents is None else ancestor_mask(parents))[-S:]
        np.copyto(bias[0, 0, :, C:W + S], 0.0, where=visible)
        feeds = {"input_ids": np.asarray(tokens).reshape(1, S),
                 "position_ids": (W + np.arange(S) if positions is None else np.asarray(positions)).reshape(1, S),
                 "seqlens_k": np.array([W + S - 1]), "attention_bias": bias, "logits_index": rows}
        if hidden_in is not None:
            feeds["hidden_in"] = np.asarray(hidden_in, np.float32).reshape(1, S, -1)
        missing = self.input_names - set(feeds) - {n for n in self.input_names if n.startswith("past_")}
        if missing:
            raise BundleError(f"the TensorRT engine takes inputs this runtime does not feed: {sorted(missing)}")
        return feeds, len(rows)

    def _buffer(self, name: str, shape: tuple[int, ...]) -> ort.OrtValue:
        """The device buffer for `name` at `shape`, allocated on first use (steps take a few distinct shapes)."""
        key = (name, tuple(shape))
        ov = self._buffers.get(key)
        if ov is None:
            ov = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), self.types[name].type, self.buffer_device, 0)
            self._buffers[key] = ov
        return ov
