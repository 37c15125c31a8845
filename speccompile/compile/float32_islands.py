"""Float32 islands in a bfloat16 graph: ops without a bfloat16 kernel run on float32 copies of their bfloat16
inputs, their bfloat16 outputs cast back (float32 holds every bfloat16 exactly, so no value changes).

onnxruntime's float16 converter can keep op types in float32 itself (op_block_list), but only where onnx's shape
inference knows the inputs' types (not past a com.microsoft op), and it puts the casts of a subgraph's node into
the outer graph; so bfloat16 graphs get their islands here, after conversion, from the types `tensor_types`
follows through every node.
"""
from __future__ import annotations

from onnx import TensorProto, helper

BOOL_OPS = {"Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "Not", "And", "Or", "Xor", "IsNaN", "IsInf"}
INT64_OPS = {"Shape", "Size", "ArgMax", "ArgMin", "NonZero"}


def tensor_types(graph, outer: dict[str, int] | None = None) -> dict[str, int]:
    """Element type of every tensor `graph` (and, under their own names, its subgraphs) reads or makes."""
    types = dict(outer or {})
    for v in (*graph.input, *graph.output, *graph.value_info):
        if v.type.tensor_type.elem_type:
            types[v.name] = v.type.tensor_type.elem_type
    types.update({t.name: t.data_type for t in graph.initializer})
    for node in graph.node:
        for i, out in enumerate(node.output):
            kind = _output_type(node, i, types)
            if out and kind:
                types[out] = kind
        for g in _subgraphs(node):
            types.update(tensor_types(g, types))
    return types


def _output_type(node, index: int, types: dict[str, int]) -> int | None:
    attrs = {a.name: a for a in node.attribute}
    if node.op_type == "Cast":
        return attrs["to"].i
    if node.op_type in BOOL_OPS:
        return TensorProto.BOOL
    if node.op_type in INT64_OPS or (node.op_type == "TopK" and index == 1):
        return TensorProto.INT64
    if node.op_type in ("Constant", "ConstantOfShape"):
        return attrs["value"].t.data_type if "value" in attrs else TensorProto.FLOAT
    if node.op_type == "If":
        return attrs["then_branch"].g.output[index].type.tensor_type.elem_type or None
    data = node.input[1:] if node.op_type == "Where" else node.input
    return next((types[x] for x in data if x in types), None)


def _subgraphs(node):
    for a in node.attribute:
        yield from ([a.g] if a.HasField("g") else []) + list(a.graphs)


def add_float32_islands(graph, op_types: set[str], outer: dict[str, int] | None = None) -> int:
    """Wrap every node of `op_types` reading bfloat16 in casts (subgraphs included); returns how many."""
    types = tensor_types(graph, outer)
    nodes, wrapped = [], 0
    for node in graph.node:
        for g in _subgraphs(node):
            wrapped += add_float32_islands(g, op_types, types)
        if node.op_type not in op_types or not any(types.get(x) == TensorProto.BFLOAT16 for x in node.input):
            nodes.append(node)
            continue
        wrapped += 1
        for i, x in enumerate(node.input):
            if types.get(x) == TensorProto.BFLOAT16:
                if f"{x}_f32_{node.name}" not in node.input:  # one cast for an input read twice
                    nodes.append(helper.make_node("Cast", [x], [f"{x}_f32_{node.name}"], to=TensorProto.FLOAT,
                                                  name=f"{node.name}_in{i}_to_float"))
                node.input[i] = f"{x}_f32_{node.name}"
        back = []
        for i, out in enumerate(node.output):
            if out and types.get(out) == TensorProto.BFLOAT16:
                node.output[i] = f"{out}_f32"
                back.append(helper.make_node("Cast", [f"{out}_f32"], [out], to=TensorProto.BFLOAT16,
                                             name=f"{node.name}_out{i}_to_bfloat16"))
        nodes += [node, *back]
    copies = [type(n)() for n in nodes]  # copied before the field they belong to is cleared
    for new, old in zip(copies, nodes):
        new.CopyFrom(old)
    del graph.node[:]
    graph.node.extend(copies)
    return wrapped
