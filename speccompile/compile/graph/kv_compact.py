"""The KV compaction graph: moves an accepted tree path's K/V rows next to the committed ones, on the device that
holds the cache (the runtime's `DeviceKVCache.compact`; a host cache compacts with numpy instead).

inputs   key.{i}, value.{i}  [1, Hkv, LMAX, D] (the model's cache dtype)  the caches, bound in place
         src_slots           int64 [N]                                    the path's slots, in order
         dst_start           int64 [1]                                    where the path moves to
outputs  key_out.{i}, value_out.{i}                                       bound to the same buffers as the inputs

Each cache is one Gather (the path's rows, materialized before anything is written, so overlapping moves are
safe) and one TensorScatter writing them at dst_start: one pass for every layer.
"""
from __future__ import annotations

from onnx import TensorProto, helper

ONNX_TYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}
OPSET = 24  # TensorScatter


def cache_names(num_layers: int) -> list[str]:
    return [f"{kind}.{i}" for i in range(num_layers) for kind in ("key", "value")]


def build_kv_compact(num_layers: int, num_kv_heads: int, max_seq_len: int, head_dim: int, dtype: str):
    """The compaction graph (a ModelProto) for one model's cache."""
    shape = [1, num_kv_heads, max_seq_len, head_dim]
    inputs = [helper.make_tensor_value_info("src_slots", TensorProto.INT64, ["N"]),
              helper.make_tensor_value_info("dst_start", TensorProto.INT64, [1])]
    outputs, nodes = [], []
    for name in cache_names(num_layers):
        inputs.append(helper.make_tensor_value_info(name, ONNX_TYPES[dtype], shape))
        outputs.append(helper.make_tensor_value_info(f"{name}_out", ONNX_TYPES[dtype], shape))
        nodes += [helper.make_node("Gather", [name, "src_slots"], [f"{name}_rows"], name=f"{name}_gather", axis=2),
                  helper.make_node("TensorScatter", [name, f"{name}_rows", "dst_start"], [f"{name}_out"],
                                   name=f"{name}_scatter", axis=-2)]
    graph = helper.make_graph(nodes, "kv_compact", inputs, outputs)
    model = helper.make_model(graph, producer_name="speccompile", opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 11
    return model
