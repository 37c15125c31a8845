"""speccompile's own TreeAttention CPU kernel (plugins/q4_matmul/attention.c, the "kernel" lowering): beside the
definition (test_tree_attention_op.py covers every lowering), what keeps speculation over it lossless: a row's
output is the same bit for bit alone, among other rows, as a tree node, or in a slot of a batch; and what keeps it
safe: nothing read past what a step may see, bad shapes refused, the cache copied when it is not bound in place.
Each over a float32 cache and over a float16 one (TreeAttentionF16, `build --kv-dtype float16`)."""
import os
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto as T, helper

from speccompile.graphs import KERNEL_DOMAIN
from speccompile.plugins import q4_matmul
from speccompile.plugins import tree_attention as ta
from speccompile.runtime.engine import ancestor_mask

from conftest import graph_ops, run_attention_in_place

WHY = q4_matmul.unavailable()
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"speccompile's kernels cannot run here: {WHY}")
HQ, HKV, D, L = 6, 2, 32, 80
COS, SIN = ta.rope_tables(L, D, 10000.0)


@pytest.fixture(params=[False, True], ids=["float32 cache", "float16 cache"])
def half(request):
    return request.param


def session(batched=False, half=False, packed=False):
    kv = T.FLOAT16 if half else T.FLOAT
    inputs = [helper.make_tensor_value_info("qkv", T.FLOAT, ["N", "S", (HQ + 2 * HKV) * D]),
              helper.make_tensor_value_info("past_key", kv, ["N", HKV, L, D]),
              helper.make_tensor_value_info("past_value", kv, ["N", HKV, L, D]),
              helper.make_tensor_value_info("seqlens_k", T.INT32, ["N"]),
              helper.make_tensor_value_info("cos", T.FLOAT, [L, D // 2]),
              helper.make_tensor_value_info("sin", T.FLOAT, [L, D // 2]),
              helper.make_tensor_value_info("position_ids", T.INT64, ["N", "S"]),
              helper.make_tensor_value_info("attention_bias", T.FLOAT, ["N", 1, "S", "T"])]
    if batched:
        inputs.append(helper.make_tensor_value_info("query_seqlens", T.INT32, ["N"]))
    node = helper.make_node("TreeAttentionF16" if half else "TreeAttention", [i.name for i in inputs],
                            ["y", "present_key", "present_value"], domain=KERNEL_DOMAIN, num_heads=HQ,
                            kv_num_heads=HKV, head_dim=D, **({"packed": 1} if packed else {}))
    outputs = [helper.make_tensor_value_info("y", T.FLOAT, None),
               *(helper.make_tensor_value_info(n, kv, None) for n in ("present_key", "present_value"))]
    model = helper.make_model(helper.make_graph([node], "attention", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(KERNEL_DOMAIN, 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.register_custom_ops_library(q4_matmul.library())
    return ort.InferenceSession(model.SerializeToString(), so)


def run(sess, qkv, k, v, seqlens, pos, bias, rows=None, in_place=True):
    """One pass; the caches k and v are written in place (bound as past and present) unless in_place=False."""
    feeds = dict(qkv=qkv, seqlens_k=np.asarray(seqlens, np.int32), cos=COS, sin=SIN, position_ids=pos,
                 attention_bias=bias)
    if rows is not None:
        feeds["query_seqlens"] = np.asarray(rows, np.int32)
    if not in_place:
        return sess.run(None, feeds | {"past_key": k, "past_value": v})
    return run_attention_in_place(sess, feeds, k, v)


def tree_bias(committed, parents, width):
    bias = np.full((1, 1, len(parents), width), -np.inf, np.float32)
    bias[0, 0, :, :committed] = 0
    bias[0, 0, :, committed:committed + len(parents)][ancestor_mask(np.asarray(parents))] = 0
    return bias


def cache(rng, committed, batch=1, half=False):
    k = np.zeros((batch, HKV, L, D), np.float16 if half else np.float32)
    v = np.zeros_like(k)
    k[:, :, :committed] = rng.standard_normal((batch, HKV, committed, D))
    v[:, :, :committed] = rng.standard_normal((batch, HKV, committed, D))
    return k, v


def qkv_rows(rng, n):
    return rng.standard_normal((1, n, (HQ + 2 * HKV) * D)).astype(np.float32)


@pytest.mark.parametrize("n", [5, 40], ids=["a chain", "a prefill chunk"])
def test_a_chain_gives_each_row_what_plain_steps_give_it(half, n):
    """n rows in one pass (a verify chain; a prefill chunk, its rows in units of 16 and each row's masked columns
    skipped) against the same tokens decoded one step at a time (each step one row, the cache growing): the same
    outputs bit for bit, and the same cache."""
    rng = np.random.default_rng(0)
    sess, committed, x = session(half=half), 21, qkv_rows(rng, n)
    k, v = cache(rng, committed, half=half)
    k1, v1 = k.copy(), v.copy()
    pos = np.arange(committed, committed + n)[None]
    bias = tree_bias(committed, np.arange(-1, n - 1), min(committed + n + 7, L))
    ref, _, _ = ta.reference_numpy(x, k.copy(), v.copy(), committed, COS, SIN, pos, bias, HQ, HKV, D,
                                   k.dtype if half else None)
    together = run(sess, x, k, v, [committed + n - 1], pos, bias)
    assert np.abs(together - ref).max() < 1e-5
    for i in range(n):
        n = committed + i
        alone = run(sess, x[:, i:i + 1], k1, v1, [n], pos[:, i:i + 1], tree_bias(n, [-1], n + 1))
        assert np.array_equal(alone[0, 0], together[0, i]), i
    assert np.array_equal(k, k1) and np.array_equal(v, v1)


def test_a_tree_node_gets_what_its_path_alone_gets(half):
    """A node among siblings and cousins (its ancestors scattered between other nodes' slots) against its path laid
    out as a chain: the same output bit for bit, so greedy acceptance over a tree commits plain decoding's tokens."""
    rng = np.random.default_rng(1)
    sess, committed = session(half=half), 40
    parents = np.array([-1, 0, 0, 1, 2, 3, 1, 5])
    depth = ancestor_mask(parents).sum(1) - 1
    x = qkv_rows(rng, len(parents))
    k, v = cache(rng, committed, half=half)
    tree = run(sess, x, k.copy(), v.copy(), [committed + len(parents) - 1], (committed + depth)[None],
               tree_bias(committed, parents, committed + len(parents)))
    for node in (4, 7):
        path = np.flatnonzero(ancestor_mask(parents)[node])
        chain = run(sess, x[:, path], k.copy(), v.copy(), [committed + len(path) - 1],
                    (committed + np.arange(len(path)))[None],
                    tree_bias(committed, np.arange(-1, len(path) - 1), committed + len(path)))
        assert np.array_equal(chain[0, -1], tree[0, node]), node


def test_each_slot_of_a_batch_gets_what_it_gets_alone(half):
    """Three sequences of different lengths and rows in one pass (padding rows zero) against each alone."""
    rng = np.random.default_rng(2)
    sess, single = session(batched=True, half=half), session(half=half)
    committed, rows, S = [5, 33, 0], [2, 1, 3], 3
    x = np.concatenate([qkv_rows(rng, S) for _ in committed])
    k, v = cache(rng, max(committed), batch=3, half=half)
    for n, c in enumerate(committed):
        k[n, :, c:], v[n, :, c:] = 0, 0
    width = max(committed) + S + 4
    bias = np.full((3, 1, S, width), -np.inf, np.float32)
    pos = np.zeros((3, S), np.int64)
    for n, (c, r) in enumerate(zip(committed, rows)):
        bias[n, :, :r] = tree_bias(c, np.arange(-1, r - 1), width)[0]
        pos[n, :r] = np.arange(c, c + r)
    kb, vb = k.copy(), v.copy()
    y = run(sess, x, kb, vb, [c + r - 1 for c, r in zip(committed, rows)], pos, bias, rows=rows)
    for n, (c, r) in enumerate(zip(committed, rows)):
        kn, vn = k[n:n + 1].copy(), v[n:n + 1].copy()
        alone = run(single, x[n:n + 1, :r], kn, vn, [c + r - 1], pos[n:n + 1, :r], bias[n:n + 1, :, :r])
        assert np.array_equal(alone[0], y[n, :r]) and not y[n, r:].any(), n
        assert np.array_equal(kn[0], kb[n]) and np.array_equal(vn[0], vb[n])
    # packed: the real rows one sequence after another in and out, the same numbers and the same caches
    real = np.concatenate([x[n, :r] for n, r in enumerate(rows)])[None]
    kp, vp = k.copy(), v.copy()
    packed = run(session(batched=True, half=half, packed=True), real, kp, vp,
                 [c + r - 1 for c, r in zip(committed, rows)], pos, bias, rows=rows)
    assert np.array_equal(packed[0], np.concatenate([y[n, :r] for n, r in enumerate(rows)]))
    assert np.array_equal(kp, kb) and np.array_equal(vp, vb)


def test_what_a_row_does_not_see_never_reaches_it(half):
    """NaN in a masked cache slot (a rejected node's leftovers may be anything) and in the slots past the step
    (never written): the output is the one over the visible slots alone."""
    rng = np.random.default_rng(3)
    sess, committed = session(half=half), 12
    x = qkv_rows(rng, 2)
    k, v = cache(rng, committed, half=half)
    bias = tree_bias(committed, [-1, -1], committed + 2)  # two roots: neither sees the other
    bias[0, 0, :, 3] = -np.inf
    clean = run(sess, x, k.copy(), v.copy(), [committed + 1], np.full((1, 2), committed), bias)
    k[:, :, 3], v[:, :, 3] = np.nan, np.nan
    k[:, :, committed + 2:], v[:, :, committed + 2:] = np.nan, np.nan
    dirty = run(sess, x, k, v, [committed + 1], np.full((1, 2), committed), bias)
    assert np.array_equal(clean, dirty)
    ref, _, _ = ta.reference_numpy(x, np.nan_to_num(k[:, :, :L]), np.nan_to_num(v[:, :, :L]), committed, COS, SIN,
                                   np.full((1, 2), committed), bias, HQ, HKV, D, k.dtype if half else None)
    assert np.abs(clean - ref).max() < 1e-5


def test_a_cache_not_bound_in_place_is_copied_then_written(half):
    rng = np.random.default_rng(4)
    sess, committed = session(half=half), 9
    x = qkv_rows(rng, 3)
    k, v = cache(rng, committed, half=half)
    args = (x, k, v, [committed + 2], np.arange(committed, committed + 3)[None],
            tree_bias(committed, [-1, 0, 1], committed + 3))
    y, present_k, present_v = run(sess, *args, in_place=False)
    ref_y, ref_k, ref_v = ta.reference_numpy(*args[:3], committed, COS, SIN, args[4], args[5], HQ, HKV, D,
                                             k.dtype if half else None)
    assert np.abs(y - ref_y).max() < 1e-5 and not np.shares_memory(present_k, k)
    assert present_k.dtype == k.dtype and np.array_equal(present_k[:, :, :committed], k[:, :, :committed])
    # the step's rows as written: float32, or rounded to float16 to nearest (the rotation's last bit may differ)
    written = present_k[0, :, committed:committed + 3].astype(np.float32)
    assert np.abs(written - ref_k).max() <= (np.abs(ref_k).max() * 2 ** -10 if half else 1e-5)
    assert np.array_equal(present_v[0, :, committed:committed + 3], ref_v.astype(k.dtype))
    assert not k[:, :, committed:].any()  # the input was left as it was


@pytest.mark.parametrize("wrong", ["past the cache", "past the bias", "position", "rows", "packed rows"])
def test_inputs_that_would_read_past_a_tensor_are_refused(wrong, half):
    """A bundle's graph is not trusted to size what the kernel reads: each of these is an error, not a read."""
    rng = np.random.default_rng(5)
    batched = wrong in ("rows", "packed rows")
    sess, committed = session(batched=batched, half=half, packed=wrong == "packed rows"), 10
    x = qkv_rows(rng, 2)
    k, v = cache(rng, committed, half=half)
    seqlens, pos = [committed + 1], np.arange(committed, committed + 2)[None]
    bias = tree_bias(committed, [-1, 0], committed + 2)
    rows = [3] if wrong == "rows" else [1] if batched else None  # packed: 2 rows given for 1 said
    if wrong == "past the cache":
        seqlens = [L + 5]
    elif wrong == "past the bias":
        bias = bias[..., :committed]
    elif wrong == "position":
        pos = pos + L
    with pytest.raises(Exception, match="TreeAttention"):
        run(sess, x, k, v, seqlens, pos, bias, rows=rows)


AVX2_RUN = """
import sys, numpy as np
sys.path.insert(0, sys.argv[1])
import test_attention_kernel as t
d = np.load(sys.argv[2])
k, v = d["k"].copy(), d["v"].copy()
np.save(sys.argv[3], t.run(t.session(half=k.dtype == np.float16), d["x"], k, v, d["seqlens"], d["pos"], d["bias"]))
"""


@pytest.mark.skipif(q4_matmul.instruction_set() != "AVX-512 VNNI",
                    reason="only a CPU with AVX-512 runs both of the kernel's variants")
def test_the_avx2_variant_computes_what_the_avx512_one_does(tmp_path, half):
    rng = np.random.default_rng(6)
    committed, parents = 50, np.array([-1, 0, 0, 1, 2, 3])
    depth = ancestor_mask(parents).sum(1) - 1
    x = qkv_rows(rng, len(parents))
    k, v = cache(rng, committed, half=half)
    case = dict(x=x, k=k, v=v, seqlens=[committed + len(parents) - 1], pos=(committed + depth)[None],
                bias=tree_bias(committed, parents, committed + len(parents) + 3))
    np.savez(tmp_path / "in.npz", **case)
    subprocess.run([sys.executable, "-c", AVX2_RUN, os.path.dirname(__file__), str(tmp_path / "in.npz"),
                    str(tmp_path / "avx2.npy")], env=dict(os.environ, SPECCOMPILE_Q4_ISA="avx2"), check=True)
    y = run(session(half=half), x, k.copy(), v.copy(), case["seqlens"], case["pos"], case["bias"])
    assert np.array_equal(np.load(tmp_path / "avx2.npy"), y)


def test_a_bundle_on_the_kernel_speculates_exactly(tmp_path):
    """`build --attention kernel` end to end: every graph on the kernel without scratch slots; greedy speculation
    (an early-exit draft, prompt lookup) commits plain decoding's tokens, and requests sharing passes their solo
    tokens."""
    import speccompile
    from speccompile.compile.driver import build_bundle
    out = str(tmp_path / "b")
    m = build_bundle("tiny:llama", out, drafts=["layerskip:2", "lookup"], max_seq_len=128, attention="kernel",
                     kernels="speccompile", progress=lambda *a: None)
    assert {e["attention"] for e in m["models"].values() if "attention" in e} == {"kernel"}
    assert {e["kv_cache"]["scratch_slots"] for e in m["models"].values() if "kv_cache" in e} == {0}
    # a graph on speccompile's kernels takes its norms and greedy acceptance there too
    ops = graph_ops(os.path.join(out, m["models"]["target"]["graph"]))
    assert {"SkipRMSNorm", "RMSNorm", "GreedyAccept"} <= ops and "SkipSimplifiedLayerNormalization" not in ops
    g = speccompile.load(out, threads=1)
    rng = np.random.default_rng(7)
    prompts = []
    for n in (9, 30):
        base = [int(t) for t in rng.integers(3, 300, n)]
        prompts.append(base + base[:6])  # a repeat for prompt lookup to find
    alone = [g.generate(p, max_new_tokens=24, speculate=False).token_ids for p in prompts]
    for p, plain in zip(prompts, alone):
        for drafter in ("layerskip:2", "lookup"):
            assert g.generate(p, max_new_tokens=24, drafter=drafter).token_ids == plain, drafter
    assert [r.token_ids for r in g.generate(prompts, max_new_tokens=24, speculate=False)] == alone


def test_the_kernel_is_refused_where_the_build_does_not_use_speccompiles_kernels(tmp_path):
    from speccompile.compile.driver import build_bundle
    from speccompile.errors import SpeccompileError
    with pytest.raises(SpeccompileError, match="attention"):
        build_bundle("tiny:llama", str(tmp_path / "b"), drafts=["lookup"], max_seq_len=64, attention="kernel",
                     kernels="onnxruntime", progress=lambda *a: None)
    assert not (tmp_path / "b").exists()


def test_auto_takes_the_kernel_where_the_layers_run_on_speccompiles_kernels():
    """--attention auto (the default): the kernel where the build runs speccompile's kernels, the target's layer
    products among them, and the heads fit it; onnxruntime's attention otherwise (a float32 build, whose only
    kernel product is the head's screen; partly rotated heads; no kernels)."""
    import dataclasses
    from speccompile.compile.graph.attention import lowering_for
    from speccompile.compile.presets import tiny_checkpoint
    cfg = tiny_checkpoint("llama").config
    assert lowering_for(cfg, "auto", kernels=True, products_on_kernels=True) == "kernel"
    assert lowering_for(cfg, "auto", kernels=True, products_on_kernels=False) == "ort"
    assert lowering_for(cfg, "auto", kernels=False, products_on_kernels=True) == "ort"
    partial = dataclasses.replace(cfg, partial_rotary_factor=0.5)
    assert partial.rope_dim != partial.head_dim
    assert lowering_for(partial, "auto", kernels=True, products_on_kernels=True) == "ort"
    assert lowering_for(cfg, "ort", kernels=True, products_on_kernels=True) == "ort"
