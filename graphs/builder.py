"""A small ONNX graph builder: named nodes, constants, and initializers kept out of the graph proto.

Initializers are referenced by name only; the write pass stores each distinct weight once in the bundle's
weight file, so several graphs (target, early-exit draft) share one copy on disk and in memory.
"""
from __future__ import annotations

import itertools

import numpy as np
import onnx
from onnx import TensorProto, helper

OPSET = 24  # RotaryEmbedding-23, TensorScatter-24 and Attention-24 for the reference lowering
_DTYPES = {"float32": TensorProto.FLOAT, "int64": TensorProto.INT64, "int32": TensorProto.INT32,
           "float64": TensorProto.DOUBLE, "bool": TensorProto.BOOL,
           "uint8": TensorProto.UINT8}


class GraphBuilder:
    def __init__(self, name: str):
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.constants: list[onnx.TensorProto] = []  # small tensors embedded in the graph
        self.weights: dict[str, tuple[tuple[int, ...], str]] = {}  # name -> (shape, dtype), stored externally
        self._counter = itertools.count(1)
        self.shared: dict = {}  # what several nodes of the graph reuse, emitted once (e.g. an op's padded inputs)

    def fresh(self, hint: str) -> str:
        return f"{hint}_{next(self._counter)}"

    def branch(self, name: str) -> "GraphBuilder":
        """A builder for an If branch. It shares this graph's numbering, so its names never shadow outer ones
        (which it may read directly, weights included)."""
        b = GraphBuilder(name)
        b._counter, b.weights = self._counter, self.weights
        return b

    def subgraph(self, outputs) -> onnx.GraphProto:
        """This branch as a GraphProto; outputs: (name, dtype) pairs."""
        return helper.make_graph(self.nodes, self.name, [],
                                 [helper.make_tensor_value_info(n, _DTYPES[dt], None) for n, dt in outputs],
                                 initializer=self.constants)

    def op(self, op_type: str, inputs, n_out: int = 1, outputs=None, domain: str | None = None, **attrs):
        outputs = outputs or [self.fresh(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), list(outputs), name=self.fresh(op_type),
                                           domain=domain, **attrs))
        return outputs

    def const(self, value: np.ndarray) -> str:
        name = self.fresh("const")
        self.constants.append(onnx.numpy_helper.from_array(np.asarray(value), name))
        return name

    def weight(self, name: str, array: np.ndarray) -> str:
        self.weights[name] = (tuple(array.shape), str(array.dtype))
        return name

    def drop_unread_weights(self) -> None:
        """Forget the weights no node reads (If branches' nodes included): a graph declares every weight its
        builder may use, and one it does not need stays out of the bundle (e.g. a tied embedding gathered from the
        output head's int8 rows instead)."""
        read = {x for n in self.nodes for x in node_reads(n)}
        self.weights = {n: v for n, v in self.weights.items() if n in read}

    def input(self, name: str, dtype: str, shape, default=None) -> str:
        """default: makes the input optional (an initializer of the same name, which a feed overrides)."""
        self.inputs.append(helper.make_tensor_value_info(name, _DTYPES[dtype], shape))
        if default is not None:
            self.constants.append(onnx.numpy_helper.from_array(np.asarray(default), name))
        return name

    def output(self, name: str, dtype: str, shape) -> str:
        self.outputs.append(helper.make_tensor_value_info(name, _DTYPES[dtype], shape))
        return name

    def to_model(self, weight_refs: dict[str, dict]) -> onnx.ModelProto:
        """weight_refs: name -> {"location", "offset", "length"} in the bundle's weight file."""
        inits = list(self.constants)
        for name, (shape, dtype) in self.weights.items():
            t = TensorProto(name=name, data_type=_DTYPES[dtype], dims=list(shape))
            t.data_location = TensorProto.EXTERNAL
            ref = weight_refs[name]
            for key in ("location", "offset", "length"):
                e = t.external_data.add()
                e.key, e.value = key, str(ref[key])
            inits.append(t)
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, initializer=inits)
        custom = sorted(_domains(self.nodes) - {"", "ai.onnx", "com.microsoft"})  # e.g. speccompile
        model = helper.make_model(graph, producer_name="speccompile",
                                  opset_imports=[helper.make_opsetid("", OPSET),
                                                 helper.make_opsetid("com.microsoft", 1),
                                                 *(helper.make_opsetid(d, 1) for d in custom)])
        model.ir_version = 11
        return model


def _domains(nodes) -> set[str]:
    """The op domains of `nodes` and of the nodes of their subgraphs (If branches), which the model must import."""
    found = set()
    for n in nodes:
        found.add(n.domain)
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                found |= _domains(a.g.node)
    return found


def node_reads(node) -> list[str]:
    """The tensors a node reads, its subgraphs' reads included."""
    names = list(node.input)
    for a in node.attribute:
        for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
            for n in g.node:
                names += node_reads(n)
    return names
