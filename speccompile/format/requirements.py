"""What a bundle's graphs need from onnxruntime: recorded at build time, checked when the bundle is loaded.

The manifest's `runtime` section names the onnxruntime that built the bundle and the operator domains (with their
opset versions) its graphs import, e.g. {"": 21, "com.microsoft": 1}. On load, a domain this onnxruntime does not
provide is an error: no graph needing it could run. An onnxruntime older than the builder's is only a warning: the
graphs often load in it all the same, and when they do not (an opset it does not know), onnxruntime's own load
error, which the runtime turns into a BundleError, names what is missing. Bundles built before the section was
recorded lack it and are not checked.

The domains are read from each .onnx file's ModelProto without the onnx package (which the runtime does not
install): ModelProto.opset_import is field 8 at the top level of the protobuf, so only the top level is walked.
"""
from __future__ import annotations

import functools
import re
import warnings

import onnxruntime as ort

from speccompile.errors import BundleError
from speccompile.graphs import BATCH_GRAPH_VERSION, DECODER_GRAPH_VERSION, KERNEL_DOMAIN

# the newest graph contract this runtime reads, per model kind that records one (every older one still runs)
READABLE_GRAPH_VERSIONS = {"decoder": DECODER_GRAPH_VERSION, "decoder_batch": BATCH_GRAPH_VERSION,
                           "head_batch": BATCH_GRAPH_VERSION}

_OPSET_IMPORT, _DOMAIN, _VERSION = 8, 1, 2  # ModelProto.opset_import; OperatorSetIdProto.domain and .version
_DEFAULT_DOMAIN_ALIASES = {"ai.onnx": ""}


def runtime_requirements(graph_paths: list[str]) -> dict:
    """The manifest's `runtime` section for these graphs: the building onnxruntime's version and, per operator
    domain any graph imports, the highest opset version imported."""
    domains: dict[str, int] = {}
    for path in graph_paths:
        with open(path, "rb") as f:
            for domain, version in opset_imports(f.read()):
                domains[domain] = max(domains.get(domain, 0), version)
    return {"onnxruntime": ort.__version__, "op_domains": dict(sorted(domains.items()))}


def opset_imports(model_proto: bytes) -> list[tuple[str, int]]:
    """(domain, version) of each opset a serialized ModelProto imports ("" is the default ONNX domain)."""
    out = []
    for field, value in protobuf_fields(model_proto):
        if field == _OPSET_IMPORT:
            entry = dict((f, v) for f, v in protobuf_fields(value))
            domain = bytes(entry.get(_DOMAIN, b"")).decode()
            out.append((_DEFAULT_DOMAIN_ALIASES.get(domain, domain), int(entry.get(_VERSION, 1))))
    return out


def protobuf_fields(buf: bytes):
    """(field number, value) of each field at one level of a protobuf message: varints as ints, length-delimited
    fields as bytes (fixed-width ones skipped)."""
    view, i = memoryview(buf), 0
    while i < len(view):
        key, i = _varint(view, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(view, i)
        elif wire == 2:
            n, i = _varint(view, i)
            value, i = view[i:i + n], i + n
        elif wire in (1, 5):
            value, i = None, i + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"protobuf wire type {wire} is not read here")
        yield field, value


def _varint(view: memoryview, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = view[i]
        i += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, i
        shift += 7


@functools.lru_cache(maxsize=1)
def _operator_schemas() -> tuple | None:
    """This onnxruntime's operator schemas (thousands: read once), or None where its build does not list them."""
    schemas = getattr(ort.capi.onnxruntime_pybind11_state, "get_all_operator_schema", None)
    return tuple(schemas()) if schemas else None


def provided_domains() -> frozenset[str] | None:
    """The operator domains this onnxruntime registers, or None where its build does not list its schemas."""
    schemas = _operator_schemas()
    return None if schemas is None else frozenset(s.domain for s in schemas)


def runs_batched_attention() -> bool:
    """Whether this onnxruntime's GroupQueryAttention takes each sequence's own query rows (its 17th input,
    query_seqlens, which the batched target graph binds; onnxruntime 1.32 added it). Assumed where this build of
    onnxruntime lists no operator schemas."""
    schemas = _operator_schemas()
    if schemas is None:
        return True
    return any(s.name == "GroupQueryAttention" and s.domain == "com.microsoft" and s.max_input >= 17
               for s in schemas)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def check_runtime(requirements: dict | None) -> None:
    """Refuse a bundle whose graphs need an operator domain this onnxruntime lacks; warn when this onnxruntime is
    older than the one that built the bundle."""
    if requirements is None:
        return
    built_with = requirements["onnxruntime"]
    have = provided_domains()
    # speccompile's own kernels come with speccompile (the runtime registers them per session), not onnxruntime
    missing = sorted(d for d in requirements["op_domains"] if have is not None and d not in have
                     and d != KERNEL_DOMAIN)
    if missing:
        raise BundleError(f"the bundle's graphs need operator domains {', '.join(repr(d) for d in missing)}, which "
                          f"this onnxruntime {ort.__version__} does not provide (the bundle was built with "
                          f"onnxruntime {built_with}); install a full onnxruntime >= {built_with}")
    if _version(ort.__version__) < _version(built_with):
        warnings.warn(f"this onnxruntime {ort.__version__} is older than the {built_with} that built the bundle; "
                      "if its graphs fail to load, upgrade onnxruntime", stacklevel=3)


def check_graph_versions(models: dict) -> None:
    """Refuse a graph built to a newer contract than this runtime reads (a bundle from a newer speccompile): its
    inputs and outputs may differ in ways the signature check cannot name, and it would fail mid-run."""
    for name, entry in models.items():
        newest = READABLE_GRAPH_VERSIONS.get(entry.get("kind"))
        version = entry.get("graph_version")
        if newest is not None and isinstance(version, int) and version > newest:
            raise BundleError(f"model {name!r} is a {entry['kind']} graph of version {version}, built by a newer "
                              f"speccompile; this one reads up to version {newest}: upgrade speccompile")
