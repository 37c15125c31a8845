"""onnxruntime sessions as the runtime opens them (options, providers per device, one error for a graph that will
not load), and the attention bias's tree mask: shared by the onnxruntime Engine and the TensorRT engine."""
from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort

from speccompile.format.requirements import opset_imports
from speccompile.graphs import KERNEL_DOMAIN, cache_slots
from speccompile.plugins import q4_matmul
from speccompile.errors import BundleError, SpeccompileError, given

NEG_INF = np.float32(-np.inf)
# onnxruntime starts every intra-op thread it is asked for, at session creation: an absurd count must not reach it
MAX_THREADS = 256


def check_threads(threads) -> None:
    """threads: None (all cores) or a whole number from 1 to MAX_THREADS."""
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or not 1 <= threads <= MAX_THREADS:
        raise SpeccompileError(f"{given('threads', threads)}: must be a whole number from 1 to {MAX_THREADS} "
                               "(or left unset for all cores)")


def session_options(threads: int | None, prepack: bool = True) -> ort.SessionOptions:
    """prepack=False keeps a session's matrices in the memory-mapped weight file, shared with every other session
    that maps it; pre-packing gives the session a private re-laid-out copy, which makes the multi-row products of
    verification much faster on CPU (single-row products gain nothing; docs/results.md has the figures)."""
    check_threads(threads)
    so = ort.SessionOptions()
    # Workers may spin between the ops of a pass (onnxruntime's default), but stop spinning the moment a pass
    # returns: target and drafters alternate on the same cores, and a finished session's spinning workers would
    # steal them from the one running next (docs/results.md, "Drafter defaults and runtime constants").
    so.add_session_config_entry("session.intra_op.allow_spinning", "1")
    so.add_session_config_entry("session.force_spinning_stop", "1")
    if not prepack:
        so.add_session_config_entry("session.disable_prepacking", "1")
    so.intra_op_num_threads = threads or os.cpu_count() or 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return so


def open_session(path: str, options: ort.SessionOptions, providers: list[str]) -> ort.InferenceSession:
    """Every graph of a bundle is opened here, so a graph onnxruntime cannot load is one BundleError. A graph with
    speccompile's own kernels gets their library (built on first use: speccompile.plugins.q4_matmul)."""
    if _uses_kernels(path):
        try:
            options.register_custom_ops_library(q4_matmul.library())
        except q4_matmul.KernelUnavailable as e:
            raise BundleError(f"{os.path.basename(path)} was built for speccompile's own kernels, which cannot "
                              f"run here ({e}): rebuild the bundle on this machine, or with --kernels onnxruntime "
                              "for any machine") from None
    try:
        return ort.InferenceSession(path, options, providers=providers)
    except Exception as e:  # onnxruntime's error types (Fail, InvalidProtobuf, InvalidGraph, ...) share no base
        raise BundleError(f"onnxruntime cannot load {os.path.basename(path)} (corrupt, or built for another "
                          f"onnxruntime: rebuild the bundle): {e}") from None


def _uses_kernels(path: str) -> bool:
    """Whether the graph at `path` imports speccompile's kernel domain (the graph file only: weights are external)."""
    try:
        with open(path, "rb") as f:
            return any(domain == KERNEL_DOMAIN for domain, _ in opset_imports(f.read()))
    except (OSError, ValueError):
        return False  # onnxruntime's own load then names what is wrong with the file


def run_bound(session: ort.InferenceSession, io: ort.IOBinding, graph: str) -> None:
    """Run `session` over its bindings; a failure is one BundleError naming the graph. onnxruntime raises a plain
    RuntimeError here, not one of its own types as a load does: a graph whose hash matches but whose tensors do not
    fit together (a bad build) would otherwise surface as a bug in speccompile."""
    try:
        session.run_with_iobinding(io)
    except RuntimeError as e:
        raise BundleError(f"onnxruntime could not run {graph} (a graph built wrong or damaged, memory, or a "
                          "speccompile bug: rebuild the bundle, and report it if it persists): "
                          f"{str(e)[:300]}") from None


# onnxruntime providers per device; "tensorrt" runs the bundle's TensorRT engines (Engine.__new__), and any other
# graph (a compaction graph, an EAGLE-3 fc graph) on the CUDA provider
PROVIDERS = {"cpu": ["CPUExecutionProvider"],
             "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
             "tensorrt": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


def providers_for(device: str) -> list[str]:
    if not isinstance(device, str) or device not in PROVIDERS:  # a list is no key of PROVIDERS: a TypeError
        raise SpeccompileError(f"{given('device', device)}: no such device; choose from {', '.join(PROVIDERS)}")
    wanted = PROVIDERS[device]
    if device != "cpu" and hasattr(ort, "preload_dlls"):
        # the CUDA and cuDNN libraries of the nvidia-* wheels onnxruntime-gpu[cuda,cudnn] installs: not on the
        # loader's path otherwise
        ort.preload_dlls()
    if wanted[0] not in ort.get_available_providers():
        raise SpeccompileError(f"device {device!r} needs onnxruntime's {wanted[0]}, which this onnxruntime lacks "
                               f"(available: {', '.join(ort.get_available_providers())}); on a machine with an "
                               "NVIDIA GPU, swap in the GPU onnxruntime (the two wheels must not coexist): "
                               "pip uninstall -y onnxruntime && SPECCOMPILE_ONNXRUNTIME=gpu pip install -e .")
    return wanted


def bind_host(io: ort.IOBinding, bound: dict, name: str, buf: np.ndarray, shape: list[int], output: bool = False,
              rebind_inputs: bool = False) -> None:
    """Bind `buf`'s host memory as `name` with `shape`, unless `bound` (this binding's record) shows that exact
    binding in place: on the CPU, onnxruntime reads and writes bound host memory by address at run time, so
    refilling a buffer needs no new binding. For a graph on a device it copies a host input when it is bound, not
    when the graph runs: there (rebind_inputs) every input is bound again before each pass; outputs are still
    copied back when the graph runs. The binding is `shape` at `buf`'s address: a buffer larger than the shape binds
    its first elements, so a pass binds an engine's own buffers, the same objects each time, whose address is read
    once (reading `ndarray.ctypes.data` costs more than the rest of a binding that stands)."""
    last = bound.get(name)
    address = last[0] if last is not None and last[2] is buf else buf.ctypes.data
    if last is None or last[:2] != (address, tuple(shape)) or (rebind_inputs and not output):
        (io.bind_output if output else io.bind_input)(name, "cpu", 0, buf.dtype.type, shape, address)
    bound[name] = (address, tuple(shape), buf)


def ancestor_mask(parents: np.ndarray) -> np.ndarray:
    """[S, S] bool: mask[i, j] = node j is node i or one of its ancestors. parents[i] < i, -1 for a root."""
    S = len(parents)
    m = np.eye(S, dtype=bool)
    for i in range(S):
        p = parents[i]
        if p >= 0:
            if p >= i:
                raise ValueError("tree nodes must be in topological order (parent before child)")
            m[i] |= m[p]
    return m


def check_graph(session: ort.InferenceSession, entry: dict, widths: dict[str, int]) -> None:
    """The graph is the one the manifest describes: its signature, KV cache inputs and output widths."""
    check_signature(session, entry)
    check_cache_inputs(session, entry)
    check_output_widths(session, entry, widths)


def check_signature(session: ort.InferenceSession, entry: dict) -> None:
    """The graph takes no input the manifest does not list and gives every output it lists: the runtime binds what
    the manifest names, and a graph of another signature (one swapped for another model's, then re-hashed) would
    otherwise fail only mid-run, on an input left unbound or an output it lacks."""
    listed_inputs = {i["name"] for i in entry["inputs"]}
    unlisted = sorted(i.name for i in session.get_inputs() if i.name not in listed_inputs)
    graph_outputs = {o.name for o in session.get_outputs()}
    missing = sorted(o["name"] for o in entry["outputs"] if o["name"] not in graph_outputs)
    if unlisted or missing:
        what = (f"takes inputs the manifest does not list ({', '.join(unlisted[:4])})" if unlisted else
                f"lacks outputs the manifest lists ({', '.join(missing[:4])})")
        raise BundleError(f"{entry['graph']}: the graph {what}; rebuild the bundle")


def check_output_widths(session: ort.InferenceSession, entry: dict, widths: dict[str, int]) -> None:
    """The graph's [rows, width] outputs are as wide as the manifest says (the runtime sizes its buffers from
    the manifest before a pass could show a difference)."""
    for o in session.get_outputs():
        want = widths.get(o.name)
        if want is not None and len(o.shape) == 2 and isinstance(o.shape[1], int) and o.shape[1] != want:
            raise BundleError(f"{entry['graph']}: the manifest gives {o.name} a width of {want}, the graph "
                              f"{o.shape[1]}; rebuild the bundle")


def check_cache_inputs(session: ort.InferenceSession, entry: dict) -> None:
    """The graph's KV cache inputs are the layers and length the manifest says: a hand-edited count or length
    would leave inputs unbound (or bind ones the graph lacks, or caches of the wrong size), which onnxruntime
    reports only mid-run."""
    caches = [i for i in session.get_inputs() if i.name.startswith("past_key.")]
    if len(caches) != entry["num_layers"]:
        raise BundleError(f"{entry['graph']}: the manifest says {entry['num_layers']} layers, the graph has "
                          f"{len(caches)} caches; rebuild the bundle")
    kv = entry["kv_cache"]
    lengths = {i.shape[2] for i in caches if isinstance(i.shape[2], int)}
    if lengths and lengths != {cache_slots(kv)}:
        raise BundleError(f"{entry['graph']}: the manifest's KV cache holds {cache_slots(kv)} "
                          f"slots, the graph's {sorted(lengths)[0]}; rebuild the bundle")
    for i in caches:  # [batch, kv heads, slots, head dim]: the runtime sizes the cache from the manifest
        for axis, field in ((1, "num_kv_heads"), (3, "head_dim")):
            if len(i.shape) != 4 or isinstance(i.shape[axis], int) and i.shape[axis] != kv[field]:
                raise BundleError(f"{entry['graph']}: the manifest's KV cache has {field} {kv[field]}, the graph's "
                                  f"{i.name} is shaped {i.shape}; rebuild the bundle")
