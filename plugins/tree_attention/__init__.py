"""TreeAttention: its numpy definition and its lowerings to ONNX (see README.md beside this file)."""
from __future__ import annotations

import numpy as np

from speccompile.graphs import KERNEL_DOMAIN

LOWERINGS = ("ort", "kernel", "reference", "plugin")
DOMAIN, OP_TYPE = "speccompile", "TreeAttention"  # the plugin lowering's node: speccompile::TreeAttention


def lower(g, lowering: str, qkv: str, past_key: str, past_value: str, present_key: str, present_value: str, *,
          seqlens_k: str, total_len: str, cos: str, sin: str, position_ids: str, attention_bias: str,
          num_heads: int, kv_num_heads: int, head_dim: int, query_seqlens: str = "", packed: bool = False) -> str:
    """Emit the op into GraphBuilder `g`; returns the name of y [1, S, Hq*D] ([N, S, Hq*D] batched).
    query_seqlens: batched graphs (several sequences, each with its own cache row) only: each sequence's real
    rows, which the fused kernels need for a multi-token step over a batch; the "ort" and "kernel" lowerings only.
    "kernel": speccompile's own CPU kernel (plugins/q4_matmul/attention.c: every row computed alike, no pad row;
    opt-in, `build --attention kernel`). packed ("kernel" with query_seqlens only): qkv and y hold each sequence's
    real rows one after another ([1, P, ...]), not laid out [N, S, ...]."""
    if query_seqlens and lowering not in ("ort", "kernel"):
        raise ValueError(f"a batched TreeAttention needs the 'ort' or 'kernel' lowering, not {lowering!r}")
    if lowering == "kernel":
        return g.op(OP_TYPE, [qkv, past_key, past_value, seqlens_k, cos, sin, position_ids, attention_bias,
                              *([query_seqlens] if query_seqlens else [])],
                    outputs=[g.fresh("attn"), present_key, present_value], domain=KERNEL_DOMAIN,
                    num_heads=num_heads, kv_num_heads=kv_num_heads, head_dim=head_dim,
                    **({"packed": 1} if packed else {}))[0]
    if lowering == "ort":
        pad = _pad_row_inputs(g, qkv, seqlens_k, total_len, position_ids, attention_bias, query_seqlens)
        extra = ["", "", "", "", "", pad["query_seqlens"]] if query_seqlens else []  # GQA inputs 11..16
        # the copy row: qkv's last e rows appended (a Slice and a Concat, not an edge Pad: the CUDA provider has
        # bfloat16 kernels for these two and none for Pad)
        copy = g.op("Slice", [qkv, pad["copy_start"], pad["rows"], g.const(np.array([1], np.int64))])[0]
        y = g.op("GroupQueryAttention", [g.op("Concat", [qkv, copy], axis=1)[0], "", "", past_key,
                                         past_value, pad["seqlens_k"], pad["total_len"], cos, sin,
                                         pad["position_ids"], pad["attention_bias"], *extra],
                 outputs=[g.fresh("attn"), present_key, present_value], domain="com.microsoft",
                 num_heads=num_heads, kv_num_heads=kv_num_heads, do_rotary=1, rotary_interleaved=0)[0]
        return g.op("Slice", [y, g.const(np.array([0], np.int64)), pad["rows"],
                              g.const(np.array([1], np.int64))])[0]  # without the copy's row
    if lowering == "reference":
        return _lower_reference(g, qkv, past_key, past_value, present_key, present_value, seqlens_k, cos, sin,
                                position_ids, attention_bias, num_heads, kv_num_heads, head_dim)
    if lowering == "plugin":  # one node, for a backend with a kernel of its own (TensorRT: tensorrt/)
        return g.op(OP_TYPE, [qkv, past_key, past_value, seqlens_k, cos, sin, position_ids, attention_bias],
                    outputs=[g.fresh("attn"), present_key, present_value], domain=DOMAIN, num_heads=num_heads,
                    kv_num_heads=kv_num_heads, head_dim=head_dim, rotary_interleaved=0,
                    scale=float(head_dim ** -0.5))[0]
    raise ValueError(f"unknown TreeAttention lowering {lowering!r}; choose from {LOWERINGS}")


def scratch_slots(lowering: str) -> int:
    """Cache slots past max_seq_len that a graph of this lowering writes (the "ort" lowering's pad row, below)."""
    return 1 if lowering == "ort" else 0


def _pad_row_inputs(g, qkv, seqlens_k, total_len, position_ids, attention_bias, query_seqlens) -> dict[str, str]:
    """The fused kernel's inputs for one extra query row after the step's S rows (emitted once per graph and bias).

    onnxruntime's GroupQueryAttention computes a one-row step by another path than a step of two rows or more,
    whose results differ in the last bits. A plain decoding step is one row, a verify pass several: to give every
    row the same numbers in both, each attention runs at least two rows, the step's own and a copy of its last
    one. That copy sees what the last row sees (at least that row's own slot, so it is never fully masked, never
    NaN); no row sees the copy; its K/V land one slot past the step's (scratch_slots); its output is dropped. Exactness
    needs this once a product rounds its input (MatMulNBits at accuracy level 4 quantizes x to int8): a last-bit
    difference there flips a rounding and grows through the layers. A one-sequence graph adds the copy only to a
    one-row step (a step of two rows or more already takes the many-row path, and a row costs the kernel its whole
    context). A batched graph gives every slot of one real row (query_seqlens) a second one: the copy where the
    pass has one row a slot, else the slot's first padding row, which sees slot 0 only."""
    key = ("tree_attention.pad", attention_bias)
    if key in g.shared:
        return g.shared[key]
    c = lambda v, dt=np.int64: g.const(np.array(v, dt))  # noqa: E731
    head = g.shared.get("tree_attention.pad.common")
    if head is None:
        head = _pad_row_count(g, qkv)
        extra32 = head["extra32"]
        last_pos = g.op("Slice", [position_ids, c([-1]), c([2**62]), c([1])])[0]
        positions = g.op("Concat", [position_ids, last_pos], axis=1)[0]
        head["position_ids"] = _first_rows(g, positions, head["padded"], 1)
        if query_seqlens:  # per slot: one row more where it has one; the bias keeps the copy's column throughout
            rows2 = g.op("Max", [query_seqlens, c([2], np.int32)])[0]
            head |= {"query_seqlens": rows2,
                     "seqlens_k": g.op("Add", [seqlens_k, g.op("Sub", [rows2, query_seqlens])[0]])[0],
                     "total_len": g.op("Add", [total_len, c(1, np.int32)])[0]}
        else:
            columns = _hidden_columns(g, head, attention_bias)
            head |= {"seqlens_k": g.op("Add", [seqlens_k, extra32])[0], "columns": columns,
                     "total_len": g.op("Add", [total_len, g.op("Squeeze", [g.op("Cast", [columns], to=6)[0]])[0]])[0]}
        g.shared["tree_attention.pad.common"] = head
    rows = g.op("Concat", [attention_bias, g.op("Slice", [attention_bias, c([-1]), c([2**62]), c([2])])[0]],
                axis=2)[0]  # [N, 1, S+1, T]: the copy's row repeats the last one
    hidden = g.op("Pad", [rows, c([0, 0, 0, 0, 0, 0, 0, 1]), g.const(np.array(-np.inf, np.float32))],
                  mode="constant")[0]  # [N, 1, S+1, T+1]: the copy's slot, seen by no row
    if query_seqlens:  # [N, 1, S+e, T+1]
        bias = _first_rows(g, hidden, head["padded"], 2)
    else:  # [1, 1, S+e, T+c]
        width = g.op("Add", [g.op("Shape", [attention_bias], start=3, end=4)[0], head["columns"]])[0]
        bias = _first_rows(g, _first_rows(g, hidden, head["padded"], 2), width, 3)
    g.shared[key] = {**head, "attention_bias": bias}
    return g.shared[key]


def _pad_row_count(g, qkv) -> dict[str, str]:
    """e, the copy rows a step gets (1 for a one-row step, batched or not, else 0), as int64 [1] and int32 [1];
    where qkv's copy rows start (S - e); the step's rows S (the output keeps them) and S + e."""
    c = lambda v, dt=np.int64: g.const(np.array(v, dt))  # noqa: E731
    S = g.op("Shape", [qkv], start=1, end=2)[0]
    extra = g.op("Cast", [g.op("Equal", [S, c([1])])[0]], to=7)[0]
    return {"extra": extra, "extra32": g.op("Cast", [extra], to=6)[0], "rows": S,
            "padded": g.op("Add", [S, extra])[0], "copy_start": g.op("Sub", [S, extra])[0]}


def _hidden_columns(g, head: dict, attention_bias: str) -> str:
    """c ([1] int64), the hidden columns a one-sequence step's bias gets past its width T: the copy's (1 for a
    one-row step), or 1 where the step's S rows are as many as T. The kernel takes a step whose rows equal its
    total_sequence_length for a first prompt, and rotates those rows at consecutive positions from the first one
    instead of at their position_ids: a tree at committed length 0 filling its bias would put siblings (which share
    a position) at different ones. One column more, seen by no row, keeps it on the path every other step takes."""
    width = g.op("Shape", [attention_bias], start=3, end=4)[0]
    fills = g.op("Cast", [g.op("Equal", [head["rows"], width])[0]], to=7)[0]
    return g.op("Max", [head["extra"], fills])[0]


def _first_rows(g, x: str, n: str, axis: int) -> str:
    """x's first n ([1] int64) entries along `axis`."""
    return g.op("Slice", [x, g.const(np.array([0], np.int64)), n, g.const(np.array([axis], np.int64))])[0]


def _lower_reference(g, qkv, past_key, past_value, present_key, present_value, seqlens_k, cos, sin, position_ids,
                     attention_bias, hq, hkv, d, scale=None):
    q, k, v = g.op("Split", [qkv, g.const(np.array([hq * d, hkv * d, hkv * d], np.int64))], n_out=3, axis=2)

    def bnsh(x, heads):  # [1,S,H*D] -> [1,H,S,D]
        x = g.op("Reshape", [x, g.const(np.array([1, -1, heads, d], np.int64))])[0]
        return g.op("Transpose", [x], perm=[0, 2, 1, 3])[0]

    q, k, v = bnsh(q, hq), bnsh(k, hkv), bnsh(v, hkv)
    q = g.op("RotaryEmbedding", [q, cos, sin, position_ids])[0]
    k = g.op("RotaryEmbedding", [k, cos, sin, position_ids])[0]
    # write index = seqlens_k + 1 - S (the committed length P)
    s = g.op("Shape", [qkv], start=1, end=2)[0]
    p = g.op("Sub", [g.op("Add", [g.op("Cast", [seqlens_k], to=7)[0], g.const(np.array([1], np.int64))])[0], s])[0]
    kc = g.op("TensorScatter", [past_key, k, p], outputs=[present_key], axis=-2)[0]
    vc = g.op("TensorScatter", [past_value, v, p], outputs=[present_value], axis=-2)[0]
    # Attention-24 wants a mask as wide as K (the whole cache): pad the bias's columns past its width with -inf
    width = g.op("Shape", [attention_bias], start=3, end=4)[0]
    pad = g.op("Sub", [g.op("Shape", [past_key], start=2, end=3)[0], width])[0]
    zeros = g.const(np.zeros(7, np.int64))
    pads = g.op("Concat", [zeros, pad], axis=0)[0]
    bias = g.op("Pad", [attention_bias, pads, g.const(np.array(-np.inf, np.float32))], mode="constant")[0]
    y = g.op("Attention", [q, kc, vc, bias], is_causal=0, **({"scale": scale} if scale else {}))[0]
    y = g.op("Transpose", [y], perm=[0, 2, 1, 3])[0]
    return g.op("Reshape", [y, g.const(np.array([1, -1, hq * d], np.int64))])[0]


def expand_plugin_nodes(model):
    """Graph rewrite: every speccompile::TreeAttention node -> its "reference" lowering (standard ONNX ops).

    A plugin-lowered graph then runs on any ONNX runtime, onnxruntime's CPU provider included, with no custom op
    registered, so it can be checked against the other lowerings on a machine without TensorRT. Returns a new
    ModelProto (the argument is left as it is); node order is kept, so the graph stays topologically sorted."""
    import onnx
    from onnx import helper

    from speccompile.graphs.builder import OPSET, GraphBuilder

    class Scoped(GraphBuilder):  # names under the replaced node's, so they cannot collide with the graph's own
        def fresh(self, hint):
            return f"{self.name}/{super().fresh(hint)}"

    m = onnx.ModelProto()
    m.CopyFrom(model)
    nodes = []
    for i, node in enumerate(m.graph.node):
        if (node.domain, node.op_type) != (DOMAIN, OP_TYPE):
            nodes.append(node)
            continue
        a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        if len(node.input) != 8 or len(node.output) != 3 or not all(node.output):
            raise ValueError(f"{OP_TYPE} node {node.name!r}: expected 8 inputs and 3 named outputs")
        if a.get("rotary_interleaved", 0) != 0:
            raise ValueError(f"{OP_TYPE} node {node.name!r}: only rotary_interleaved=0 is defined")
        qkv, pk, pv, seqlens_k, cos, sin, pos, bias = node.input
        b = Scoped(f"{node.name or OP_TYPE}#{i}")
        y = _lower_reference(b, qkv, pk, pv, node.output[1], node.output[2], seqlens_k, cos, sin, pos, bias,
                             a["num_heads"], a["kv_num_heads"], a["head_dim"], scale=a.get("scale") or None)
        b.op("Identity", [y], outputs=[node.output[0]])
        nodes += b.nodes
        m.graph.initializer.extend(b.constants)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    # the reference ops need opset 24; the custom domain goes once no node uses it
    imports = [o for o in m.opset_import if o.domain != DOMAIN or any(n.domain == DOMAIN for n in nodes)]
    for o in imports:
        if o.domain in ("", "ai.onnx"):
            o.version = max(o.version, OPSET)
    del m.opset_import[:]
    m.opset_import.extend(imports)
    m.ir_version = max(m.ir_version, 11)  # the IR version onnx_builder gives its opset-24 graphs
    return m


def rope_tables(max_positions: int, head_dim: int, theta: float):
    """cos/sin [max_positions, head_dim/2] for half-split (non-interleaved) rotary, as Llama uses."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    ang = np.outer(np.arange(max_positions, dtype=np.float64), inv_freq)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def reference_numpy(qkv, past_key, past_value, committed, cos, sin, position_ids, attention_bias,
                    num_heads, kv_num_heads, head_dim, cache_dtype=None):
    """The op's definition in float64 numpy. Returns (y, new_key_rows, new_value_rows); caches are not mutated.
    cache_dtype: the cache's type where it is not float32 (np.float16: TreeAttentionF16): the step's rows are
    rounded to it as they are written, and attended to so."""
    S = qkv.shape[1]
    hq, hkv, d = num_heads, kv_num_heads, head_dim
    x = qkv[0].astype(np.float64)
    q = x[:, :hq * d].reshape(S, hq, d).transpose(1, 0, 2)
    k = x[:, hq * d:(hq + hkv) * d].reshape(S, hkv, d).transpose(1, 0, 2)
    v = x[:, (hq + hkv) * d:].reshape(S, hkv, d).transpose(1, 0, 2)
    c, s_ = cos[position_ids[0]].astype(np.float64), sin[position_ids[0]].astype(np.float64)

    def rot(t):
        h = d // 2
        return np.concatenate([t[..., :h] * c - t[..., h:] * s_, t[..., h:] * c + t[..., :h] * s_], -1)

    q, k = rot(q), rot(k)
    if cache_dtype is not None:
        k, v = k.astype(cache_dtype).astype(np.float64), v.astype(cache_dtype).astype(np.float64)
    K = np.concatenate([past_key[0, :, :committed].astype(np.float64), k], 1)
    V = np.concatenate([past_value[0, :, :committed].astype(np.float64), v], 1)
    T = committed + S
    bias = attention_bias[0, 0, :, :T].astype(np.float64)
    rep = hq // hkv
    K, V = np.repeat(K, rep, 0), np.repeat(V, rep, 0)
    scores = q @ K.transpose(0, 2, 1) / np.sqrt(d) + bias
    scores -= scores.max(-1, keepdims=True)
    w = np.exp(scores)
    w /= w.sum(-1, keepdims=True)
    y = (w @ V).transpose(1, 0, 2).reshape(1, S, hq * d)
    return y, k, v
