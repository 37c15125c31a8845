"""Precision pass (`build --dtype`): a bundle's graphs, weights and KV caches in float16 or bfloat16.

The float32 graphs are converted by onnxruntime's own float16 converter (onnxruntime.transformers.float16), not
rewritten block by block: it retypes every float tensor, converts the initializers, and puts Cast nodes around the
ops kept in float32. What stays float32, and why:

  * the graph's float inputs and outputs other than the caches (attention_bias, logits, hidden states, hidden_in):
    the runtime's buffers and the drafters' code stay as they are, and a pass's small inputs are cast in the graph;
  * the KV caches (past_* / present_*) take the build's dtype: they are the memory a long context fills;
  * norms (SimplifiedLayerNormalization, SkipSimplifiedLayerNormalization) and the attention softmax keep float16
    inputs and outputs: onnxruntime's kernels accumulate them in float32 internally;
  * the verify extension is converted with the rest, so its softmax of logits / T runs in float16: the runtime
    uses it for greedy passes only (an argmax), and accepts sampled drafts on the host from the float32 logits
    output, in float64 (Engine.verifies_sampled).

bfloat16 is the float16 conversion retyped (`_retype_bfloat16`): onnxruntime's CPU provider lacks bfloat16 kernels
for most ops (MatMul, GroupQueryAttention), so bfloat16 bundles are for the CUDA provider.

The weights stay in the bundle's weight files (external data): the converter sees the initializers' shapes only,
which keeps graphs of any size under protobuf's 2 GB, and this pass casts the arrays of the initializers it retyped.
"""
from __future__ import annotations

import numpy as np

from speccompile.compile.float32_islands import add_float32_islands
from speccompile.errors import SpeccompileError, given
from speccompile.graphs.builder import node_reads

DTYPES = ("float32", "float16", "bfloat16")
# ops every converted graph keeps in float32, Cast nodes around them (none so far: MatMulNBits, the int8 draft
# heads' product, converts with its scales and has float16 kernels on the CPU and CUDA providers). A blocked op
# must have its inputs' types known to onnx's shape inference: the converter casts only what it can see.
FLOAT32_OPS: tuple[str, ...] = ()
# ops bfloat16 graphs run in float32 besides (compile/float32_islands.py): those the CUDA provider refused in
# bfloat16 (Pad, Greater, ReduceMin) and the comparisons and reductions beside them in the same graphs, kept in
# float32 without checking each (casts around them cost next to nothing)
BFLOAT16_FLOAT32_OPS = ("ArgMax", "Equal", "Greater", "Less", "Max", "Pad", "ReduceMax", "ReduceMin", "Where")
CACHE_PREFIXES = ("past_", "present_")
FLOAT16_MAX = float(np.finfo(np.float16).max)


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise SpeccompileError(f"{given('dtype', dtype)}: choose {', '.join(DTYPES)}")


def numpy_dtype(dtype: str):
    """The numpy type of a bundle dtype (bfloat16 through ml_dtypes, which onnx depends on)."""
    if dtype == "bfloat16":
        import ml_dtypes
        return ml_dtypes.bfloat16
    return np.dtype(dtype).type


class ConvertedGraph:
    """A converted graph as the write pass uses a GraphBuilder: `weights` (name -> (shape, dtype)), `nodes`, and
    `to_model(weight_refs)` pointing the external initializers into the bundle's weight files."""

    def __init__(self, model, weights: dict[str, tuple[tuple[int, ...], str]]):
        self.model, self.weights = model, weights
        self.nodes = model.graph.node
        self.name = model.graph.name

    def to_model(self, weight_refs: dict[str, dict]):
        import onnx
        m = onnx.ModelProto()
        m.CopyFrom(self.model)
        for t in m.graph.initializer:
            if t.name in self.weights:
                del t.external_data[:]
                for key in ("location", "offset", "length"):
                    e = t.external_data.add()
                    e.key, e.value = key, str(weight_refs[t.name][key])
        return m


def convert_graph(graph, dtype: str, keep_float32_ops=()) -> tuple[ConvertedGraph, set[str]]:
    """A GraphBuilder's graph in `dtype` (float16 or bfloat16); returns it and the names of the weights it reads
    in `dtype` (their arrays are the caller's to cast). keep_float32_ops: more op types left in float32."""
    from onnx import TensorProto, helper
    from onnxruntime.transformers import float16

    placeholder = {n: {"location": "weights", "offset": 0, "length": 0} for n in graph.weights}
    model = graph.to_model(placeholder)  # initializers without data: the converter only retypes them
    keep_io = [v.name for v in (*model.graph.input, *model.graph.output)
               if v.type.tensor_type.elem_type == TensorProto.FLOAT and not v.name.startswith(CACHE_PREFIXES)]
    # The converter reads a converted initializer's shape through its data; these have none (external, not
    # yet written), so it is given the shape from the tensor's dims instead.
    from_data = float16.make_value_info_from_tensor
    float16.make_value_info_from_tensor = lambda t: helper.make_tensor_value_info(t.name, t.data_type, t.dims)
    try:
        model = float16.convert_float_to_float16(model, keep_io_types=keep_io, max_finite_val=FLOAT16_MAX,
                                                 op_block_list=list(FLOAT32_OPS) + list(keep_float32_ops))
    finally:
        float16.make_value_info_from_tensor = from_data
    _sort_nodes(model.graph)
    read = _drop_unread_weights(model.graph, set(graph.weights))
    converted = {t.name for t in model.graph.initializer if t.name in read and t.data_type == TensorProto.FLOAT16}
    if dtype == "bfloat16":
        _retype_bfloat16(model.graph)
        add_float32_islands(model.graph, set(BFLOAT16_FLOAT32_OPS))
    weights = {n: (shape, dtype if n in converted else dt) for n, (shape, dt) in graph.weights.items() if n in read}
    return ConvertedGraph(model, weights), converted


def _drop_unread_weights(graph, weights: set[str]) -> set[str]:
    """Remove the initializers of `weights` that no node of `graph` reads, and return those it reads. A graph may
    be handed weights it never reads (an early exit over Gemma 3's sliding layers alone gets the global layers'
    RoPE tables too): the converter leaves those in float32, and the same weight read in float16 by another graph
    would then need two copies."""
    read = weights.intersection(x for n in graph.node for x in node_reads(n))
    unread = [t for t in graph.initializer if t.name in weights and t.name not in read]
    for t in unread:
        graph.initializer.remove(t)
    return read


def _sort_nodes(graph) -> None:
    """Topological order (ONNX requires it; the converter appends the Casts of the graph's inputs at the end),
    otherwise the order the nodes had, in the graph and its subgraphs. A node with subgraphs depends on what they
    read from outside too."""
    produced = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    needs = [[produced[x] for x in node_reads(n) if x in produced] for n in graph.node]
    done, order = set(), []

    def visit(i):  # depth first; the graphs are DAGs of a few thousand nodes at most
        stack = [(i, iter(needs[i]))]
        while stack:
            j, deps = stack[-1]
            d = next((d for d in deps if d not in done), None)
            if d is None:
                stack.pop()
                if j not in done:
                    done.add(j)
                    order.append(graph.node[j])
            else:
                stack.append((d, iter(needs[d])))

    for i in range(len(graph.node)):
        visit(i)
    for n in order:  # the converter appends the Casts it puts inside a subgraph at its end too
        for a in n.attribute:
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                _sort_nodes(g)
    nodes = [type(n)() for n in order]
    for new, old in zip(nodes, order):
        new.CopyFrom(old)
    del graph.node[:]
    graph.node.extend(nodes)


def _retype_bfloat16(graph) -> None:
    """Every float16 type, Cast target and embedded constant of `graph` (and its subgraphs) as bfloat16."""
    from onnx import AttributeProto, TensorProto, numpy_helper

    def retype_tensor(t):
        if t.data_type != TensorProto.FLOAT16:
            return
        if t.data_location == TensorProto.EXTERNAL:  # a weight: its array is cast by the caller
            t.data_type = TensorProto.BFLOAT16
            return
        array = numpy_helper.to_array(t).astype(np.float32).astype(numpy_dtype("bfloat16"))
        t.CopyFrom(numpy_helper.from_array(array, t.name))

    for v in (*graph.input, *graph.output, *graph.value_info):
        if v.type.tensor_type.elem_type == TensorProto.FLOAT16:
            v.type.tensor_type.elem_type = TensorProto.BFLOAT16
    for t in graph.initializer:
        retype_tensor(t)
    for node in graph.node:
        for a in node.attribute:
            if node.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT16:
                a.i = TensorProto.BFLOAT16
            elif a.type == AttributeProto.TENSOR:
                retype_tensor(a.t)
            elif a.type == AttributeProto.GRAPH:
                _retype_bfloat16(a.g)
            elif a.type == AttributeProto.GRAPHS:
                for g in a.graphs:
                    _retype_bfloat16(g)


def cast_weights(weights: dict[str, np.ndarray], names: set[str], dtype: str) -> dict[str, np.ndarray]:
    """`weights` with the arrays named in `names` cast to `dtype` (float16: clipped to its finite range)."""
    target = numpy_dtype(dtype)
    out = {}
    for n, a in weights.items():
        if n in names and a.dtype == np.float32:
            a = np.clip(a, -FLOAT16_MAX, FLOAT16_MAX) if dtype == "float16" else a
            a = a.astype(target)
        out[n] = a
    return out


def apply_precision(parts, dtype: str, progress=print, keep_float32_ops=()) -> None:
    """The precision pass over the graph pass's BundleParts, in place: each graph converted, the weights its
    converted initializers name cast, each model entry's KV cache and cache inputs/outputs in `dtype`. A weight
    shared by two graphs must be converted in both or in neither (one copy on disk)."""
    check_dtype(dtype)
    if dtype == "float32":
        return
    progress(f"      precision: graphs, weights and KV caches in {dtype}")
    converted_by: dict[str, set[str]] = {}  # weight -> graphs reading it in dtype
    readers: dict[str, set[str]] = {}  # weight -> graphs reading it
    for name, (g, wfiles) in list(parts.graphs.items()):
        new, converted = convert_graph(g, dtype, keep_float32_ops)
        parts.graphs[name] = (new, wfiles)
        for w in new.weights:
            readers.setdefault(w, set()).add(name)
        for w in converted:
            converted_by.setdefault(w, set()).add(name)
        retype_entry(parts.models[name], dtype)
    mixed = sorted(w for w, gs in converted_by.items() if gs != readers[w])
    if mixed:
        raise SpeccompileError(f"{given('dtype', dtype)}: weight {mixed[0]!r} would be {dtype} in one graph and "
                               f"float32 in another; build with {given('dtype', 'float32')}")
    for fname, tensors in parts.weights.items():
        parts.weights[fname] = cast_weights(tensors, set(converted_by), dtype)


def retype_entry(entry: dict, dtype: str) -> None:
    """A model entry's KV cache and its cache inputs/outputs in `dtype`."""
    if "kv_cache" in entry:
        entry["kv_cache"]["dtype"] = dtype
    for io in (*entry.get("inputs", ()), *entry.get("outputs", ())):
        if io["name"].startswith(CACHE_PREFIXES) and io["dtype"] == "float32":
            io["dtype"] = dtype
