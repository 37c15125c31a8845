"""The files a bundle's ONNX graphs read besides themselves: the external data of their tensors.

An initializer (or a Constant node's tensor) stored outside its graph names the file that holds it, relative to
the graph's folder, and onnxruntime opens whatever file that names when it loads the graph: `../../etc/passwd`
or an absolute path too, in the releases that do not check the path themselves. So before any graph is opened,
every such name must be a file the manifest lists: inside the bundle and hashed, like every other file it reads.

The names are read from the graph's protobuf without the onnx package (which the runtime does not install),
walking only the messages that lead to a TensorProto (field numbers from onnx.proto).
"""
from __future__ import annotations

import os

from speccompile.errors import BundleError
from speccompile.format.paths import resolve_inside
from speccompile.format.requirements import protobuf_fields

# message -> {field number: the message that field holds}, every path from a ModelProto down to a tensor's
# external_data entries (StringStringEntryProto: key 1, value 2)
_CHILDREN = {
    "model": {7: "graph", 25: "function"},
    "function": {7: "node"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},  # nodes, initializers, sparse initializers
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},  # values, indices
    "tensor": {13: "entry"},  # external_data
}
_KEY, _VALUE = 1, 2


def external_locations(model_proto: bytes) -> set[str]:
    """Every external-data location a serialized ModelProto names, at any depth (subgraphs, functions). A message
    cut short is read up to the cut: onnxruntime refuses such a graph whole, so it reads nothing it names."""
    found, stack = set(), [("model", memoryview(model_proto))]
    while stack:  # not recursive: a graph's nesting must not reach Python's recursion limit
        kind, buf = stack.pop()
        try:
            for field, value in protobuf_fields(buf):
                child = _CHILDREN[kind].get(field)
                if child is None or not isinstance(value, memoryview):
                    continue
                if child == "entry":
                    entry = dict(protobuf_fields(value))
                    if bytes(entry.get(_KEY, b"")) == b"location":
                        found.add(bytes(entry.get(_VALUE, b"")).decode("utf-8", "surrogateescape"))
                else:
                    stack.append((child, value))
        except IndexError:  # a varint cut short: the end of what can be read
            continue
    return found


def check_graph_data(bundle_dir: str, m: dict) -> None:
    """Refuse a bundle one of whose graphs reads tensor data from a file the manifest does not list (outside the
    bundle, or not hashed). The graphs: those the runtime gives onnxruntime, every model's graph and KV compaction
    graph."""
    listed = {os.path.normpath(rel) for rel in m["files"]}
    graphs = {rel for model in m["models"].values() for rel in (model["graph"], model.get("kv_compact")) if rel}
    for graph in sorted(graphs):
        _check_graph(bundle_dir, graph, listed)


def _check_graph(bundle_dir: str, graph: str, listed: set[str]) -> None:
    path = resolve_inside(bundle_dir, graph)  # what onnxruntime is given: locations are relative to its folder
    if os.path.normpath(graph) not in listed:
        raise BundleError(f"manifest names {graph!r}, which has no hash entry")
    with open(path, "rb") as f:
        data = f.read()
    try:
        locations = external_locations(data)
    except ValueError as e:  # a protobuf group or an invalid wire type: nothing a build writes
        raise BundleError(f"{graph} is not an ONNX graph a build writes ({e}); rebuild the bundle") from None
    root = os.path.realpath(bundle_dir)
    for location in sorted(locations):
        try:  # an absolute location stays absolute in the join
            read = resolve_inside(bundle_dir, os.path.relpath(os.path.join(os.path.dirname(path), location), root))
        except BundleError:  # outside the bundle: a '..', an absolute path, a link out
            read = None
        if read is None or os.path.relpath(read, root) not in listed:
            raise BundleError(f"{graph} reads tensor data from {location!r:.200}, a file the manifest does not list "
                              "(nothing outside the bundle or without a hash is read); rebuild the bundle")
