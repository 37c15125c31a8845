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
acceptance outputs. Sampling by noise (input sample_noise: the Gumbel-max trick, runtime/noise.py) takes the
screen too, its noise added to both sides of step 4's comparison; the in-graph sampling rule (temperature > 0)
and callers that ask for exact logits (input `full_logits`) take the float32 product. CPU-only op (MatMulNBits):
graphs for TensorRT are built without the screen.
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
                       logits: str = "logits", next_token: str = "next_token", noise: str | None = None) -> None:
    """Emit `logits` [R, V] and `next_token` [R] from the final-norm rows [R, H] and the head matrix [V, H].
    screen: a bool scalar; true takes the int8 screen (logits = its estimates, next_token exact).
    noise: the input sample_noise, [R, V] or [1, 1] (the default, zeros): next_token is the argmax of the float32
    logits plus it. Every step above holds with the noise added to both sides of the comparison, so the screen
    certifies a noisy argmax as it does a plain one; a [1, 1] noise skips the adds."""
    full = g.branch("full_head")
    full.op("Gemm", [rows, head], outputs=["logits_full"], transB=1)
    scores = full.op("Add", ["logits_full", noise])[0] if noise else "logits_full"
    full.op("ArgMax", [scores], outputs=["next_token_full"], axis=-1, keepdims=0)
    s = g.branch("screened_head")
    approx, token = _screen(s, rows, head, W, noise)
    g.op("If", [screen], outputs=[logits, next_token],
         then_branch=s.subgraph([(approx, "float32"), (token, "int64")]),
         else_branch=full.subgraph([("logits_full", "float32"), ("next_token_full", "int64")]))


def _screen(s: GraphBuilder, rows: str, head: str, W: dict[str, str], noise: str | None) -> tuple[str, str]:
    """Steps 1-4 above in branch s: returns (the screen's estimated logits, the certified argmax of the float32
    logits plus `noise`, or the full product's where it cannot certify one). Each weight has one reader here:
    onnxruntime pre-packs a matrix only for a single kernel, and the int8 product is many times slower unpacked."""
    def c(v, dt=np.int64):
        return s.const(np.array(v, dt))

    nb = s.weights[W["head_screen.l1"]][0][0]
    approx = int8_product(s, rows, W["head_screen.codes"], W["head_screen.scales"])
    absx = s.op("Abs", [s.op("Reshape", [rows, c([0, nb, BLOCK])])[0]])[0]
    step = s.op("ReduceMax", [absx, c([-1])], keepdims=0)[0]  # [R, nb]
    bound = s.op("MatMul", [s.op("Mul", [step, c(SLACK / 127, np.float32)])[0], W["head_screen.l1"]])[0]
    if "head_screen.err" in W:
        norm = s.op("ReduceL2", [rows, c([-1])], keepdims=1)[0]
        bound = s.op("Add", [bound, s.op("Mul", [norm, W["head_screen.err"]])[0]])[0]
    upper = s.op("Add", [approx, bound])[0]
    noisy = s.op("Greater", [s.op("Size", [noise])[0], c(1)])[0] if noise else None
    if noise:
        upper = _if_noisy(s, noisy, upper, lambda b: b.op("Add", [upper, noise])[0])
    top, idx = s.op("TopK", [upper, c([CANDIDATES + 1])], n_out=2, axis=-1)
    cand = s.op("Slice", [idx, c([0]), c([CANDIDATES]), c([1])])[0]  # [R, K]
    rest = s.op("Slice", [top, c([CANDIDATES]), c([CANDIDATES + 1]), c([1])])[0]  # [R, 1]
    exact = s.op("MatMul", [s.op("Gather", [head, cand], axis=0)[0], s.op("Unsqueeze", [rows, c([2])])[0]])[0]
    exact = s.op("Squeeze", [exact, c([2])])[0]  # [R, K] float32 logits of the candidates
    if noise:
        exact = _if_noisy(s, noisy, exact,
                          lambda b: b.op("Add", [exact, b.op("GatherElements", [noise, cand], axis=1)[0]])[0])
    best = s.op("ReduceMax", [exact, c([1])], keepdims=1)[0]
    # ArgMax's tie rule (the lowest token id) among candidates that share the best logit
    winner = s.op("ReduceMin", [s.op("Where", [s.op("Equal", [exact, best])[0], cand, c(2**62)])[0], c([1])],
                  keepdims=0)[0]
    certified = s.op("ReduceMin", [s.op("Cast", [s.op("Greater", [best, rest])[0]], to=TensorProto.INT32)[0]],
                     keepdims=0)[0]
    yes, no = s.branch("certified"), s.branch("uncertified")
    certain = yes.op("Identity", [winner])[0]
    scores = no.op("Gemm", [rows, head], transB=1)[0]  # a tie or a flat distribution: the float32 product decides
    if noise:
        scores = no.op("Add", [scores, noise])[0]
    fallback = no.op("ArgMax", [scores], axis=-1, keepdims=0)[0]
    token = s.op("If", [s.op("Cast", [certified], to=TensorProto.BOOL)[0]],
                 then_branch=yes.subgraph([(certain, "int64")]), else_branch=no.subgraph([(fallback, "int64")]))[0]
    return approx, token


def _if_noisy(s: GraphBuilder, noisy: str, plain: str, with_noise) -> str:
    """`with_noise(branch)` where the noise input has a row per logits row, else `plain` as it is."""
    yes, no = s.branch("noisy"), s.branch("noiseless")
    added, kept = with_noise(yes), no.op("Identity", [plain])[0]
    return s.op("If", [noisy], then_branch=yes.subgraph([(added, "float32")]),
                else_branch=no.subgraph([(kept, "float32")]))[0]
