"""In-graph verification: the verify extension of the target's graph accepts drafts itself (greedy and sampled),
and the runtime then fetches no logits."""
import numpy as np
import onnxruntime as ort
import pytest

from speccompile.graphs import MAX_STEP_TOKENS, decoder_signature
from speccompile.graphs.builder import GraphBuilder
from speccompile.runtime.engine import session_options
from speccompile.runtime.noise import NoiseSupport
from speccompile.runtime.acceptance import accept_greedy, accept_sampled, from_table
from speccompile.runtime.sampling import SamplingParams, probabilities
from speccompile.compile.graph.verify import emit_verify, sampling_flag
from speccompile.plugins import q4_matmul

from conftest import assert_lossless, random_prompts
from test_decoding import chi2_pvalue

VERIFY_INPUTS = ("input_ids", "logits_index", "node_parents", "temperature", "top_k", "uniforms")


@pytest.fixture(scope="module", params=["standard ops", "kernel"])
def verify_graph(request):
    """The verify extension alone, over logits given as an input: the rule can be run on any p, fast. Twice: in
    standard ops, and with greedy acceptance by speccompile's GreedyAccept (a graph that runs its kernels)."""
    kernel = request.param == "kernel"
    if kernel and q4_matmul.unavailable():
        pytest.skip(f"speccompile's kernels cannot run here: {q4_matmul.unavailable()}")
    V = 6
    g = GraphBuilder("verify")
    ins, outs = decoder_signature(0, 1, 1, 16, V, 1, verify=True)
    g.input("logits", "float32", ["R", V])
    for n, dt, shape in ins:
        if n in VERIFY_INPUTS:
            g.input(n, dt, shape)
    g.op("ArgMax", ["logits"], outputs=["next_token"], axis=-1, keepdims=0)
    emit_verify(g, "logits", "next_token", sampling_flag(g), kernel=kernel)
    for n, dt, shape in outs:
        if n not in ("logits", "hidden_states"):
            g.output(n, dt, shape)
    options = session_options(1)
    if kernel:
        options.register_custom_ops_library(q4_matmul.library())
    sess = ort.InferenceSession(g.to_model({}).SerializeToString(), options)
    names = [o.name for o in sess.get_outputs()]

    def run(logits, tokens, parents, temperature=0.0, top_k=0, uniforms=None):
        R = len(tokens)
        out = sess.run(None, {"logits": np.asarray(logits, np.float32), "input_ids": np.asarray(tokens)[None],
                              "logits_index": np.arange(R), "node_parents": np.asarray(parents),
                              "temperature": np.array([temperature], np.float32), "top_k": np.array([top_k]),
                              "uniforms": np.zeros((R, 2)) if uniforms is None else uniforms})
        return dict(zip(names, out))
    run.V = V
    return run


def random_tree(rng, n):
    return np.array([int(rng.integers(-1, i)) for i in range(n)], np.int64)


def test_graph_greedy_acceptance_equals_accept_greedy(verify_graph):
    rng = np.random.default_rng(0)
    V = verify_graph.V
    for trial in range(300):
        n = int(rng.integers(0, 14))
        parents = np.arange(n) - 1 if trial % 4 == 0 else random_tree(rng, n)  # some chains
        logits = rng.standard_normal((n + 1, V))
        argmax = logits.argmax(-1)
        block_parents = np.concatenate([[-1], parents + 1]).astype(np.int64)
        tokens = rng.integers(0, V, n)  # small V: duplicate siblings occur too
        forced = rng.random(n) < 0.7  # tokens the target agrees with, so that long paths occur
        tokens[forced] = argmax[block_parents[1:][forced]]
        out = verify_graph(logits, np.concatenate([[0], tokens]), block_parents)
        assert_same_verdict(out, accept_greedy(tokens, parents, argmax))


def assert_same_verdict(out, verdict):
    path, token = verdict
    assert out["accept_node"][0] == (path[-1] + 1 if path else 0)
    assert out["accept_len"][0] == len(path)
    assert out["accept_token"][0] == token


def test_graph_acceptance_reaches_the_end_of_a_full_verify_block(verify_graph):
    """A chain as long as a verify block may be (MAX_STEP_TOKENS rows), accepted to its end or cut deep down: the
    graph's ancestor relation reaches every row, so accept_len counts every accepted node."""
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((MAX_STEP_TOKENS, verify_graph.V))
    argmax = logits.argmax(-1)
    parents = np.arange(MAX_STEP_TOKENS) - 1
    tokens = np.concatenate([[0], argmax[:-1]])  # each node is its parent row's argmax
    for wrong in (None, 70, 120):
        drafted = tokens.copy()
        if wrong is not None:
            drafted[wrong] = (argmax[wrong - 1] + 1) % verify_graph.V
        out = verify_graph(logits, drafted, parents)
        verdict = accept_greedy(drafted[1:], parents[1:] - 1, argmax)
        assert len(verdict.path) == (MAX_STEP_TOKENS - 1 if wrong is None else wrong - 1)
        assert_same_verdict(out, verdict)


def test_graph_sampled_acceptance_equals_accept_sampled(verify_graph):
    """Draw for draw: fed the same uniforms (acceptance.from_table reads them as the graph does), the graph's
    recursive rejection accepts the same path and draws the same token as the acceptance module's rule."""
    rng = np.random.default_rng(1)
    V = verify_graph.V
    accepted = 0
    for trial in range(300):
        n = int(rng.integers(0, 14))
        parents = np.arange(n) - 1 if trial % 4 == 0 else random_tree(rng, n)
        logits = (rng.standard_normal((n + 1, V)) * 2).astype(np.float32)
        params = SamplingParams(temperature=float(rng.choice([0.7, 1.0, 1.3])), top_k=int(rng.choice([0, 3])))
        p = probabilities(logits, params)
        block_parents = np.concatenate([[-1], parents + 1]).astype(np.int64)
        # candidates drawn from the target's own rows, so that long paths are accepted; duplicates occur
        tokens = np.array([int(rng.choice(V, p=p[r])) for r in block_parents[1:]], np.int64)
        uniforms = rng.random((n + 1, 2))
        out = verify_graph(logits, np.concatenate([[0], tokens]), block_parents, params.temperature, params.top_k,
                           uniforms)
        verdict = accept_sampled(tokens, parents, p, from_table(uniforms))
        assert_same_verdict(out, verdict)
        accepted += len(verdict.path)
    assert accepted > 300  # paths of several nodes were compared, not only rejections


def committed(out, tokens, parents):
    """The tokens a verify pass commits: the accepted path's, then the token after it."""
    end, path = int(out["accept_node"][0]), []
    while end > 0:
        path.append(end)
        end = parents[end]
    return [tokens[i] for i in path[::-1]] + [int(out["accept_token"][0])]


def test_graph_sampled_acceptance_keeps_target_distribution(verify_graph):
    """Recursive rejection in the graph: the first committed token is distributed as p(row 0), and the one after
    an accepted first node as p(that node's row), with temperature and top-k applied in the graph."""
    rng = np.random.default_rng(0)
    V = verify_graph.V
    logits = rng.standard_normal((5, V)) * 1.5
    params = SamplingParams(temperature=1.3, top_k=4)
    p = probabilities(logits.astype(np.float32), params)
    a, b = np.argsort(-p[0])[:2]
    x = int(np.argsort(-p[1])[1])
    # the root's children: a, b and a again (an already rejected token); node 1 has child x
    tokens = np.array([0, a, b, a, x])
    parents = np.array([-1, 0, 0, 0, 1])
    out = verify_graph(logits, tokens, parents, 1.3, 4, rng.random((5, 2)))
    assert np.allclose(out["node_prob"], [0, p[0, a], p[0, b], p[0, a], p[1, x]])
    first, second = np.zeros(V), np.zeros(V)
    for _ in range(20000):
        out = verify_graph(logits, tokens, parents, 1.3, 4, rng.random((5, 2)))
        t = committed(out, tokens, parents)
        first[t[0]] += 1
        if len(t) > 1 and t[0] == a:  # node 1 accepted
            second[t[1]] += 1
    assert chi2_pvalue(first, p[0]) > 1e-3
    assert chi2_pvalue(second, p[1]) > 1e-3


@pytest.mark.parametrize("drafter", ["lookup", "model"])
@pytest.mark.parametrize("tree", [None, "dynamic:12"])
def test_in_graph_greedy_equals_autoregressive(tiny_generator, drafter, tree):
    g = tiny_generator
    assert g.target.verifies
    g.target.logits[:] = 7.0  # a verify pass must leave the logits buffer alone: they are not fetched
    accepted = assert_lossless(g, drafter, random_prompts(4), 24, tree)
    assert max(accepted) > 1.0
    assert (g.target.logits[1:] == 7.0).all()  # the prefill fetches one row; no verify fetched any
    res = g.generate(random_prompts(2)[1], 16, drafter=drafter, tree=tree)
    # every pass that had drafts accepted in the graph (a pass without drafts is a plain decode step)
    assert res.stats["verified_on_host"] == 0 and res.stats["verified_in_graph"] > 0


def test_host_fallback_for_bundles_without_the_extension(tiny_generator, monkeypatch):
    g = tiny_generator
    prompt = random_prompts(2)[1]
    fast = g.generate(prompt, 20, drafter="lookup", tree="dynamic:8")
    monkeypatch.setattr(g.target, "verifies", False)
    slow = g.generate(prompt, 20, drafter="lookup", tree="dynamic:8")
    assert slow.token_ids == fast.token_ids and slow.stats["verified_in_graph"] == 0


def test_sampled_verification_paths(tiny_generator, monkeypatch):
    """Sampled passes verify in the graph unless top-p or draft distributions q need the host; a seed
    reproduces a run. (The committed tokens' distribution end to end: test_trees / test_decoding.) Top-k is
    sampled by noise where the graphs take it (test_noise): here the sampled rule, as for a bundle without it."""
    g = tiny_generator
    monkeypatch.setattr(g, "noise_ok", NoiseSupport())
    prompt = random_prompts(2)[1]
    kw = dict(temperature=1.5, top_k=4, seed=0)
    tree = g.generate(prompt, 12, drafter="lookup", tree="dynamic:8", **kw)
    assert tree.stats["verified_on_host"] == 0 and tree.stats["verified_in_graph"] > 0
    assert g.generate(prompt, 12, drafter="lookup", tree="dynamic:8", **kw).token_ids == tree.token_ids
    chain = g.generate(prompt, 12, drafter="model", **kw).stats  # drafts with q rows: on the host
    assert chain["verified_in_graph"] == 0 < chain["verified_on_host"]
    assert g.generate(prompt, 12, drafter="lookup", temperature=1.5, top_p=0.9, seed=0).stats[
        "verified_in_graph"] == 0
