"""The verify extension of the target's decoder graph: acceptance computed in the graph.

`speccompile.graphs` documents the inputs, the outputs and the rule. A verify pass then copies a handful of
numbers to the host (the accepted path's end and length, the token after it) instead of [R, V] logits.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import TensorProto

from speccompile.graphs import KERNEL_DOMAIN
from speccompile.graphs.builder import GraphBuilder

F64 = TensorProto.DOUBLE


def sampling_flag(g: GraphBuilder) -> str:
    """A bool scalar: the pass samples (input temperature > 0)."""
    zero, axis = g.const(np.array([0.0], np.float32)), g.const(np.array([0], np.int64))
    return g.op("Squeeze", [g.op("Greater", ["temperature", zero])[0], axis])[0]


def emit_verify(g: GraphBuilder, logits: str, argmax: str, sampling: str, kernel: bool = False) -> None:
    """Emit the outputs node_prob, accept_node, accept_len and accept_token (see `emit_acceptance`); sampling:
    the graph's `sampling_flag`. kernel: greedy acceptance by speccompile's GreedyAccept (plugins/q4_matmul/
    accept.c, in a graph that runs speccompile's kernels), one op for the standard-op form's eighty.

    onnxruntime runs every node of a graph on every pass, fetched or not, so the acceptance ops sit in an If
    branch that a plain greedy decode step (one row, temperature 0) skips: its answer is fixed (no drafts, the
    argmax is the token)."""
    def c(v, dt=np.int64):
        return g.const(np.array(v, dt))

    names = ("node_prob", "accept_node", "accept_len", "accept_token")
    types = ("float64", "int64", "int64", "int64")
    R = g.op("Shape", ["logits_index"])[0]
    v = g.branch("acceptance")
    emit_acceptance(v, logits, argmax, R, sampling)
    if kernel:  # the greedy op takes a plain step too: one op either way
        greedy = g.branch("greedy_acceptance")
        greedy.op("GreedyAccept", ["input_ids", "logits_index", "node_parents", argmax],
                  outputs=[n + "_1" for n in names], domain=KERNEL_DOMAIN)
        needed = sampling
    else:
        needed = g.op("Or", [g.op("Squeeze", [g.op("Greater", [R, c([1])])[0], c([0])])[0], sampling])[0]
        greedy = g.branch("one_greedy_row")
        greedy.op("ConstantOfShape", [R], outputs=["node_prob_1"], value=onnx.numpy_helper.from_array(np.zeros(1)))
        greedy.op("Identity", [greedy.const(np.array([0], np.int64))], outputs=["accept_node_1"])
        greedy.op("Identity", [greedy.const(np.array([0], np.int64))], outputs=["accept_len_1"])
        greedy.op("Identity", [argmax], outputs=["accept_token_1"])
    g.op("If", [needed], outputs=list(names),
         then_branch=v.subgraph([(n + "_v", t) for n, t in zip(names, types)]),
         else_branch=greedy.subgraph([(n + "_1", t) for n, t in zip(names, types)]))


def emit_acceptance(g: GraphBuilder, logits: str, argmax: str, R: str, sampling: str) -> None:
    """From the rows' logits and argmax, their count R ([1]), the scalar `sampling` (temperature > 0) and the
    inputs input_ids, logits_index, node_parents, temperature, top_k and uniforms, emit node_prob, accept_node,
    accept_len and accept_token, each with the suffix _v (the outputs of emit_verify's If branch). Standard ONNX
    ops only: the tree relations are [R, R] matrices built from node_parents, so nothing loops over nodes, on the
    host or in the graph. Sampling needs one softmax over the [R, V] logits (a node's probability under its
    parent's row) and draws from one row (the end's).

    Sampled acceptance treats every candidate as deterministic (q one-hot): right for trees, whose candidates are
    top-k picks, and for prompt lookup. A chain drawn from full draft distributions q (draft model, MTP) needs
    max(p - q, 0), which would mean copying its [k, V] q rows in, as many bytes as the logits out, so the runtime
    verifies those chains on the host; top-p (a full sort per row) stays on the host too."""
    a = _Ops(g)
    t = _tree(a, R)
    passes, zero = _node_tests(a, t, logits, argmax, R, sampling)
    end = _accepted_path(a, t, passes)
    _token_after(a, t, logits, argmax, R, sampling, end, zero)


class _Ops:
    """Helpers over the acceptance branch's builder `g`. Constants always go to `g`, even for ops of the branches
    inside it (which read them from the enclosing scope)."""
    def __init__(self, g: GraphBuilder):
        self.g = g

    def c(self, v, dt=np.int64) -> str:
        return self.g.const(np.array(v, dt))

    def col(self, b: GraphBuilder, x: str) -> str:  # [R] -> [R, 1]
        return b.op("Unsqueeze", [x, self.c([1])])[0]

    def row(self, b: GraphBuilder, x: str) -> str:  # [R] -> [1, R]
        return b.op("Unsqueeze", [x, self.c([0])])[0]

    def any_in_row(self, m: str) -> str:  # [R, R] bool -> [R]
        g = self.g
        m = g.op("ReduceMax", [g.op("Cast", [m], to=TensorProto.INT32)[0], self.c([1])], keepdims=0)[0]
        return g.op("Cast", [m], to=TensorProto.BOOL)[0]

    def probs(self, b: GraphBuilder, lg: str) -> str:
        """logits [n, V] -> the target's distributions: softmax(logits / temperature), 0 below the top-k (the k-th
        largest logit's ties kept, as in sampling.probabilities; 0 < top_k < V or 0 = off). float32, where
        onnxruntime's softmax is fast; the host path computes the same in float64 (they differ by rounding)."""
        c = self.c
        x = b.op("Div", [lg, "temperature"])[0]
        topk = b.branch("top_k")  # the mask costs a pass over [n, V]: skipped when top-k is off
        kth = topk.op("ReduceMin", [topk.op("TopK", [lg, "top_k"], n_out=2, axis=-1)[0], c([-1])], keepdims=1)[0]
        masked = topk.op("Where", [topk.op("Less", [lg, kth])[0], c(-np.inf, np.float32), x])[0]
        p_topk = topk.op("Softmax", [masked], axis=-1)[0]
        whole = b.branch("no_top_k")
        p_whole = whole.op("Softmax", [x], axis=-1)[0]  # (in each branch: passing x out of one would copy it)
        return b.op("If", [b.op("Squeeze", [b.op("Greater", ["top_k", c([0])])[0], c([0])])[0]],
                    then_branch=topk.subgraph([(p_topk, "float32")]),
                    else_branch=whole.subgraph([(p_whole, "float32")]))[0]


@dataclasses.dataclass
class _Tree:
    """The verified rows as a tree: each row's parent, token and uniforms, and the [R, R] sibling relations."""
    par: str  # parent row per row (-1: a root)
    u_test: str
    u_draw: str
    is_root: str
    par0: str  # a gatherable index for every row (roots are masked where it matters)
    tok: str
    node_tok: str  # what is gathered/scattered per row (a root's is unused)
    rows: str
    earlier: str  # earlier[n, j]: j is a sibling of n, tried before it (siblings are tried in row order)
    dup: str  # the row's token was already tried by an earlier sibling


def _tree(a: _Ops, R: str) -> _Tree:
    op, c, col, row = a.g.op, a.c, a.col, a.row
    g = a.g
    # the optional inputs' defaults have one row: broadcast them over the R rows
    par = op("Expand", ["node_parents", R])[0]
    uniforms = op("Expand", ["uniforms", op("Concat", [R, c([2])], axis=0)[0]])[0]
    u_test, u_draw = (op("Squeeze", [u, c([1])])[0] for u in op("Split", [uniforms], n_out=2, axis=1, num_outputs=2))
    is_root = op("Less", [par, c(0)])[0]
    par0 = op("Max", [par, c(0)])[0]
    tok = op("Gather", [op("Squeeze", ["input_ids", c([0])])[0], "logits_index"], axis=0)[0]
    node_tok = op("Where", [is_root, c(0), tok])[0]
    rows = op("Range", [c(0), op("Squeeze", [R, c([0])])[0], c(1)])[0]
    earlier = op("And", [op("Equal", [col(g, par), row(g, par)])[0], op("Less", [row(g, rows), col(g, rows)])[0]])[0]
    dup = a.any_in_row(op("And", [earlier, op("Equal", [col(g, tok), row(g, tok)])[0]])[0])
    return _Tree(par, u_test, u_draw, is_root, par0, tok, node_tok, rows, earlier, dup)


def _node_tests(a: _Ops, t: _Tree, logits: str, argmax: str, R: str, sampling: str) -> tuple[str, str]:
    """1. each node's test; emits node_prob_v. Returns (passes [R] bool, the float64 constant 0). Sampling works on
    [R, V], so it sits in an If branch that greedy passes skip (onnxruntime runs every node of a graph, whether its
    outputs are fetched or not)."""
    g, c, col = a.g, a.c, a.col
    s = g.branch("sampled_tests")
    at = s.op("GatherND", [a.probs(s, logits), s.op("Concat", [col(s, t.par0), col(s, t.node_tok)], axis=1)[0]])[0]
    zero = c(0.0, np.float64)
    prob = s.op("Where", [t.is_root, zero, s.op("Cast", [at], to=F64)[0]], outputs=["node_prob_s"])[0]
    # recursive rejection (SpecInfer): node n is tried only once its earlier siblings were all rejected, so it is
    # tested against p with their tokens removed: u * (1 - their mass) < p(x), and fails outright if x was one of
    # them (p'(x) = 0)
    removed = s.op("MatMul", [s.op("Cast", [t.earlier], to=F64)[0], s.op("Where", [t.dup, zero, prob])[0]])[0]
    ok = s.op("Less", [s.op("Mul", [t.u_test, s.op("Sub", [c(1.0, np.float64), removed])[0]])[0], prob])[0]
    s.op("And", [ok, s.op("Not", [t.dup])[0]], outputs=["passes_s"])
    gr = g.branch("greedy_tests")
    gr.op("ConstantOfShape", [R], outputs=["node_prob_g"], value=onnx.numpy_helper.from_array(np.zeros(1)))
    gr.op("Equal", [t.tok, gr.op("Gather", [argmax, t.par0], axis=0)[0]], outputs=["passes_g"])
    passes = g.op("If", [sampling], outputs=["node_prob_v", g.fresh("passes")],
                  then_branch=s.subgraph([("node_prob_s", "float64"), ("passes_s", "bool")]),
                  else_branch=gr.subgraph([("node_prob_g", "float64"), ("passes_g", "bool")]))[1]
    return passes, zero


def _accepted_path(a: _Ops, t: _Tree, passes: str) -> str:
    """2. the accepted path: a node is kept if it is the first of its siblings to pass, and the path is the root's
    chain of kept nodes (at most one kept child per node, so the deepest kept-through node is unique). Emits
    accept_node_v (returned) and accept_len_v."""
    g, op, c, col, row = a.g, a.g.op, a.c, a.col, a.row
    first = op("And", [passes, op("Not", [a.any_in_row(op("And", [t.earlier, row(g, passes)])[0])])[0]])[0]
    kept = op("Or", [t.is_root, first])[0]
    # ancestor-or-self relation: square the parent relation; 7 squarings reach depth 128 (MAX_STEP_TOKENS)
    anc = op("Or", [op("Equal", [col(g, t.par), row(g, t.rows)])[0],
                    op("Equal", [col(g, t.rows), row(g, t.rows)])[0]])[0]
    anc = op("Cast", [anc], to=TensorProto.FLOAT)[0]
    for _ in range(7):
        anc = op("Cast", [op("Greater", [op("MatMul", [anc, anc])[0], c(0.0, np.float32)])[0]],
                 to=TensorProto.FLOAT)[0]
    cut = op("MatMul", [anc, op("Cast", [op("Not", [kept])[0]], to=TensorProto.FLOAT)[0]])[0]  # ancestors not kept
    depth = op("Sub", [op("ReduceSum", [anc, c([1])], keepdims=0)[0], c(1.0, np.float32)])[0]
    score = op("Where", [op("Greater", [cut, c(0.0, np.float32)])[0], c(-1.0, np.float32), depth])[0]
    end = op("ArgMax", [score], outputs=["accept_node_v"], axis=0, keepdims=1)[0]
    op("Cast", [op("ReduceMax", [score, c([0])], keepdims=1)[0]], outputs=["accept_len_v"], to=TensorProto.INT64)
    return end


def _token_after(a: _Ops, t: _Tree, logits: str, argmax: str, R: str, sampling: str, end: str, zero: str) -> None:
    """3. the token after the path (accept_token_v). Sampled: every child of the end node was rejected, so draw
    from p_end without the children's tokens (renormalised), by inverse CDF as sampling.sample does."""
    g, c, col = a.g, a.c, a.col
    s = g.branch("sampled_token")
    # [1, V]: the same float32 p as the tests above used, then float64 for the sums
    p = s.op("Cast", [a.probs(s, s.op("Gather", [logits, end], axis=0)[0])], to=F64)[0]
    V = s.op("Shape", [p], start=1, end=2)[0]
    # scatter 0 at the children's tokens; the other rows write to a spare second row, dropped after
    child = s.op("Equal", [t.par, end])[0]
    at = s.op("Concat", [col(s, s.op("Where", [child, c(0), c(1)])[0]), col(s, t.node_tok)], axis=1)[0]
    zeros = onnx.numpy_helper.from_array(np.zeros(1))
    two = s.op("Concat", [p, s.op("ConstantOfShape", [s.op("Concat", [c([1]), V], axis=0)[0]], value=zeros)[0]],
               axis=0)[0]
    residual = s.op("ScatterND", [two, at, s.op("ConstantOfShape", [R], value=zeros)[0]])[0]
    residual = s.op("Slice", [residual, c([0]), c([1]), c([0])])[0]
    mass = s.op("ReduceSum", [residual, c([-1])], keepdims=1)[0]
    residual = s.op("Where", [s.op("Greater", [mass, zero])[0], residual, p])[0]  # no mass left: rounding only
    cdf = s.op("CumSum", [residual, c(1)])[0]
    total = s.op("Slice", [cdf, c([-1]), c([2**62]), c([1])])[0]
    u = s.op("Gather", [t.u_draw, end], axis=0)[0]
    below = s.op("LessOrEqual", [cdf, s.op("Mul", [u, total])[0]])[0]
    drawn = s.op("ReduceSum", [s.op("Cast", [below], to=TensorProto.INT64)[0], c([1])], keepdims=0)[0]
    s.op("Min", [drawn, s.op("Sub", [V, c([1])])[0]], outputs=["accept_token_s"])
    gr = g.branch("greedy_token")
    gr.op("Gather", [argmax, end], outputs=["accept_token_g"], axis=0)
    g.op("If", [sampling], outputs=["accept_token_v"], then_branch=s.subgraph([("accept_token_s", "int64")]),
         else_branch=gr.subgraph([("accept_token_g", "int64")]))
