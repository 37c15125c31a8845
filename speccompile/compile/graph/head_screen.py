"""The exact greedy output head: an int8 screen over the whole vocabulary, then float32 rescoring of a few rows.

A small model's output head is its largest matrix: SmolLM2-135M's is 49152 x 576, a fifth of the weights a float32
decode step reads. A greedy step needs only the argmax, and the argmax can be found, provably, from a cheap estimate:

  1. screen    approx = x . w_v for every token v, with w in int8 (blocks of 32, one scale each) and x quantized
               to int8 per block by onnxruntime's MatMulNBits (accuracy_level 4): a quarter of the bytes.
  2. bound     |x . w_v - approx_v| <= sum_b step_b * |w_vb|_1 + |x|_2 * |w_v - q(w_v)|_2, where step_b =
               max|x_b| / 127 is a whole quantization step of x's block b, and the second term is the int8
               grid's error (0 for a head that is already int8, as a GGUF Q8_0 head is). The error is
               x . (w - q(w)) + (x - q(x)) . q(w): rounding moves an element of x by at most half a step, but
               against the weights' codes q(w), and a weight just above half a step of its block rounds up to a
               whole one: |q(w)|_1 <= 2 |w|_1, hence a whole step (SLACK covers the kernel's float rounding).
               speccompile's MatMulQ8Bound computes step_b * |q(w)_vb|_1 instead, from the codes as it reads them
               (a whole step against |q(w)|_1: twice what x's rounding needs), with the estimates in one op.
  3. rescore   the CANDIDATES tokens with the largest upper bound approx + bound get their float32 logits x . w_v.
  4. certify   if the best rescored logit exceeds the next upper bound (the (CANDIDATES+1)-th), no other token
               can reach it: it is the argmax. Otherwise (ties, a flat distribution) the pass falls back to the
               full float32 product, so the answer is always the argmax of float32 logits. (The rescored logits
               are float32 dot products summed in another order than the full product's: two tokens within an
               ulp or two of each other may come out in either order, as they may between any two kernels.)

The logits output of a screened pass is the estimate `approx`: a greedy pass reads only next_token and the
acceptance outputs. Sampling by noise (input sample_noise: the Gumbel-max trick, runtime/noise.py) takes the
screen too, its noise added to both sides of step 4's comparison; the in-graph sampling rule (temperature > 0)
and callers that ask for exact logits (input `full_logits`) take the float32 product (`float32_product`: for a head
on the int8 grid, as a GGUF Q8_0 head is, speccompile's MatMulQ8F over the screen's records). CPU-only ops (MatMulNBits,
or speccompile's MatMulQ8 and TopK in a build with its kernels): graphs for TensorRT are built without the screen.
The screen's tensors come from speccompile.compile.quantize.head_screen.quantize_head (head_screen.l1, the blocks'
norms, only for MatMulNBits' screen: a build on speccompile's kernels reads none).
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto

from speccompile.compile.graph.linear import in_kernel_layout, int8_product, record_dims
from speccompile.compile.quantize.int8 import BLOCK
from speccompile.graphs.builder import GraphBuilder
from speccompile.plugins import q4_matmul

CANDIDATES = 64  # tokens rescored in float32 per row
# per row, in a pass with top-k rows: a top-k set is certified when its k-th logit clears the next candidate's
# bound, and the screen's bounds are loose enough that k of a few dozen needs a few hundred candidates
TOP_K_CANDIDATES = 512
SLACK = 1.01  # the bound's margin for float rounding (the kernel's, and the float32 logits')


def screenable(hidden_size: int, vocab_size: int) -> bool:
    return hidden_size % BLOCK == 0 and vocab_size > CANDIDATES + 1


def emit_screened_head(g: GraphBuilder, rows: str, head: str, W: dict[str, str], screen: str,
                       logits: str = "logits", next_token: str = "next_token", noise: str | None = None,
                       top_k: str | None = None) -> None:
    """Emit `logits` [R, V] and `next_token` [R] from the final-norm rows [R, H] and the head matrix [V, H].
    screen: a bool scalar; true takes the int8 screen (logits = its estimates, next_token exact).
    noise: the input sample_noise, [R, V] or [1, 1] (the default, zeros): next_token is the argmax of the float32
    logits plus it. Every step above holds with the noise added to both sides of the comparison, so the screen
    certifies a noisy argmax as it does a plain one; a [1, 1] noise skips the adds.
    top_k: the input noise_top_k, [R] or [1] (0: off): with noise, a row's argmax is taken among its top_k largest
    float32 logits only (ties at the k-th kept, as runtime/sampling.py keeps them). The screen then picks its
    candidates by the plain bounds and certifies the top-k set (the k-th rescored logit above every other
    token's bound, k <= CANDIDATES) before the noisy argmax within it."""
    full = g.branch("full_head")
    float32_product(full, rows, head, W, "logits_full")
    scores = _noisy_scores(full, "logits_full", noise, top_k) if noise else "logits_full"
    full.op("ArgMax", [scores], outputs=["next_token_full"], axis=-1, keepdims=0)
    s = g.branch("screened_head")
    approx, token = _screen(s, rows, head, W, noise, top_k)
    g.op("If", [screen], outputs=[logits, next_token],
         then_branch=s.subgraph([(approx, "float32"), (token, "int64")]),
         else_branch=full.subgraph([("logits_full", "float32"), ("next_token_full", "int64")]))


def float32_product(b: GraphBuilder, rows: str, head: str, W: dict[str, str], output: str | None = None) -> str:
    """The float32 logits rows [R, H] x head [V, H]^T: where the head lies on the screen's int8 grid exactly (a GGUF
    Q8_0 head; no grid error) and the screen is in speccompile's kernel layout, MatMulQ8F over the screen's records
    (the same products, a quarter of the bytes read), else a float32 Gemm."""
    codes = W["head_screen.codes"]
    if "head_screen.err" in W or not in_kernel_layout(b, codes):
        return b.op("Gemm", [rows, head], outputs=[output] if output else None, transB=1)[0]
    V, H = b.weights[head][0]
    return b.op(q4_matmul.OP_TYPE_Q8F, [rows, codes], outputs=[output] if output else None, domain=q4_matmul.DOMAIN,
                K=H, N=V)[0]


def head_rows(b: GraphBuilder, head: str, W: dict[str, str], ids: str) -> str:
    """Rows `ids` of the head [V, H] as float32: where the head lies on the screen's int8 grid exactly, from its
    int8 rows (head_screen.rows: quantize/kernel_form.head_rows; GatherQ8F, the same numbers), so that the graph
    need not read the float32 head; else from the float32 head. A tied model's embedding is these rows too."""
    if "head_screen.rows" not in W:
        return b.op("Gather", [head, ids], axis=0)[0]
    V, H = b.weights[head][0]
    return b.op(q4_matmul.OP_TYPE_GATHER_Q8F, [W["head_screen.rows"], ids], domain=q4_matmul.DOMAIN, K=H, N=V)[0]


def embedding(b: GraphBuilder, W: dict[str, str], ids: str) -> str:
    """The target's embedding of `ids`: a tied model's (no lm_head) from the head's int8 rows where it has them
    (head_rows), else from the embedding table."""
    if "lm_head" not in W:
        return head_rows(b, W["embed"], W, ids)
    return b.op("Gather", [W["embed"], ids], axis=0)[0]


def _consts(s: GraphBuilder):
    return lambda v, dt=np.int64: s.const(np.array(v, dt))


def _screen(s: GraphBuilder, rows: str, head: str, W: dict[str, str], noise: str | None,
            top_k: str | None) -> tuple[str, str]:
    """Steps 1-4 above in branch s: returns (the screen's estimated logits, the certified argmax of the float32
    logits plus `noise`, or the full product's where it cannot certify one). Each weight has one reader here:
    onnxruntime pre-packs a matrix only for a single kernel, and the int8 product is many times slower unpacked."""
    c = _consts(s)
    approx, upper = _estimate_and_upper(s, rows, W)
    if "head_screen.err" in W:
        norm = s.op("ReduceL2", [rows, c([-1])], keepdims=1)[0]
        upper = s.op("Add", [upper, s.op("Mul", [norm, W["head_screen.err"]])[0]])[0]
    noisy = s.op("Greater", [s.op("Size", [noise])[0], c(1)])[0] if noise else None
    limited = _limited(s, noisy, top_k) if noise and top_k else None
    if noise:  # a top-k row's candidates by its plain bounds: its top-k set is certified before any noise
        added = (lambda b: b.op("Add", [upper, b.op("Where", [limited, c(0.0, np.float32), noise])[0]])[0]) \
            if limited else (lambda b: b.op("Add", [upper, noise])[0])
        upper = _if_noisy(s, noisy, [upper], lambda b: [added(b)])[0]
    n = _candidates(s, limited, s.weights[head][0][0])  # [1]
    after = s.op("Add", [n, c([1])])[0]
    # speccompile's TopK where the graph runs its kernels: onnxruntime's outputs, a fraction of its time
    kernels = {"domain": q4_matmul.DOMAIN} if in_kernel_layout(s, W["head_screen.codes"]) else {"axis": -1}
    top, idx = s.op("TopK", [upper, after], n_out=2, **kernels)
    cand = s.op("Slice", [idx, c([0]), n, c([1])])[0]  # [R, K]
    rest = s.op("Slice", [top, n, after, c([1])])[0]  # [R, 1]
    exact = s.op("MatMul", [head_rows(s, head, W, cand), s.op("Unsqueeze", [rows, c([2])])[0]])[0]
    exact = s.op("Squeeze", [exact, c([2])])[0]  # [R, K] float32 logits of the candidates
    kth = None
    if noise:
        exact, kth = _rescored_with_noise(s, exact, cand, noise, noisy, top_k, limited, n)
    best = s.op("ReduceMax", [exact, c([1])], keepdims=1)[0]
    # ArgMax's tie rule (the lowest token id) among candidates that share the best logit
    winner = s.op("ReduceMin", [s.op("Where", [s.op("Equal", [exact, best])[0], cand, c(2**62)])[0], c([1])],
                  keepdims=0)[0]
    bar = s.op("Where", [limited, kth, best])[0] if limited else best  # top-k rows: their k-th logit
    certified = s.op("ReduceMin", [s.op("Cast", [s.op("Greater", [bar, rest])[0]], to=TensorProto.INT32)[0]],
                     keepdims=0)[0]
    yes, no = s.branch("certified"), s.branch("uncertified")
    certain = yes.op("Identity", [winner])[0]
    scores = float32_product(no, rows, head, W)  # a tie or a flat distribution: the float32 product decides
    if noise:
        scores = _noisy_scores(no, scores, noise, top_k, limited)
    fallback = no.op("ArgMax", [scores], axis=-1, keepdims=0)[0]
    token = s.op("If", [s.op("Cast", [certified], to=TensorProto.BOOL)[0]],
                 then_branch=yes.subgraph([(certain, "int64")]), else_branch=no.subgraph([(fallback, "int64")]))[0]
    return approx, token


def _estimate_and_upper(s: GraphBuilder, rows: str, W: dict[str, str]) -> tuple[str, str]:
    """Steps 1 and 2 less the grid's error: the screen's estimates [R, V] and each plus the bound on x's rounding.
    In speccompile's kernel layout one op computes both (MatMulQ8Bound: the blocks' L1 norms from the codes as they
    stream by, with x's steps as it rounds them; |q(w)|_1 there, which the whole step covers as it covers 2 |w|_1);
    else MatMulNBits and the bound from the stored norms (head_screen.l1)."""
    codes = W["head_screen.codes"]
    if in_kernel_layout(s, codes):
        return tuple(s.op(q4_matmul.OP_TYPE_Q8_BOUND, [rows, codes], n_out=2, domain=q4_matmul.DOMAIN,
                          slack=SLACK, **record_dims(s, codes)))
    c = _consts(s)
    nb = s.weights[W["head_screen.l1"]][0][0]
    approx = int8_product(s, rows, codes, W.get("head_screen.scales"))
    absx = s.op("Abs", [s.op("Reshape", [rows, c([0, nb, BLOCK])])[0]])[0]
    step = s.op("ReduceMax", [absx, c([-1])], keepdims=0)[0]  # [R, nb]
    bound = s.op("MatMul", [s.op("Mul", [step, c(SLACK / 127, np.float32)])[0], W["head_screen.l1"]])[0]
    return approx, s.op("Add", [approx, bound])[0]


def _candidates(s: GraphBuilder, limited: str | None, vocab_size: int) -> str:
    """[1]: how many tokens each row rescores: more in a pass with a top-k row."""
    c = _consts(s)
    if not limited:
        return c([CANDIDATES])
    any_limited = s.op("ReduceMax", [s.op("Cast", [limited], to=TensorProto.INT64)[0]], keepdims=0)[0]
    wide = min(TOP_K_CANDIDATES, vocab_size - 1)
    return s.op("Where", [s.op("Greater", [any_limited, c(0)])[0], c([wide]), c([CANDIDATES])])[0]


def _limited(s: GraphBuilder, noisy: str, top_k: str) -> str:
    """[RK, 1] bool: the rows whose argmax keeps to their top_k (sampled by noise, top_k > 0)."""
    c = _consts(s)
    return s.op("And", [noisy, s.op("Greater", [s.op("Unsqueeze", [top_k, c([1])])[0], c(0)])[0]])[0]


def _most(b: GraphBuilder, top_k: str) -> str:
    """[1]: the largest top_k of the pass (at least 1)."""
    return b.op("Max", [b.op("ReduceMax", [top_k], keepdims=1)[0], _consts(b)([1])])[0]


def _kth(s: GraphBuilder, values: str, top_k: str, most: str) -> str:
    """[R, 1]: each row's top_k-th largest of `values` [R, N] (its largest where top_k is 0), from the sorted
    `most` largest ([1], at least every row's top_k where that is to be found)."""
    c = _consts(s)
    most = s.op("Min", [most, s.op("Shape", [values], start=1, end=2)[0]])[0]
    ranked = s.op("TopK", [values, most], n_out=2, axis=-1)[0]
    rank = s.op("Max", [s.op("Unsqueeze", [top_k, c([1])])[0], c(1)])[0]  # [RK, 1]
    rank = s.op("Sub", [s.op("Min", [rank, most])[0], c(1)])[0]  # rows past `most` read its last (unused)
    rank = s.op("Expand", [rank, s.op("Concat", [s.op("Shape", [values], end=1)[0], c([1])], axis=0)[0]])[0]
    return s.op("GatherElements", [ranked, rank], axis=1)[0]


def _rescored_with_noise(s, exact, cand, noise, noisy, top_k, limited, n) -> tuple[str, str | None]:
    """The candidates' float32 logits plus their noise; a top-k row's candidates outside its top-k set at -inf.
    Also, for top-k rows, their k-th largest logit (-inf where top_k exceeds the n candidates: never certified)."""
    def with_noise(b):
        c = _consts(b)
        scored = b.op("Add", [exact, b.op("GatherElements", [noise, cand], axis=1)[0]])[0]
        if not limited:
            return [scored]
        kth = _kth(b, exact, top_k, b.op("Min", [_most(b, top_k), n])[0])
        within = b.op("LessOrEqual", [b.op("Unsqueeze", [top_k, c([1])])[0], n])[0]
        kth = b.op("Where", [within, kth, c(-np.inf, np.float32)])[0]
        keep = b.op("Or", [b.op("Not", [limited])[0], b.op("GreaterOrEqual", [exact, kth])[0]])[0]
        return [b.op("Where", [keep, scored, c(-np.inf, np.float32)])[0], kth]

    plain = [exact] if not limited else [exact, s.const(np.full((1, 1), np.inf, np.float32))]
    out = _if_noisy(s, noisy, plain, with_noise)
    return out[0], (out[1] if limited else None)


def _noisy_scores(b: GraphBuilder, logits: str, noise: str, top_k: str | None, limited: str | None = None) -> str:
    """The float32 logits [R, V] plus the noise; with top_k, a limited row's logits below its k-th at -inf."""
    scores = b.op("Add", [logits, noise])[0]
    if not top_k:
        return scores
    c = _consts(b)
    if limited is None:
        limited = _limited(b, b.op("Greater", [b.op("Size", [noise])[0], c(1)])[0], top_k)
    kth = _kth(b, logits, top_k, _most(b, top_k))
    keep = b.op("Or", [b.op("Not", [limited])[0], b.op("GreaterOrEqual", [logits, kth])[0]])[0]
    return b.op("Where", [keep, scores, c(-np.inf, np.float32)])[0]


def _if_noisy(s: GraphBuilder, noisy: str, plain: list[str], with_noise) -> list[str]:
    """`with_noise(branch)` where the noise input has a row per logits row, else `plain` as they are."""
    yes, no = s.branch("noisy"), s.branch("noiseless")
    added, kept = with_noise(yes), [no.op("Identity", [p])[0] for p in plain]
    return s.op("If", [noisy], n_out=len(plain), then_branch=yes.subgraph([(a, "float32") for a in added]),
                else_branch=no.subgraph([(k, "float32") for k in kept]))
