"""speccompile's RMSNorm, SkipRMSNorm and GreedyAccept kernels (plugins/q4_matmul/norm.c, accept.c): the norms
against numpy and onnxruntime's fused norm, each row the same whatever rows share its pass (what keeps
speculation lossless), inputs that do not fit refused; GreedyAccept's refusals (its rule against the standard-op
acceptance and the host's is in test_verify.py)."""
import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from speccompile.plugins import q4_matmul
from speccompile.runtime.sessions import session_options

WHY = q4_matmul.unavailable()
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"speccompile's kernels cannot run here: {WHY}")
H = 576


def session(nodes, inputs, outputs, kernels=True):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, t, None) for n, t in inputs],
                              [helper.make_tensor_value_info(n, t, None) for n, t in outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1),
                                                    helper.make_opsetid(q4_matmul.DOMAIN, 1)])
    options = session_options(2)
    if kernels:
        options.register_custom_ops_library(q4_matmul.library())
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


F = TensorProto.FLOAT


def skip_norm(eps=1e-5, op="SkipRMSNorm", domain=q4_matmul.DOMAIN):
    outputs = ["y", "", "", "s"] if domain == "com.microsoft" else ["y", "s"]
    node = helper.make_node(op, ["x", "skip", "gamma"], outputs, domain=domain, epsilon=eps)
    return session([node], [("x", F), ("skip", F), ("gamma", F)], [("y", F), ("s", F)])


def norm(eps=1e-5):
    node = helper.make_node("RMSNorm", ["x", "gamma"], ["y"], domain=q4_matmul.DOMAIN, epsilon=eps)
    return session([node], [("x", F), ("gamma", F)], [("y", F)])


def reference(x, gamma, eps):
    x64 = x.astype(np.float64)
    return (x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + eps) * gamma).astype(np.float32)


def data(rows, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((1, rows, H)).astype(np.float32) * 3, rng.standard_normal((1, rows, H)).astype(np.float32),
            (rng.random(H) + 0.5).astype(np.float32))


@pytest.mark.parametrize("eps", [1e-5, 4.0])
def test_the_norms_compute_rmsnorm_after_the_residual_add(eps):
    x, skip, gamma = data(5)
    y, s = skip_norm(eps).run(None, {"x": x, "skip": skip, "gamma": gamma})
    assert np.array_equal(s, x + skip)  # the sum is float32's own
    np.testing.assert_allclose(y, reference(x + skip, gamma, eps), rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(norm(eps).run(None, {"x": x, "gamma": gamma})[0], reference(x, gamma, eps),
                               rtol=2e-6, atol=1e-6)


def test_the_norm_agrees_with_onnxruntimes_fused_norm():
    x, skip, gamma = data(7, seed=1)
    ours = skip_norm().run(None, {"x": x, "skip": skip, "gamma": gamma})
    theirs = skip_norm(op="SkipSimplifiedLayerNormalization", domain="com.microsoft").run(
        None, {"x": x, "skip": skip, "gamma": gamma})
    assert np.array_equal(ours[1], theirs[1])
    np.testing.assert_allclose(ours[0], theirs[0], rtol=2e-6, atol=1e-6)


def test_each_row_is_normed_alike_whatever_the_rows_beside_it():
    """One row alone, among a verify pass's few (inline) and among a prefill chunk's many (the thread pool): the
    same bits."""
    x, skip, gamma = data(70, seed=2)
    sess = skip_norm()
    alone = [sess.run(None, {"x": x[:, i:i + 1], "skip": skip[:, i:i + 1], "gamma": gamma}) for i in range(70)]
    for rows in (2, 5, 31, 32, 70):
        y, s = sess.run(None, {"x": x[:, :rows], "skip": skip[:, :rows], "gamma": gamma})
        assert np.array_equal(y[0], np.concatenate([a[0][0] for a in alone[:rows]])), rows
        assert np.array_equal(s[0], np.concatenate([a[1][0] for a in alone[:rows]])), rows


def test_the_norm_refuses_inputs_that_do_not_fit():
    x, skip, gamma = data(3)
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.Fail, match="gamma is"):
        skip_norm().run(None, {"x": x, "skip": skip, "gamma": gamma[:-1]})
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.Fail, match="skip has the shape"):
        skip_norm().run(None, {"x": x, "skip": skip[:, :2], "gamma": gamma})


def greedy_accept():
    node = helper.make_node("GreedyAccept", ["ids", "index", "parents", "argmax"], ["prob", "node", "len", "token"],
                            domain=q4_matmul.DOMAIN)
    i64 = TensorProto.INT64
    return session([node], [("ids", i64), ("index", i64), ("parents", i64), ("argmax", i64)],
                   [("prob", TensorProto.DOUBLE), ("node", i64), ("len", i64), ("token", i64)])


def test_greedy_accept_broadcasts_one_parent_and_refuses_what_is_not_a_tree_of_earlier_rows():
    sess = greedy_accept()
    feed = {"ids": np.array([[4, 7, 7]]), "index": np.arange(3), "argmax": np.array([7, 7, 2])}
    prob, node, length, token = sess.run(None, feed | {"parents": np.array([-1])})  # every row a root
    assert prob.tolist() == [0.0] * 3 and (node[0], length[0], token[0]) == (0, 0, 7)
    assert [int(a[0]) for a in sess.run(None, feed | {"parents": np.array([-1, 0, 1])})[1:]] == [2, 2, 2]
    for parents, why in (([-1, 0, 2], "an earlier row"), ([-1, -2, 0], "an earlier row"), ([-1, 0], "R or 1")):
        with pytest.raises(ort.capi.onnxruntime_pybind11_state.Fail, match=why):
            sess.run(None, feed | {"parents": np.array(parents)})
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.Fail, match="outside input_ids"):
        sess.run(None, feed | {"index": np.array([0, 1, 3]), "parents": np.array([-1])})
