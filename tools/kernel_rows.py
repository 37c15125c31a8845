"""What a row costs in each 4-bit product kernel: a chain of eight 576x1536 / 1536x576 products (the default
model's shapes), random codes, by onnxruntime's MatMulNBits (4-bit, blocks of 32, accuracy level 4, the default
build's) and by speccompile's MatMulQ4 (plugins/q4_matmul; SPECCOMPILE_Q4_ISA=avx2 times its AVX2 variant on an
AVX-512 machine). Prints ms per call by rows, medians of interleaved rounds. docs/results.md ("speccompile's own
4-bit kernel") has the figures.

    python tools/kernel_rows.py [--threads 2] [--rounds 5]
"""
import argparse
import os
import tempfile
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from speccompile.plugins import q4_matmul
from speccompile.runtime.sessions import open_session, session_options

SHAPES = [(576, 1536), (1536, 576)] * 4
ROWS = (1, 2, 4, 8, 16, 32, 64)


def chain(kernel: str, rng) -> bytes:
    nodes, inits = [], []
    for i, (k, n) in enumerate(SHAPES):
        blocks = k // 32
        if kernel == "MatMulQ4":
            codes = rng.integers(0, 16, (n, k)).astype(np.uint8)
            scales = (rng.random((n, blocks)) * 0.02).astype(np.float16).astype(np.float32)
            minimums = (-rng.random((n, blocks)) * 0.01).astype(np.float16).astype(np.float32)
            inits.append(numpy_helper.from_array(q4_matmul.pack(codes, scales, minimums), f"w{i}"))
            nodes.append(helper.make_node(q4_matmul.OP_TYPE, [f"x{i}", f"w{i}"], [f"x{i + 1}"],
                                          domain=q4_matmul.DOMAIN, K=k, N=n))
        else:
            inits += [numpy_helper.from_array(rng.integers(0, 255, (n, blocks, 16)).astype(np.uint8), f"c{i}"),
                      numpy_helper.from_array((rng.random(n * blocks) * 0.02).astype(np.float32), f"s{i}")]
            nodes.append(helper.make_node("MatMulNBits", [f"x{i}", f"c{i}", f"s{i}"], [f"x{i + 1}"],
                                          domain="com.microsoft", K=k, N=n, bits=4, block_size=32, accuracy_level=4))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x0", TensorProto.FLOAT, ["M", 576])],
                              [helper.make_tensor_value_info("x8", TensorProto.FLOAT, ["M", 576])], inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1),
              helper.make_opsetid(q4_matmul.DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    kernels = ["MatMulNBits"] + (["MatMulQ4"] if q4_matmul.unavailable() is None else [])
    sessions = {}
    with tempfile.TemporaryDirectory() as folder:
        for kernel in kernels:
            path = os.path.join(folder, f"{kernel}.onnx")
            with open(path, "wb") as f:
                f.write(chain(kernel, rng))
            sessions[kernel] = open_session(path, session_options(args.threads), ["CPUExecutionProvider"])
    times = {k: {r: [] for r in ROWS} for k in kernels}
    for _ in range(args.rounds):
        for rows in ROWS:
            x = rng.standard_normal((rows, 576)).astype(np.float32)
            for kernel, session in sessions.items():
                for _ in range(3):
                    session.run(None, {"x0": x})
                runs = []
                for _ in range(40):
                    t0 = time.perf_counter()
                    session.run(None, {"x0": x})
                    runs.append(time.perf_counter() - t0)
                times[kernel][rows].append(np.median(runs))
    label = {"MatMulQ4": f"MatMulQ4 ({q4_matmul.instruction_set()})"}
    print(f"chain of eight products, ms per call, {args.threads} threads, onnxruntime {ort.__version__}")
    print(f"{'rows':<28}" + "".join(f"{r:>8}" for r in ROWS))
    for kernel in kernels:
        print(f"{label.get(kernel, kernel):<28}" + "".join(f"{np.median(times[kernel][r]) * 1e3:8.3f}" for r in ROWS))
    if len(kernels) == 1:
        print(f"MatMulQ4: {q4_matmul.unavailable()}")


if __name__ == "__main__":
    main()
