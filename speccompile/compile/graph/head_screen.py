"""The exact greedy output head: an int8 screen over the whole vocabulary, then float32 rescoring of a few rows.

A small model's output head is its largest matrix: SmolLM2-135M's is 49152 x 576, 113 MB of the 540 MB a decode
step reads. A greedy step needs only the argmax, and the argmax can be found, provably, from a cheap estimate:

  1. screen    approx = x . w_v for every token v, with w in int8 (blocks of 32, one scale each) and x quantized
               to int8 per block by onnxruntime's MatMulNBits (accuracy_level 4): a quarter of the bytes.
  2. bound     |x . w_v - approx_v| <= sum_b step_b * |w_vb|_1 + |x|_2 * |w_v - q(w_v)|_2, where step_b =
               max|x_b| / 127 is a whole quantization step of x's block b (rounding moves an element by at most
               half of one: the bound keeps a factor 2 for the kernel's own float rounding), and the second term
               is the int8 grid's error (0 for a head that is already int8, as a GGUF Q8_0 head is).
  3. rescore   the CANDIDATES tokens with the largest upper bound approx + bound get their float32 logits x . w_v.
  4. certify   if the best rescored logit exceeds the next upper bound (the (CANDIDATES+1)-th), no other token
               can reach it: it is the argmax. Otherwise (ties, a flat distribution) the pass falls back to the
               full float32 product, so the answer is always the argmax of float32 logits. (The rescored logits
               are float32 dot products summed in another order than the full product's: two tokens within an
               ulp or two of each other may come out in either order, as they may between any two kernels.)

The logits output of a screened pass is the estimate `approx`: a greedy pass reads only next_token and the
acceptance outputs. Sampling (temperature > 0) and callers that ask for exact logits (input `full_logits`) take
the float32 product. CPU-only op (MatMulNBits): graphs for TensorRT are built without the screen.
The screen's tensors come from speccompile.compile.quantize.head_screen.quantize_head.
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto

from speccompile.compile.graph.linear import int8_product
from speccompile.compile.quantize.int8 import BLOCK
from speccompile.graphs.builder import GraphBuilder

CANDIDATES = 64  # tokens rescored in float32 per row
SLACK = 1.01  # the bound's margin on top of the factor 2 above


def screenable(hidden_size: int, vocab_size: int) -> bool:
    return hidden_size % BLOCK == 0 and vocab_size > CANDIDATES + 1


def emit_screened_head(g: GraphBuilder, rows: str, head: str, W: dict[str, str], screen: str,
                       logits: str = "logits", next_token: str = "next_token") -> None:
    """Emit `logits` [R, V] and `next_token` [R] from the final-norm rows [R, H] and the head matrix [V, H].
    screen: a bool scalar; true takes the int8 screen (logits = its estimates, next_token exact)."""
    def c(b, v, dt=np.int64):
        return b.const(np.array(v, dt))

    full = g.branch("full_head")
    full.op("Gemm", [rows, head], outputs=["logits_full"], transB=1)
    full.op("ArgMax", ["logits_full"], outputs=["next_token_full"], axis=-1, keepdims=0)

    s = g.branch("screened_head")
    nb = g.weights[W["head_screen.l1"]][0][0]
    int8_product(s, rows, W["head_screen.codes"], W["head_screen.scales"], output="logits_screen")
    absx = s.op("Abs", [s.op("Reshape", [rows, c(s, [0, nb, BLOCK])])[0]])[0]
    step = s.op("ReduceMax", [absx, c(s, [-1])], keepdims=0)[0]  # [R, nb]
    bound = s.op("MatMul", [s.op("Mul", [step, c(s, SLACK / 127, np.float32)])[0], W["head_screen.l1"]])[0]
    if "head_screen.err" in W:
        norm = s.op("ReduceL2", [rows, c(s, [-1])], keepdims=1)[0]
        bound = s.op("Add", [bound, s.op("Mul", [norm, W["head_screen.err"]])[0]])[0]
    upper = s.op("Add", ["logits_screen", bound])[0]
    top, idx = s.op("TopK", [upper, c(s, [CANDIDATES + 1])], n_out=2, axis=-1)
    cand = s.op("Slice", [idx, c(s, [0]), c(s, [CANDIDATES]), c(s, [1])])[0]  # [R, K]
    rest = s.op("Slice", [top, c(s, [CANDIDATES]), c(s, [CANDIDATES + 1]), c(s, [1])])[0]  # [R, 1]
    exact = s.op("MatMul", [s.op("Gather", [head, cand], axis=0)[0], s.op("Unsqueeze", [rows, c(s, [2])])[0]])[0]
    exact = s.op("Squeeze", [exact, c(s, [2])])[0]  # [R, K] float32 logits of the candidates
    best = s.op("ReduceMax", [exact, c(s, [1])], keepdims=1)[0]
    # ArgMax's tie rule (the lowest token id) among candidates that share the best logit
    winner = s.op("ReduceMin", [s.op("Where", [s.op("Equal", [exact, best])[0], cand, c(s, 2**62)])[0],
                                c(s, [1])], keepdims=0)[0]
    certified = s.op("ReduceMin", [s.op("Cast", [s.op("Greater", [best, rest])[0]], to=TensorProto.INT32)[0]],
                     keepdims=0)[0]
    yes = s.branch("certified")
    yes.op("Identity", [winner], outputs=["next_token_certified"])
    no = s.branch("uncertified")  # a tie or a flat distribution: the float32 product decides
    no.op("ArgMax", [no.op("Gemm", [rows, head], transB=1)[0]], outputs=["next_token_fallback"], axis=-1,
          keepdims=0)
    s.op("If", [s.op("Cast", [certified], to=TensorProto.BOOL)[0]], outputs=["next_token_screen"],
         then_branch=yes.subgraph([("next_token_certified", "int64")]),
         else_branch=no.subgraph([("next_token_fallback", "int64")]))
    g.op("If", [screen], outputs=[logits, next_token],
         then_branch=s.subgraph([("logits_screen", "float32"), ("next_token_screen", "int64")]),
         else_branch=full.subgraph([("logits_full", "float32"), ("next_token_full", "int64")]))
