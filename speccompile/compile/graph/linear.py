"""Matrix products: float32 MatMul, or onnxruntime's MatMulNBits over int8 weights (speccompile.compile.quantize.int8
stores them as codes and scales)."""
from __future__ import annotations

from speccompile.compile.quantize.int8 import BLOCK, SUFFIX_CODES, SUFFIX_SCALES
from speccompile.graphs.builder import GraphBuilder


def matmul(g: GraphBuilder, x: str, W: dict[str, str], key: str) -> str:
    """x @ W[key] (x [..., K]): MatMulNBits when the weight is stored as int8, else MatMul."""
    if key + SUFFIX_CODES not in W:
        return g.op("MatMul", [x, W[key]])[0]
    return int8_product(g, x, W[key + SUFFIX_CODES], W[key + SUFFIX_SCALES])


def int8_product(g: GraphBuilder, x: str, codes: str, scales: str, output: str | None = None) -> str:
    """x [..., K] times the int8 matrix whose rows (one per output) are `codes` [N, K/BLOCK, BLOCK]."""
    N, nb, _ = g.weights[codes][0]
    return g.op("MatMulNBits", [x, codes, scales], outputs=[output] if output else None, domain="com.microsoft",
                K=nb * BLOCK, N=N, bits=8, block_size=BLOCK, accuracy_level=4)[0]
