"""Matrix products: float32 MatMul, or onnxruntime's MatMulNBits over packed weights: int8 ones
(speccompile.compile.quantize.int8 stores them as codes and scales) or the n-bit forms of
speccompile.compile.quantize.nbits (a GGUF's own blocks, or `build --weights int4|int8`); or speccompile's own
MatMulQ4 kernel over 4-bit blocks stored in its layout (speccompile.compile.quantize.kernel_form)."""
from __future__ import annotations

from speccompile.compile.quantize import kernel_form
from speccompile.compile.quantize.int8 import BLOCK, SUFFIX_CODES, SUFFIX_SCALES
from speccompile.compile.quantize.nbits import nbits_product, stored_bits
from speccompile.compile.quantize.target_weights import ACCURACY_LEVEL
from speccompile.graphs.builder import GraphBuilder
from speccompile.plugins import q4_matmul


def has_matrix(W: dict[str, str], key: str) -> bool:
    """Whether matrix `key` is among the weights W in any of its forms."""
    return (key in W or key + SUFFIX_CODES in W or key + kernel_form.SUFFIX in W
            or stored_bits(W, key) is not None)


def matmul(g: GraphBuilder, x: str, W: dict[str, str], key: str) -> str:
    """x @ W[key] (x [..., K]): speccompile's MatMulQ4 or MatMulNBits when the weight is stored packed, else
    MatMul."""
    if key + kernel_form.SUFFIX in W:
        tiles, blocks, _ = g.weights[W[key + kernel_form.SUFFIX]][0]
        return g.op(q4_matmul.OP_TYPE, [x, W[key + kernel_form.SUFFIX]], domain=q4_matmul.DOMAIN,
                    K=blocks * q4_matmul.BLOCK, N=tiles * q4_matmul.TILE)[0]
    if key + SUFFIX_CODES in W:
        return int8_product(g, x, W[key + SUFFIX_CODES], W.get(key + SUFFIX_SCALES))
    if stored_bits(W, key) is not None:
        return nbits_product(g, x, W, key, ACCURACY_LEVEL)
    return g.op("MatMul", [x, W[key]])[0]


def gated_product(g: GraphBuilder, x: str, W: dict[str, str], key: str) -> str | None:
    """silu(x @ gate) * (x @ up) for W[key], gate and up joined along the outputs, by speccompile's MatMulQ4SiLU
    where the weight is in its layout (whole tiles of 16 in each half); None elsewhere (nothing emitted)."""
    if key + kernel_form.SUFFIX not in W:
        return None
    tiles, blocks, _ = g.weights[W[key + kernel_form.SUFFIX]][0]
    if tiles % 2:
        return None
    return g.op(q4_matmul.OP_TYPE_SILU, [x, W[key + kernel_form.SUFFIX]], domain=q4_matmul.DOMAIN,
                K=blocks * q4_matmul.BLOCK, N=tiles * q4_matmul.TILE)[0]


def runs_kernels(g: GraphBuilder, W: dict[str, str], attention: str) -> bool:
    """Whether a graph with the weights W and this TreeAttention lowering runs speccompile's kernels (its 4-bit or
    int8 products, or its attention): then its small ops may run there too, at no cost in portability."""
    return attention == "kernel" or any(
        key.endswith(kernel_form.SUFFIX) or (key.endswith(SUFFIX_CODES) and in_kernel_layout(g, name))
        for key, name in W.items())


def in_kernel_layout(g: GraphBuilder, codes: str) -> bool:
    """Whether int8 `codes` are stored for speccompile's MatMulQ8 (a graph that runs speccompile's kernels)."""
    return g.weights[codes][0][-1] == q4_matmul.RECORD8


def record_dims(g: GraphBuilder, codes: str) -> dict[str, int]:
    """The K and N attributes of speccompile's int8 ops over `codes` in MatMulQ8's layout [N/16, K/BLOCK, 576]."""
    tiles, nb, _ = g.weights[codes][0]
    return {"K": nb * BLOCK, "N": tiles * q4_matmul.TILE}


def int8_product(g: GraphBuilder, x: str, codes: str, scales: str | None, output: str | None = None) -> str:
    """x [..., K] times the int8 matrix whose rows (one per output) are `codes` [N, K/BLOCK, BLOCK] with `scales`;
    or, stored in speccompile's MatMulQ8 layout [N/16, K/BLOCK, 576] (scales inside: kernel_form.int8_records),
    by that kernel."""
    if in_kernel_layout(g, codes):
        return g.op(q4_matmul.OP_TYPE_Q8, [x, codes], outputs=[output] if output else None, domain=q4_matmul.DOMAIN,
                    **record_dims(g, codes))[0]
    N, nb, _ = g.weights[codes][0]
    return g.op("MatMulNBits", [x, codes, scales], outputs=[output] if output else None, domain="com.microsoft",
                K=nb * BLOCK, N=N, bits=8, block_size=BLOCK, accuracy_level=4)[0]
