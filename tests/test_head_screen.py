"""The exact greedy head (speccompile/compile/graph/head_screen.py): the int8 screen's bound holds for onnxruntime's
kernel, the screened argmax is the float32 argmax (ties included), and peaked rows are certified without the full
product."""
import json

import numpy as np
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from speccompile.compile.graph.head_screen import CANDIDATES, emit_screened_head
from speccompile.compile.quantize import kernel_form
from speccompile.compile.quantize.head_screen import quantize_head
from speccompile.compile.quantize.int8 import BLOCK
from speccompile.graphs.builder import OPSET, GraphBuilder
from speccompile.plugins import q4_matmul

V, H = 1008, 64  # whole tiles of 16: speccompile's kernels take the head too


def head_session(head: np.ndarray, profile_dir=None, noise=False, top_k=False, kernels=False):
    """A graph of just the head: rows [R, H] and the bool `screen` in (and with noise, sample_noise [R, V] or
    [1, 1]; with top_k, noise_top_k [R] or [1]), logits and next_token out. kernels: the screen on speccompile's
    MatMulQ8 and TopK, as a build with its kernels emits it (a vocabulary of whole tiles of 16)."""
    weights = {"head": head, **quantize_head(head)}
    if kernels:
        weights, converted = kernel_form.int8_records(weights)
        assert converted == ["head_screen.codes"]
    g = GraphBuilder("head")
    g.input("rows", "float32", ["R", H])
    g.input("screen", "bool", [])
    if noise:
        g.input("sample_noise", "float32", ["RN", "VN"])
    if top_k:
        g.input("noise_top_k", "int64", ["RK"])
    W = {k: g.weight(k, v) for k, v in weights.items()}
    emit_screened_head(g, "rows", "head", W, "screen", noise="sample_noise" if noise else None,
                       top_k="noise_top_k" if top_k else None)
    g.output("logits", "float32", ["R", len(head)])
    g.output("next_token", "int64", ["R"])
    graph = helper.make_graph(g.nodes, "head", g.inputs, g.outputs,
                              initializer=g.constants + [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                    helper.make_opsetid("com.microsoft", 1),
                                                    helper.make_opsetid(q4_matmul.DOMAIN, 1)])
    model.ir_version = 11
    so = ort.SessionOptions()
    if kernels:
        so.register_custom_ops_library(q4_matmul.library())
    so.intra_op_num_threads = 1
    if profile_dir:
        so.enable_profiling = True
        so.profile_file_prefix = str(profile_dir / "head")
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    sess.model = model
    return sess


def run(sess, rows, screen, noise=None, top_k=None):
    feed = {"rows": np.ascontiguousarray(rows, np.float32), "screen": np.array(screen)}
    if noise is not None:
        feed["sample_noise"] = np.ascontiguousarray(noise, np.float32)
    if top_k is not None:
        feed["noise_top_k"] = np.asarray(top_k, np.int64)
    return sess.run(None, feed)


def random_head(seed=0, on_grid=False):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((V, H)) * 0.05).astype(np.float32)
    if on_grid:  # as a GGUF Q8_0 head dequantizes: int8 codes times one scale per block of 32
        blocks = w.reshape(V, H // BLOCK, BLOCK)
        scale = (np.abs(blocks).max(-1, keepdims=True) / 127).astype(np.float16).astype(np.float32)
        w = (np.clip(np.round(blocks / scale), -127, 127) * scale).reshape(V, H).astype(np.float32)
    return w


def peaked_rows(head, n, seed=1):
    """Hidden states pointing at one token each, as a confident model's do, with outliers in a few dims."""
    rng = np.random.default_rng(seed)
    x = head[rng.integers(0, V, n)] * 40 + rng.standard_normal((n, H)).astype(np.float32) * 0.5
    x[:, :3] *= 8
    return x.astype(np.float32)


def test_quantize_head_reproduces_an_int8_grid_exactly():
    w = random_head(on_grid=True)
    q = quantize_head(w)
    assert "head_screen.err" not in q  # exact: no grid error term
    codes = q["head_screen.codes"].astype(np.float32) - 128
    back = (codes * q["head_screen.scales"].reshape(V, -1, 1)).reshape(V, H)
    assert np.array_equal(back, w)
    assert "head_screen.err" in quantize_head(random_head())


@pytest.mark.parametrize("on_grid", [True, False])
def test_bound_holds_for_the_int8_kernel(on_grid):
    """The screen's logits (its estimates) stay within the bound the graph certifies with, for rows with heavy
    tails and outliers: the bound's assumption about onnxruntime's activation quantization holds."""
    w = random_head(on_grid=on_grid)
    q = quantize_head(w)
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((64, H)) * np.exp(rng.standard_normal((64, H)) * 1.5)).astype(np.float32)
    x = np.concatenate([x, peaked_rows(w, 16)])
    approx = run(head_session(w), x, True)[0]
    exact = x.astype(np.float64) @ w.T.astype(np.float64)
    step = np.abs(x.reshape(len(x), -1, BLOCK)).max(-1) / 127
    bound = step @ q["head_screen.l1"] + np.linalg.norm(x, axis=1, keepdims=True) * q.get("head_screen.err", 0)
    assert np.all(np.abs(approx - exact) <= bound)
    assert np.abs(approx - exact).max() > 0  # they are estimates, not the float32 products


@pytest.mark.parametrize("on_grid", [True, False])
def test_screened_argmax_is_the_float32_argmax(on_grid):
    w = random_head(on_grid=on_grid)
    sess = head_session(w)
    rng = np.random.default_rng(3)
    x = np.concatenate([peaked_rows(w, 48), rng.standard_normal((16, H)).astype(np.float32)])
    for R in (1, 9, len(x)):
        logits, ref = run(sess, x[:R], False)
        _, tok = run(sess, x[:R], True)
        assert np.array_equal(ref, logits.argmax(-1))
        assert np.array_equal(tok, ref)


@pytest.mark.skipif(q4_matmul.unavailable() is not None, reason=f"speccompile's kernels cannot run here: "
                                                            f"{q4_matmul.unavailable()}")
@pytest.mark.parametrize("on_grid", [True, False])
def test_the_screen_on_speccompiles_kernels_finds_the_float32_argmax(tmp_path, on_grid):
    """A build with speccompile's kernels screens with MatMulQ8Bound (the estimates and their upper bounds in one
    op) and picks the candidates with its TopK: the same certified argmax, for rows with heavy tails and outliers
    too, ties to the lowest token id, confident rows certified without the float32 head and without the stored
    norms' bound."""
    w = random_head(5, on_grid)
    w[300:305] = w[300]
    sess = head_session(w, tmp_path, kernels=True)
    rng = np.random.default_rng(7)
    heavy = (rng.standard_normal((16, H)) * np.exp(rng.standard_normal((16, H)) * 1.5)).astype(np.float32)
    x = np.concatenate([peaked_rows(w, 24), rng.standard_normal((8, H)).astype(np.float32), heavy,
                        w[300:301] * 40])
    for R in (1, 9, len(x)):
        logits, ref = run(sess, x[:R], False)
        _, tok = run(sess, x[:R], True)
        assert np.array_equal(ref, logits.argmax(-1)) and np.array_equal(tok, ref)
    assert tok[-1] == 300
    screened = head_session(w, tmp_path, kernels=True)
    for _ in range(3):
        run(screened, peaked_rows(w, 8), True)
    ran = {(e["args"]["op_name"]) for e in json.load(open(screened.end_profiling())) if e.get("cat") == "Node"}
    assert {q4_matmul.OP_TYPE_Q8_BOUND, "TopK"} <= ran and "ArgMax" not in ran and "MatMulNBits" not in ran
    assert "Abs" not in ran and "head_screen.l1" not in reads(screened.model.graph)
    assert top_k_domains(screened.model.graph) == [q4_matmul.DOMAIN]  # the candidates: speccompile's TopK


@pytest.mark.skipif(q4_matmul.unavailable() is not None, reason=f"speccompile's kernels cannot run here: "
                                                            f"{q4_matmul.unavailable()}")
def test_a_head_on_the_int8_grid_takes_its_float32_product_from_the_screens_records(tmp_path):
    """A head that lies on the screen's int8 grid exactly (a GGUF Q8_0 head) gets its float32 logits (full_logits,
    and the uncertified rows' fallback) from MatMulQ8F over the screen's records: a quarter of the bytes, the float32
    product to its rounding, and no float32 Gemm; a head off the grid keeps the Gemm."""
    w = random_head(8, on_grid=True)
    w[40:44] = w[40]  # a tie, which no screen certifies: the fallback decides it
    sess = head_session(w, tmp_path, kernels=True)
    x = np.concatenate([np.random.default_rng(10).standard_normal((6, H)).astype(np.float32), w[40:41] * 50])
    logits, ref = run(sess, x, False)
    exact = x.astype(np.float64) @ w.astype(np.float64).T
    assert np.abs(logits - exact).max() <= 1e-6 * np.abs(exact).max()
    assert np.array_equal(ref, logits.argmax(-1)) and np.array_equal(run(sess, x, True)[1], ref) and ref[-1] == 40
    ran = {(e["args"]["op_name"]) for e in json.load(open(sess.end_profiling())) if e.get("cat") == "Node"}
    assert q4_matmul.OP_TYPE_Q8F in ran and "Gemm" not in ran
    off_grid = head_session(random_head(8), tmp_path, kernels=True)
    run(off_grid, x, False)
    ran = {(e["args"]["op_name"]) for e in json.load(open(off_grid.end_profiling())) if e.get("cat") == "Node"}
    assert "Gemm" in ran and q4_matmul.OP_TYPE_Q8F not in ran


def reads(graph) -> set[str]:
    """Every name a node of `graph` or of its subgraphs takes as an input."""
    found = set()
    for node in graph.node:
        found |= set(node.input)
        for attribute in node.attribute:
            found |= reads(attribute.g) if attribute.g.node else set()
    return found


def top_k_domains(graph) -> list[str]:
    """The domain of every TopK node in `graph` and its subgraphs."""
    found = []
    for node in graph.node:
        found += [node.domain] if node.op_type == "TopK" else []
        for attribute in node.attribute:
            found += top_k_domains(attribute.g) if attribute.g.node else []
    return found


@pytest.mark.parametrize("copies", [5, CANDIDATES + 16])
def test_ties_go_to_the_lowest_token_id(copies):
    """A tie among a few candidates is settled as ArgMax settles it; more tied rows than candidates cannot be
    certified, and the full product decides."""
    w = random_head()
    w[100:100 + copies] = w[100]
    w[700] = w[100]
    x = peaked_rows(w, 4)
    x[:] = w[100] * 40
    _, tok = run(head_session(w), x, True)
    assert np.all(tok == 100)


def test_peaked_rows_are_certified_without_the_full_product(tmp_path):
    """The point of the screen: a confident row never runs the float32 head (its ArgMax sits only in the
    full and the fallback branches)."""
    w = random_head()
    sess = head_session(w, tmp_path)
    x = peaked_rows(w, 8)
    for _ in range(3):
        run(sess, x, True)
    events = json.load(open(sess.end_profiling()))
    ran = {e["args"]["op_name"] for e in events if e.get("cat") == "Node"}
    assert "MatMulNBits" in ran and "TopK" in ran
    assert "ArgMax" not in ran and "Gemm" not in {e["args"]["op_name"] for e in events if e.get("cat") == "Node"
                                                  and "MatMulAddFusion" not in e["name"]}


def test_near_ties_beyond_the_candidates_fall_back():
    """More near-tied tokens than candidates, apart only where the screen cannot see (dims of x below half an
    int8 step, read as 0): the winner may rank anywhere in the screen, so no candidate set may be certified, and
    the answer must still be the float32 argmax. The head stays on its int8 grid (codes moved by whole steps)."""
    rng = np.random.default_rng(4)
    w = random_head(on_grid=True)
    scale = np.abs(w.reshape(V, -1, BLOCK)).max(-1) / 127
    n = CANDIDATES * 3
    wrong = 0
    for trial in range(8):
        x = (w[100] * 40 + rng.standard_normal(H).astype(np.float32)).astype(np.float32)
        x[BLOCK] = abs(x[BLOCK]) + 1  # sets its block's int8 step; the rest of the block lies below half of it
        x[BLOCK + 1:] = rng.uniform(0.3, 0.45, H - BLOCK - 1) * x[BLOCK] / 127
        dims = rng.integers(BLOCK + 1, H, n)
        steps = np.ones(n)
        winner = rng.integers(n)  # two steps on the largest small dim: ahead of every other copy by ~30 ulps
        dims[winner], steps[winner] = BLOCK + 1 + np.argmax(x[BLOCK + 1:]), 2
        near = np.repeat(w[100:101], n, 0)
        near[np.arange(n), dims] += steps * scale[100, 1]
        w[100:100 + n] = near
        _, tok = run(head_session(w), x[None], True)
        wrong += tok[0] != 100 + winner
    assert wrong == 0


# both screens: onnxruntime's MatMulNBits with the stored norms, speccompile's MatMulQ8Bound where its kernels run
SCREENS = [pytest.param(False, id="onnxruntime"),
           pytest.param(True, id="kernels", marks=pytest.mark.skipif(
               q4_matmul.unavailable() is not None,
               reason=f"speccompile's kernels cannot run here: {q4_matmul.unavailable()}"))]


@pytest.mark.parametrize("kernels", SCREENS)
@pytest.mark.parametrize("on_grid", [True, False])
def test_noisy_screen_is_the_argmax_of_the_float32_logits_plus_the_noise(on_grid, kernels, tmp_path):
    """sample_noise (Gumbel noise in use, runtime/noise.py) moves the argmax; the screen still finds exactly
    argmax(float32 logits + noise), through the screen or the full product, peaked rows without the full
    product; a [1, 1] zero noise is the plain screen."""
    w = random_head(on_grid=on_grid)
    sess = head_session(w, tmp_path, noise=True, kernels=kernels)
    rng = np.random.default_rng(5)
    x = np.concatenate([peaked_rows(w, 24), rng.standard_normal((8, H)).astype(np.float32) * 4])
    moved = 0
    for temperature in (0.3, 1.0, 3.0):
        noise = (-temperature * np.log(rng.standard_exponential((len(x), V)))).astype(np.float32)
        logits, ref = run(sess, x, False, noise)
        assert np.array_equal(ref, (logits + noise).argmax(-1))
        _, tok = run(sess, x, True, noise)
        assert np.array_equal(tok, ref)
        moved += np.sum(tok != logits.argmax(-1))
    assert moved > 0  # the noise did change tokens
    _, plain = run(sess, x, True, np.zeros((1, 1)))
    assert np.array_equal(plain, run(sess, x, False, np.zeros((1, 1)))[0].argmax(-1))
    sess.end_profiling()
    peaked = head_session(w, tmp_path, noise=True, kernels=kernels)
    noise = (-0.7 * np.log(rng.standard_exponential((8, V)))).astype(np.float32)
    run(peaked, peaked_rows(w, 8), True, noise)
    events = json.load(open(peaked.end_profiling()))
    assert "ArgMax" not in {e["args"]["op_name"] for e in events if e.get("cat") == "Node"}


def top_k_reference(logits, noise, top_k):
    """argmax of logits + noise among each row's top_k largest logits (ties at the k-th kept; 0 = all)."""
    k = np.broadcast_to(np.asarray(top_k), (len(logits),))
    kth = np.array([np.sort(row)[-kk] if kk else -np.inf for row, kk in zip(logits, k)])[:, None]
    return np.where(logits >= kth, logits + noise, -np.inf).argmax(-1)


@pytest.mark.parametrize("kernels", SCREENS)
@pytest.mark.parametrize("on_grid", [True, False])
def test_noisy_top_k_screen_draws_within_each_rows_top_k(on_grid, kernels, tmp_path):
    """noise_top_k: with noise, each row's argmax keeps to its top_k largest float32 logits (0: all of them):
    a draw from the top-k distribution. The screen (with its wider candidate set) agrees with the full product
    and with numpy, for one k for all rows, per-row k mixing 0, k beyond the candidates, and greedy passes that
    ignore it; peaked rows with a small k are certified without the float32 product."""
    w = random_head(on_grid=on_grid)
    sess = head_session(w, noise=True, top_k=True, kernels=kernels)
    rng = np.random.default_rng(6)
    x = np.concatenate([peaked_rows(w, 16), rng.standard_normal((8, H)).astype(np.float32) * 4])
    limited = 0
    for top_k in ([1], [3], [40], [CANDIDATES + 100], [0], rng.choice([0, 1, 5, 30, 700], len(x))):
        noise = (-0.8 * np.log(rng.standard_exponential((len(x), V)))).astype(np.float32)
        logits, ref = run(sess, x, False, noise, top_k)
        assert np.array_equal(ref, top_k_reference(logits, noise, top_k))
        _, tok = run(sess, x, True, noise, top_k)
        assert np.array_equal(tok, ref), top_k
        limited += np.sum(ref != (logits + noise).argmax(-1))
    assert limited > 0  # top-k did keep some draws from tokens outside it
    _, plain = run(sess, x, True, np.zeros((1, 1)), [5])  # greedy: top_k has no say
    assert np.array_equal(plain, run(sess, x, False, np.zeros((1, 1)), [5])[0].argmax(-1))
    peaked = head_session(w, tmp_path, noise=True, top_k=True, kernels=kernels)
    run(peaked, peaked_rows(w, 8), True, (-0.5 * np.log(rng.standard_exponential((8, V)))).astype(np.float32), [2])
    events = json.load(open(peaked.end_profiling()))
    assert "ArgMax" not in {e["args"]["op_name"] for e in events if e.get("cat") == "Node"}


def test_the_int8_screen_has_one_reader():
    """onnxruntime pre-packs a matrix for a single kernel only; read by two nodes (a branch each for noise and no
    noise), the int8 product runs unpacked, many times slower. So the screen's codes have exactly one reader."""
    def readers(graph, name):
        return sum(list(node.input).count(name) + sum(readers(a.g, name) for a in node.attribute if a.type == a.GRAPH)
                   for node in graph.node)

    g = GraphBuilder("head")
    g.input("rows", "float32", ["R", H])
    g.input("screen", "bool", [])
    g.input("sample_noise", "float32", ["RN", "VN"])
    W = {k: g.weight(k, v) for k, v in {"head": random_head(), **quantize_head(random_head())}.items()}
    emit_screened_head(g, "rows", "head", W, "screen", noise="sample_noise")
    assert readers(helper.make_graph(g.nodes, "head", g.inputs, []), "head_screen.codes") == 1
