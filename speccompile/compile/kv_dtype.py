"""KV cache pass (`build --kv-dtype float16`): float32 graphs whose KV caches hold float16.

A cache row is written once and read on every later step, so its bytes are what a long context (or several
sequence slots of a shared pass) streams per token; half of them halve that. Only speccompile's attention kernel
(`TreeAttentionF16`, plugins/q4_matmul/attention.c) reads a float16 cache under float32 activations: the step's
rotated k and its v are rounded to float16 as they are written, and every cached value is widened exactly as it is
read, so a row reads the same numbers in every pass and speculation stays exact. It is lossy against the float32
cache (docs/results.md measures by how much), hence opt-in.

The pass runs after the graph pass, over every model whose attention is the kernel: its cache inputs and outputs
retyped, its TreeAttention nodes made TreeAttentionF16, its manifest entry's KV cache and signature in float16.
"""
from __future__ import annotations

from onnx import TensorProto

from speccompile.compile.precision import CACHE_PREFIXES, retype_entry
from speccompile.errors import SpeccompileError, given
from speccompile.graphs import KERNEL_DOMAIN

KV_DTYPES = ("float32", "float16")


def check_kv_dtype(kv_dtype: str | None, dtype: str, backend: str) -> None:
    """Refused before any work: a choice this build cannot honour."""
    if kv_dtype is None or kv_dtype == dtype:
        return
    if kv_dtype not in KV_DTYPES:
        raise SpeccompileError(f"{given('kv_dtype', kv_dtype)}: choose {', '.join(KV_DTYPES)}")
    if dtype != "float32":
        raise SpeccompileError(f"{given('dtype', dtype)} keeps its KV caches in {dtype}: "
                               f"{given('kv_dtype', kv_dtype)} goes with {given('dtype', 'float32')} only")
    if backend != "onnxruntime":
        raise SpeccompileError(f"{given('kv_dtype', kv_dtype)}: TensorRT's attention plugin reads float32 caches; "
                               f"build with {given('backend', 'onnxruntime')}")


def apply_kv_dtype(parts, kv_dtype: str | None, attention: str, progress=print) -> None:
    """The pass over the graph pass's BundleParts, in place (a float32 build asking for float16 caches)."""
    if kv_dtype in (None, "float32"):
        return
    if attention != "kernel":
        raise SpeccompileError(f"{given('kv_dtype', kv_dtype)} needs speccompile's attention kernel, and this build "
                               f"lowers attention as {attention!r}: build with {given('attention', 'kernel')} "
                               "(a model that rotates whole heads, over speccompile's kernels)")
    kernel = [n for n, e in parts.models.items() if "kv_cache" in e and e.get("attention") == "kernel"]
    for name in kernel:
        _retype_graph(parts.graphs[name][0])
        retype_entry(parts.models[name], kv_dtype)
    progress(f"      KV caches in float16: {', '.join(kernel)} (lossy against float32 caches, opt-in)")


def _retype_graph(g) -> None:
    for v in (*g.inputs, *g.outputs):
        if v.name.startswith(CACHE_PREFIXES):
            v.type.tensor_type.elem_type = TensorProto.FLOAT16
    for node in g.nodes:
        if node.domain == KERNEL_DOMAIN and node.op_type == "TreeAttention":
            node.op_type = "TreeAttentionF16"
