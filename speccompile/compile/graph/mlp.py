"""The gated MLP: down(act(gate x) * up x), act SiLU (SwiGLU) or tanh-approximated GELU (Gemma's GeGLU)."""
from __future__ import annotations

from speccompile.compile.graph.linear import gated_product, has_matrix, matmul
from speccompile.graphs.builder import GraphBuilder


def gated_silu(g: GraphBuilder, gate: str, up: str, act: str = "silu") -> str:
    if act == "gelu_tanh":
        return g.op("Mul", [g.op("Gelu", [gate], approximate="tanh")[0], up])[0]
    return g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])[0]])[0], up])[0]


def fused_gate_up(g: GraphBuilder, x: str, gate_up: str, act: str = "silu") -> str:
    """act(gate x) * up x from one [H, 2I] matrix (gate and up side by side)."""
    gate, up = g.op("Split", [g.op("MatMul", [x, gate_up])[0]], n_out=2, axis=-1, num_outputs=2)
    return gated_silu(g, gate, up, act)


def swiglu_mlp(g: GraphBuilder, W: dict[str, str], p: str, x: str, act: str = "silu") -> str:
    """Weights p + gate, up, down (float32 or packed), or p + gate_up, down."""
    if has_matrix(W, p + "gate"):
        # a float32 target keeps gate and up as two matrices: splitting the fused product costs a Split node
        # per layer, slower on CPU
        a = gated_silu(g, matmul(g, x, W, p + "gate"), matmul(g, x, W, p + "up"), act)
    elif p + "gate_up" in W:  # heads and DeepSeek layers keep one fused float matrix
        a = fused_gate_up(g, x, W[p + "gate_up"], act)
    else:  # a packed target joins them (quantize/target_weights.py): one product, with its gate where it runs on
        # speccompile's kernel (linear.gated_product)
        a = gated_product(g, x, W, p + "gate_up") if act == "silu" else None
        if a is None:
            gate, up = g.op("Split", [matmul(g, x, W, p + "gate_up")], n_out=2, axis=-1, num_outputs=2)
            a = gated_silu(g, gate, up, act)
    return matmul(g, a, W, p + "down")
