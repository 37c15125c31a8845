"""What a row costs in speccompile's attention kernel: 30 TreeAttention nodes (the default model's layers and heads:
9 query heads, 3 KV heads of 64) over a float32 cache and over a float16 one (`build --kv-dtype float16`), random
data, the caches bound in place as a bundle binds them; per committed length, slots x rows a slot.

    python tools/attention_rows.py [--context 200,600] [--rounds 200] [--threads 2]

Prints ms per pass (the 30 nodes), medians over the rounds, the cache types and shapes alternated round by round.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from speccompile.cli.errors import one_line_errors
from speccompile.errors import SpeccompileError
from speccompile.plugins import q4_matmul

SHAPES = [(1, 1), (2, 1), (4, 1), (1, 2), (1, 4), (4, 2)]  # (slots, rows a slot)
HQ, HKV, D, LMAX, LAYERS = 9, 3, 64, 1024, 30


def session(half: bool, threads: int):
    import onnxruntime as ort
    from onnx import TensorProto as T, helper

    from speccompile.graphs import KERNEL_DOMAIN
    kv = T.FLOAT16 if half else T.FLOAT
    inputs = [helper.make_tensor_value_info("qkv", T.FLOAT, ["N", "S", (HQ + 2 * HKV) * D]),
              helper.make_tensor_value_info("seqlens_k", T.INT32, ["N"]),
              helper.make_tensor_value_info("cos", T.FLOAT, [LMAX, D // 2]),
              helper.make_tensor_value_info("sin", T.FLOAT, [LMAX, D // 2]),
              helper.make_tensor_value_info("position_ids", T.INT64, ["N", "S"]),
              helper.make_tensor_value_info("attention_bias", T.FLOAT, ["N", 1, "S", "T"]),
              helper.make_tensor_value_info("query_seqlens", T.INT32, ["N"])]
    nodes, outputs = [], []
    for i in range(LAYERS):
        inputs += [helper.make_tensor_value_info(f"past_{kind}.{i}", kv, ["N", HKV, LMAX, D]) for kind in ("k", "v")]
        nodes.append(helper.make_node(
            "TreeAttentionF16" if half else "TreeAttention",
            ["qkv", f"past_k.{i}", f"past_v.{i}", "seqlens_k", "cos", "sin", "position_ids", "attention_bias",
             "query_seqlens"], [f"y.{i}", f"present_k.{i}", f"present_v.{i}"], domain=KERNEL_DOMAIN,
            num_heads=HQ, kv_num_heads=HKV, head_dim=D))
        outputs += [helper.make_tensor_value_info(f"y.{i}", T.FLOAT, None),
                    *(helper.make_tensor_value_info(f"present_{kind}.{i}", kv, None) for kind in ("k", "v"))]
    model = helper.make_model(helper.make_graph(nodes, "attention", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(KERNEL_DOMAIN, 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.register_custom_ops_library(q4_matmul.library())
    return ort.InferenceSession(model.SerializeToString(), so)


def binding(sess, half: bool, context: int, slots: int, rows: int, rng):
    """The pass's inputs and its 30 caches bound in place; returns (binding, the arrays it points into)."""
    import onnxruntime as ort

    from speccompile.plugins.tree_attention import rope_tables
    cos, sin = rope_tables(LMAX, D, 10000.0)
    width = context + rows
    bias = np.zeros((slots, 1, rows, -(-width // 64) * 64), np.float32)
    bias[..., width:] = -np.inf
    feeds = {"qkv": rng.standard_normal((slots, rows, (HQ + 2 * HKV) * D)).astype(np.float32),
             "seqlens_k": np.full(slots, width - 1, np.int32), "cos": cos, "sin": sin,
             "position_ids": np.tile(np.arange(context, width), (slots, 1)).astype(np.int64),
             "attention_bias": bias, "query_seqlens": np.full(slots, rows, np.int32)}
    io, keep = sess.io_binding(), list(feeds.values())
    for name, array in feeds.items():
        io.bind_cpu_input(name, array)
    for i in range(LAYERS):
        for kind in ("k", "v"):
            cache = rng.standard_normal((slots, HKV, LMAX, D)).astype(np.float16 if half else np.float32)
            value = ort.OrtValue.ortvalue_from_numpy(cache)
            io.bind_ortvalue_input(f"past_{kind}.{i}", value)
            io.bind_ortvalue_output(f"present_{kind}.{i}", value)
            keep.append(cache)
        y = np.zeros((slots, rows, HQ * D), np.float32)
        io.bind_output(f"y.{i}", "cpu", 0, np.float32, y.shape, y.ctypes.data)
        keep.append(y)
    return io, keep


@one_line_errors
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", default="200,600", help="committed tokens, comma-separated")
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if q4_matmul.unavailable():
        raise SpeccompileError(f"speccompile's kernels cannot run here: {q4_matmul.unavailable()}")
    contexts = [int(c) for c in args.context.split(",")]
    if any(not 0 < c <= LMAX - 8 for c in contexts):
        raise SpeccompileError(f"--context takes lengths from 1 to {LMAX - 8}")
    rng = np.random.default_rng(0)
    print(f"{'context':>7} {'cache':>7} " + " ".join(f"{f'{n}x{r}':>7}" for n, r in SHAPES) + "   (slots x rows, ms)")
    for context in contexts:
        for half in (False, True):
            sess = session(half, args.threads)
            runs = {shape: binding(sess, half, context, *shape, rng) for shape in SHAPES}  # arrays kept alive
            times = {shape: [] for shape in SHAPES}
            for _ in range(args.rounds):
                for shape, (io, _) in runs.items():
                    t0 = time.perf_counter()
                    sess.run_with_iobinding(io)
                    times[shape].append(time.perf_counter() - t0)
            cells = " ".join(f"{1e3 * np.median(times[s][args.rounds // 10:]):7.3f}" for s in SHAPES)
            print(f"{context:7d} {'float16' if half else 'float32':>7} {cells}")


if __name__ == "__main__":
    main()
