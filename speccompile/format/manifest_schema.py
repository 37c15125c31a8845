"""The manifest's schema: every field the runtime and `inspect` read, with its type and range.

read_manifest validates a manifest against it before any field is used, so a manifest missing a section or holding
a field of the wrong type is one BundleError naming the field, never a KeyError or TypeError deep in the runtime.
Fields a bundle may lack (older bundles of the same format version) are optional here; unknown fields are allowed,
so a bundle may carry more than this runtime reads.
"""
from __future__ import annotations

import jsonschema

from speccompile.errors import BundleError
from speccompile.format.drafter_kinds import KINDS, MAX_LOOKUP_NGRAM
from speccompile.graphs import MAX_TREE_NODES

_BIG = 1 << 40  # byte counts and offsets: any file a disk holds
_STRING = {"type": "string", "maxLength": 4096}
_PATH = {"type": "string", "minLength": 1, "maxLength": 4096}
_SIZE = {"type": "integer", "minimum": 1, "maximum": 1 << 24}  # a model dimension, a vocabulary, a context
_LAYERS = {"type": "integer", "minimum": 1, "maximum": 1024}
_INDEX = {"type": "integer", "minimum": 0, "maximum": 1 << 24}
_SHAPE = {"type": "array", "maxItems": 8, "items": {"anyOf": [_INDEX, {"type": "string", "maxLength": 64}]}}
_TENSORS = {"type": "array", "maxItems": 4096, "items": {
    "type": "object", "required": ["name", "dtype", "shape"],
    "properties": {"name": _STRING, "dtype": _STRING, "shape": _SHAPE}}}
_VOCAB = _SIZE  # as large as the build accepts (compile/config.py UPPER_BOUNDS)
_WIDTH = {**_SIZE, "maximum": 1 << 16}  # a hidden size, a head count or size: as large as the build accepts
_EXPERTS = {"type": "integer", "minimum": 0, "maximum": 4096}  # as many as the build accepts (0: a dense model)
_CONFIG = {"type": "object",
           "required": ["model_type", "vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads",
                        "head_dim"],
           "properties": {"model_type": _STRING, "vocab_size": _VOCAB, "hidden_size": _WIDTH,
                          "num_attention_heads": _WIDTH, "num_key_value_heads": _WIDTH, "head_dim": _WIDTH,
                          "eos_token_ids": {"type": "array", "maxItems": 64, "items": _INDEX},
                          # read by inspect and load (format/summary.py: the experts a step reads)
                          "n_routed_experts": _EXPERTS, "num_experts_per_tok": _EXPERTS}}
_KV_CACHE = {"type": "object", "required": ["num_layers", "num_kv_heads", "head_dim", "max_seq_len"],
             "properties": {"num_layers": _LAYERS, "num_kv_heads": _WIDTH, "head_dim": _WIDTH, "max_seq_len": _SIZE,
                            "scratch_slots": {"type": "integer", "minimum": 0, "maximum": 64},
                            "dtype": {"enum": ["float32", "float16", "bfloat16"]}}}
# the models the runtime runs through its Engine or BatchEngine (a static KV cache, logits out); Medusa and
# EAGLE-3's fc have none
ENGINE_KINDS = ["decoder", "decoder_batch", "mtp_head", "eagle_head", "eagle3_head", "head_batch"]
_LOGITS = {"type": "object", "properties": {"name": {"const": "logits"}, "shape": {"prefixItems": [{}, _VOCAB],
                                                                                    "minItems": 2}}}


def _rows_of(name: str, width: dict) -> dict:
    """Every output named `name` is [rows, width]: the runtime sizes a buffer by its second dimension."""
    return {"if": {"properties": {"name": {"const": name}}, "required": ["name"]},
            "then": {"properties": {"shape": {"prefixItems": [{}, width], "minItems": 2}}}}


_OUTPUTS = {**_TENSORS, "items": {"allOf": [_TENSORS["items"], _rows_of("logits", _VOCAB),
                                            _rows_of("aux_hidden_states", {**_WIDTH, "maximum": 1 << 20})]}}
_MODEL = {
    "type": "object", "required": ["graph", "weights", "kind", "config", "inputs", "outputs"],
    "properties": {
        "graph": _PATH, "weights": {"type": "array", "minItems": 1, "maxItems": 64, "items": _PATH},
        "kv_compact": _PATH,  # the graph a device-resident KV cache compacts with
        "kind": _STRING, "config": _CONFIG, "num_layers": _LAYERS, "num_heads": {**_SIZE, "maximum": 64},
        "kv_cache": _KV_CACHE, "inputs": _TENSORS, "outputs": _OUTPUTS,
        "max_batch": {"type": "integer", "minimum": 1, "maximum": 64},  # sequence slots of a batched graph
        "graph_version": {"type": "integer", "minimum": 1},  # the graph contract (speccompile.graphs) it follows
        "tensorrt": {"type": "object", "required": ["graph", "engine"],  # build --backend tensorrt
                     "properties": {"graph": _PATH, "engine": _PATH}},
        "initializers": {"type": "array", "items": _STRING},
        # the target's features EAGLE heads read: layer indices, or "norm" (the final norm's output)
        "aux_hidden_layers": {"type": "array", "maxItems": 64, "items": {"anyOf": [_INDEX, _STRING]}},
        "target_features": {"type": "array", "maxItems": 64, "items": {"anyOf": [_INDEX, _STRING]}},
        "draft_to_target": {"type": "array", "maxItems": 1 << 24, "items": _INDEX}},
    "dependentRequired": {"kv_cache": ["num_layers"]},
    "if": {"properties": {"kind": {"enum": ENGINE_KINDS}}},
    "then": {"required": ["num_layers", "kv_cache"], "properties": {"outputs": {"contains": _LOGITS}}},
    "else": {"if": {"properties": {"kind": {"const": "medusa"}}}, "then": {"required": ["num_heads"]}}}
_TREE = {"type": "object", "required": ["kind", "size", "paths", "depth"],
         "properties": {"kind": {"enum": ["chain", "static", "dynamic", "adaptive"]},
                        "size": {"type": "integer", "minimum": 1, "maximum": MAX_TREE_NODES},
                        "depth": {"type": "integer", "minimum": 1, "maximum": MAX_TREE_NODES},
                        "paths": {"type": "array", "maxItems": MAX_TREE_NODES, "items": {
                            "type": "array", "minItems": 1, "maxItems": MAX_TREE_NODES, "items": _INDEX}},
                        "branching": {"type": "integer", "minimum": 1, "maximum": MAX_TREE_NODES},
                        "lookup": {"type": "integer", "minimum": 0, "maximum": MAX_TREE_NODES}}}
_DRAFTER = {"type": "object", "required": ["name", "kind", "num_draft"],
            "properties": {"name": _STRING, "kind": {"enum": sorted(KINDS)}, "model": _STRING, "fuse_model": _STRING,
                           "batch_model": _STRING,
                           "num_draft": {"type": "integer", "minimum": 1, "maximum": MAX_TREE_NODES},
                           "max_ngram": {"type": "integer", "minimum": 1, "maximum": MAX_LOOKUP_NGRAM},
                           "tree": {"anyOf": [{"type": "null"}, _TREE]}}}
MANIFEST_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["format", "format_version", "created_by", "source", "max_seq_len", "models", "drafters",
                 "tokenizer", "files"],
    "properties": {
        "format": _STRING, "format_version": {"type": "integer"}, "created_by": _STRING,
        "source": {"type": "object", "required": ["kind", "path", "sha256"],
                   "properties": {"kind": _STRING, "path": _STRING, "sha256": _STRING}},
        "max_seq_len": {"type": "integer", "minimum": 16, "maximum": 1 << 24},
        "models": {"type": "object", "required": ["target"], "maxProperties": 64, "additionalProperties": _MODEL,
                   "properties": {"target": {"allOf": [_MODEL, {"properties": {"kind": {"const": "decoder"}}}]}}},
        "drafters": {"type": "array", "maxItems": 64, "items": _DRAFTER},
        "tokenizer": {"type": "object", "required": ["dir"], "properties": {"dir": _PATH, "fingerprint": _STRING}},
        "files": {"type": "object", "maxProperties": 4096, "additionalProperties": {
            "type": "object", "required": ["sha256", "bytes"],
            "properties": {"sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                           "bytes": {"type": "integer", "minimum": 0, "maximum": _BIG}}}},
        "weights": {"type": "object", "additionalProperties": {"type": "object", "additionalProperties": {
            "type": "object", "required": ["length"],
            "properties": {"offset": {"type": "integer", "minimum": 0, "maximum": _BIG},
                           "length": {"type": "integer", "minimum": 0, "maximum": _BIG}}}}},
        "backend": {"enum": ["onnxruntime", "tensorrt"]},
        "dtype": {"enum": ["float32", "float16", "bfloat16"]},  # optional (older bundles: float32)
        # optional (bundles built before it lack it: float32): the format of each target matrix (graphs/__init__.py
        # WEIGHT FORMATS), and why each one left float32 in a quantized build is
        "quantization": {"type": "object", "required": ["option", "formats"],
                         "properties": {"file": _PATH, "option": {"enum": ["source", "float32", "int8", "int4"]},
                                        "accuracy_level": {"type": "integer", "minimum": 0, "maximum": 4},
                                        "formats": {"type": "object", "maxProperties": 1 << 16,
                                                    "additionalProperties": _STRING},
                                        "fallbacks": {"type": "object", "maxProperties": 1 << 16,
                                                      "additionalProperties": _STRING},
                                        # matrices stored for speccompile's own MatMulQ4/MatMulQ8 kernels (plugins/q4_matmul)
                                        "kernel_matrices": {"type": "array", "maxItems": 1 << 16,
                                                            "items": _STRING}}},
        # optional (bundles built before it was recorded lack it): what onnxruntime must provide to run the graphs
        "runtime": {"type": "object", "required": ["onnxruntime", "op_domains"],
                    "properties": {"onnxruntime": _STRING,
                                   "op_domains": {"type": "object", "maxProperties": 64,
                                                  "additionalProperties": {"type": "integer", "minimum": 1,
                                                                           "maximum": 1 << 16}}}}}}
_VALIDATOR = jsonschema.Draft202012Validator(MANIFEST_SCHEMA)


def validate_manifest(manifest: object, path: str) -> None:
    """A BundleError naming the first field that breaks the schema (the most relevant one, by jsonschema's
    best_match), with its value cut short."""
    error = jsonschema.exceptions.best_match(_VALIDATOR.iter_errors(manifest))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        message = error.message if len(error.message) <= 160 else f"fails the schema's {error.validator!r} rule"
        raise BundleError(f"{path}: invalid manifest field {where}: {message}")
