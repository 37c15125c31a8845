"""What a row costs in each product kernel: a chain of eight 576x1536 / 1536x576 4-bit products (the default
model's shapes), random codes, by onnxruntime's MatMulNBits (4-bit, blocks of 32, accuracy level 4, the default
build's) and by speccompile's MatMulQ4 (plugins/q4_matmul; SPECCOMPILE_Q4_ISA=avx2 times its AVX2 variant on an
AVX-512 machine, =avx512 its VNNI kernel alone where 16 rows or more would run on AMX); then the output head's
int8 screen (49152 x 576, int8 blocks of 32) by MatMulNBits (8-bit) and by speccompile's MatMulQ8. Prints ms per
call by rows, medians of interleaved rounds. docs/results.md ("speccompile's own 4-bit kernel", "An int8 kernel for
the head's screen", "AMX for prefill") has the figures.

    python tools/kernel_rows.py [--threads 2] [--rounds 5]
"""
import argparse
import os
import tempfile
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from speccompile.compile.quantize.int8 import int8_blocks
from speccompile.plugins import q4_matmul
from speccompile.runtime.sessions import open_session, session_options

SHAPES = [(576, 1536), (1536, 576)] * 4
ROWS = (1, 2, 4, 8, 16, 32, 64)
SCREEN = (49152, 576)  # the default model's output head: [vocabulary, hidden]


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


def screen(kernel: str, rng) -> bytes:
    """The head's int8 screen alone: x [M, 576] times a [49152, 576] int8 matrix in blocks of 32."""
    n, k = SCREEN
    codes, scales = int8_blocks(rng.standard_normal((n, k)).astype(np.float32))
    if kernel == "MatMulQ8":
        inits = [numpy_helper.from_array(q4_matmul.pack8(codes.reshape(n, k), scales.reshape(n, k // 32)), "w")]
        node = helper.make_node(q4_matmul.OP_TYPE_Q8, ["x0", "w"], ["y"], domain=q4_matmul.DOMAIN, K=k, N=n)
    else:
        inits = [numpy_helper.from_array(codes, "c"), numpy_helper.from_array(scales, "s")]
        node = helper.make_node("MatMulNBits", ["x0", "c", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=8,
                                block_size=32, accuracy_level=4)
    graph = helper.make_graph([node], "screen", [helper.make_tensor_value_info("x0", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])], inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1),
              helper.make_opsetid(q4_matmul.DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    ours = q4_matmul.unavailable() is None
    print(f"ms per call, {args.threads} threads, onnxruntime {ort.__version__}")
    table("chain of eight 4-bit products", chain, ["MatMulNBits"] + (["MatMulQ4"] if ours else []), args, rng)
    table("the head's int8 screen", screen, ["MatMulNBits"] + (["MatMulQ8"] if ours else []), args, rng)
    if not ours:
        print(f"MatMulQ4, MatMulQ8: {q4_matmul.unavailable()}")


def table(title: str, model, kernels: list[str], args, rng) -> None:
    """Time `model(kernel, rng)` for each kernel by ROWS rows (medians of interleaved rounds) and print a line each."""
    sessions = {}
    with tempfile.TemporaryDirectory() as folder:
        for kernel in kernels:
            path = os.path.join(folder, f"{kernel}.onnx")
            with open(path, "wb") as f:
                f.write(model(kernel, rng))
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
    amx = "; AMX at 16 or more" if title.startswith("chain") and q4_matmul.uses_amx() else ""
    isa = f" ({q4_matmul.instruction_set()}{amx})"
    print(f"{title + ', rows':<44}" + "".join(f"{r:>8}" for r in ROWS))
    for kernel in kernels:
        name = kernel + (isa if kernel != "MatMulNBits" else "")
        print(f"{name:<44}" + "".join(f"{np.median(times[kernel][r]) * 1e3:8.3f}" for r in ROWS))


if __name__ == "__main__":
    main()
