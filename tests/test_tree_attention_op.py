"""The TreeAttention op alone: its onnxruntime and reference lowerings against the numpy definition, on random
trees, cache lengths and head layouts."""
import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings, strategies as st

from speccompile.plugins import q4_matmul, tree_attention as ta
from speccompile.runtime.engine import ancestor_mask

from conftest import run_attention_in_place, tree_attention_graph


def op_session(lowering, hq, hkv, d, lmax):
    g = tree_attention_graph(lowering, hq, hkv, d, lmax)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    if lowering == "kernel":  # speccompile's own CPU kernel (plugins/q4_matmul/attention.c)
        if q4_matmul.unavailable():
            pytest.skip(f"speccompile's kernels cannot run here: {q4_matmul.unavailable()}")
        so.register_custom_ops_library(q4_matmul.library())
    model = g.to_model({})
    if lowering == "plugin":  # no kernel on onnxruntime: check its node through the reference expansion
        model = ta.expand_plugin_nodes(model)
    return ort.InferenceSession(model.SerializeToString(), so)


def random_tree(rng, n):
    return np.array([-1] + [int(rng.integers(-1, i)) for i in range(1, n)])


def run_case(lowering, hq, hkv, d, lmax, committed, parents, seed):
    rng = np.random.default_rng(seed)
    S = len(parents)
    depth = ancestor_mask(parents).sum(1) - 1
    qkv = rng.standard_normal((1, S, (hq + 2 * hkv) * d)).astype(np.float32)
    k = np.zeros((1, hkv, lmax + ta.scratch_slots(lowering), d), np.float32)
    v = np.zeros_like(k)
    k[:, :, :committed] = rng.standard_normal((1, hkv, committed, d))
    v[:, :, :committed] = rng.standard_normal((1, hkv, committed, d))
    cos, sin = ta.rope_tables(lmax + 1, d, 10000.0)
    pos = (committed + depth)[None].astype(np.int64)
    bias = np.full((1, 1, S, lmax), -np.inf, np.float32)
    bias[0, 0, :, :committed] = 0
    bias[0, 0, :, committed:committed + S][ancestor_mask(parents)] = 0
    ref_y, ref_k, ref_v = ta.reference_numpy(qkv, k, v, committed, cos, sin, pos, bias, hq, hkv, d)
    sess = op_session(lowering, hq, hkv, d, lmax)
    y = run_attention_in_place(sess, dict(qkv=qkv, seqlens_k=np.array([committed + S - 1], np.int32),
                                          position_ids=pos, attention_bias=bias, cos=cos, sin=sin), k, v)
    assert np.abs(y - ref_y).max() < 1e-4
    # the new K (rotated) and V rows were written in place, at slots [committed, committed + S)
    assert np.abs(k[0, :, committed:committed + S] - ref_k).max() < 1e-4
    assert np.abs(v[0, :, committed:committed + S] - ref_v).max() < 1e-5


@pytest.mark.parametrize("lowering", ta.LOWERINGS)
@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 12), committed=st.integers(0, 40), heads=st.sampled_from([(4, 2), (4, 4), (6, 2)]),
       seed=st.integers(0, 2**31))
def test_lowering_matches_definition(lowering, n, committed, heads, seed):
    parents = random_tree(np.random.default_rng(seed), n)
    run_case(lowering, heads[0], heads[1], 16, 64, committed, parents, seed)


def test_chain_is_causal_block():
    """A chain (each node the child of the previous) is ordinary causal attention over the block."""
    for lowering in ta.LOWERINGS:
        run_case(lowering, 4, 2, 16, 32, 5, np.arange(-1, 7), 0)


def test_tree_as_wide_as_its_bias():
    """A tree at committed length 0 that fills its bias (S = T: the whole cache here, or 64 nodes at the start of
    a longer one): each node is still rotated at its own position, siblings at the same one."""
    parents = np.array([-1, 0, 0, 1, 1, 2, 0, 3])
    for lowering in ta.LOWERINGS:
        run_case(lowering, 4, 2, 16, len(parents), 0, parents, 0)
