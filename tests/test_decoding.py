"""Speculative decoding is lossless: greedy output equals plain greedy output token for token, and sampled
output has the target's distribution."""
import numpy as np
import pytest

from speccompile.errors import SpeccompileError
from speccompile.format.trees import TreeSpec

from speccompile.runtime.acceptance import accept_chain_q, accept_sampled, chain_parents, sequential
from speccompile.runtime.noise import NoiseSupport
from speccompile.runtime.sampling import SamplingParams, probabilities, sample

from conftest import assert_lossless, random_prompts


@pytest.mark.parametrize("drafter", ["lookup", "layerskip:2", "model"])
def test_greedy_speculative_equals_autoregressive(tiny_generator, drafter):
    assert tiny_generator.generate(random_prompts(1)[0], 8, speculate=False).stats["mean_accepted_tokens"] == 1.0
    # the drafter did get tokens accepted, so the comparison exercised acceptance
    assert max(assert_lossless(tiny_generator, drafter, random_prompts(10), 48)) > 1.0


def test_num_draft_override_and_stream(tiny_generator):
    g = tiny_generator
    prompt = random_prompts(3)[2]
    ref = g.generate(prompt, 30, speculate=False).token_ids
    chunks = list(g.stream(prompt, 30, drafter="model", num_draft=7))
    assert [t for c in chunks for t in c.token_ids] == ref
    assert any(len(c.token_ids) > 1 for c in chunks)  # several tokens committed by one verify pass


def chi2_pvalue(observed, probs):
    """Pearson chi-square goodness of fit; cells with small expectation are pooled."""
    observed = np.asarray(observed, float)
    expected = probs * observed.sum()
    big = expected >= 5
    obs = np.append(observed[big], observed[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    stat = ((obs - exp) ** 2 / exp).sum()
    dof = len(obs) - 1
    from math import exp as e, lgamma, log
    # regularized upper incomplete gamma Q(dof/2, stat/2) by series (dof is small here)
    a, x = dof / 2, stat / 2
    if x > 50 * (a + 10):  # far in the tail: the series below overflows to NaN, which no comparison takes
        return 0.0
    term = s = 1.0 / a
    n = 1
    while abs(term) > 1e-12 * abs(s):
        term *= x / (a + n)
        s += term
        n += 1
    return 1.0 - s * e(-x + a * log(x) - lgamma(a)) if x > 0 else 1.0


def test_accept_sampled_keeps_target_distribution():
    """Unit level: with arbitrary p and q, the first committed token is distributed as p[0]."""
    rng = np.random.default_rng(0)
    V = 6
    p = rng.dirichlet(np.ones(V), size=2)
    q = rng.dirichlet(np.ones(V) * 0.5, size=1)
    counts = np.zeros(V)
    for _ in range(20000):
        x = sample(q[0], rng)
        path, bonus = accept_chain_q(np.array([x]), q, p, sequential(rng))
        counts[x if path else bonus] += 1
    assert chi2_pvalue(counts, p[0]) > 1e-3
    # a deterministic drafter (q one-hot): a chain is a tree whose parents are i - 1
    counts[:] = 0
    for _ in range(20000):
        path, bonus = accept_sampled(np.array([2]), chain_parents(1), p, sequential(rng))
        counts[2 if path else bonus] += 1
    assert chi2_pvalue(counts, p[0]) > 1e-3


def test_accept_chain_q_draws_the_bonus_token_from_the_row_after_the_chain():
    """A one-token chain drawn from q: the first committed token follows p[0], and the token after an accepted
    draft follows p[1] (the target's row after it), not p[0]."""
    rng = np.random.default_rng(5)
    V = 5
    p = np.array([[0.4, 0.3, 0.15, 0.1, 0.05], [0.05, 0.05, 0.1, 0.3, 0.5]])
    q = np.array([[0.2, 0.5, 0.1, 0.1, 0.1]])
    first, second = np.zeros(V), np.zeros(V)
    for _ in range(20000):
        x = sample(q[0], rng)
        path, token = accept_chain_q(np.array([x]), q, p, sequential(rng))
        first[x if path else token] += 1
        if path:
            second[token] += 1
    assert chi2_pvalue(first, p[0]) > 1e-6 and chi2_pvalue(second, p[1]) > 1e-6


@pytest.mark.parametrize("drafter", ["model", "lookup"])
def test_sampled_speculative_matches_target_distribution(tiny_generator, drafter, tree=None):
    """End to end: the joint distribution of the first two sampled tokens, with speculation, against the exact
    target distribution computed from the target's own logits."""
    g = tiny_generator
    params = SamplingParams(temperature=1.5, top_k=4)
    prompt = np.array(random_prompts(2)[1], np.int64)
    eng = g.target
    # exact distribution: p(t1) p(t2 | t1)
    eng.cache.truncate(0)
    logits, _ = eng.forward(prompt)
    p1 = probabilities(logits[0].copy(), params)
    eng.cache.truncate(len(prompt))
    support = np.flatnonzero(p1)
    joint = {}
    for t1 in support:
        lg, _ = eng.forward(np.array([t1]))
        p2 = probabilities(lg[0].copy(), params)
        for t2 in np.flatnonzero(p2):
            joint[(t1, t2)] = p1[t1] * p2[t2]
    cells = sorted(joint)
    probs = np.array([joint[c] for c in cells])
    counts = np.zeros(len(cells))
    for seed in range(3000):
        res = g.generate(prompt, 6, drafter=drafter, temperature=1.5, top_k=4, seed=seed, tree=tree)
        counts[cells.index(tuple(res.token_ids[:2]))] += 1
    assert chi2_pvalue(counts, probs) > 1e-3


@pytest.mark.parametrize("drafter", ["model", "lookup"])
def test_sampled_rule_matches_target_distribution(tiny_generator, drafter, monkeypatch):
    """The same through the sampled acceptance rule, as over graphs without the noise inputs (top-k is sampled by
    noise where the graphs take it: runtime/noise.py)."""
    monkeypatch.setattr(tiny_generator, "noise_ok", NoiseSupport())
    test_sampled_speculative_matches_target_distribution(tiny_generator, drafter)


def _nucleus_reference(p: np.ndarray, top_p: float) -> np.ndarray:
    """Top-p's kept tokens by the whole row's order (most probable first, ties by lower id)."""
    order = np.lexsort((np.arange(len(p)), -p))
    keep = np.cumsum(p[order]) - p[order] < top_p
    return np.sort(order[keep])


@pytest.mark.parametrize("case", ["peaked", "flat", "ties", "tie_at_the_edge", "small_vocab"])
def test_nucleus_search_keeps_what_sorting_the_whole_row_keeps(case):
    """The nucleus sought among the most probable tokens (sampling.nucleus) keeps exactly the tokens a sort
    of the whole row keeps: peaked rows (found among the first candidates), flat ones (the whole row sorted), ties
    inside the nucleus, at a candidate set's edge (a share of the likeliest token's probability) and just below it."""
    from speccompile.runtime import sampling
    rng = np.random.default_rng(len(case))
    V = 64 if case == "small_vocab" else 20000
    share = sampling.NUCLEUS_SHARES[0]
    for trial in range(20):
        top_ps = (0.3, 0.9, 0.999)
        if case == "flat":
            p = rng.random(V) + 1.0
        elif case == "ties":
            p = np.round(np.exp(rng.standard_normal(V) * 3)) + 1e-3
        elif case == "tie_at_the_edge":  # ten tokens tied at the first set's edge, ten just below it, the nucleus
            p, order = np.full(V, 1e-9), rng.permutation(V)  # ending among either
            p[order[:50]] = rng.random(50) * 0.5 + 0.5
            p[order[0]] = 1.0
            p[order[50:60]] = share
            p[order[60:70]] = share * (1 - 1e-12)
            top_ps = tuple((p[order[:50]].sum() + k * share) / p.sum() for k in (2.5, 12.5))
        else:
            p = np.exp(rng.standard_normal(V) * 3)
        p /= p.sum()
        for top_p in top_ps:
            kept = np.sort(sampling.nucleus(p, top_p))
            assert np.array_equal(kept, _nucleus_reference(p, top_p)), (case, trial, top_p)


def test_probabilities_top_k_top_p():
    logits = np.log(np.array([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    p = probabilities(logits, SamplingParams(temperature=1.0, top_k=2))
    assert np.allclose(p, [[0.5 / 0.7, 0.2 / 0.7, 0, 0, 0]])
    p = probabilities(logits, SamplingParams(temperature=1.0, top_p=0.8))  # 0.5+0.2 < 0.8 -> keep 3
    assert np.allclose(p, [[0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0]])
    with pytest.raises(ValueError):
        SamplingParams(temperature=1.0, top_p=0.0)


def _min_p_reference(logits: np.ndarray, temperature: float, min_p: float) -> np.ndarray:
    """min-p by its definition: of the softmax after temperature, the tokens at least min_p times the most probable
    one's probability, renormalised."""
    p = np.exp(logits / temperature - (logits / temperature).max())
    p /= p.sum()
    p = np.where(p >= min_p * p.max(), p, 0.0)
    return p / p.sum()


def test_probabilities_min_p():
    rng = np.random.default_rng(5)
    for trial in range(50):
        logits = rng.normal(0, 3, 300)
        temperature, min_p = rng.uniform(0.3, 3.0), rng.choice([0.01, 0.05, 0.2, 0.7])
        p = probabilities(logits, SamplingParams(temperature=temperature, min_p=min_p))
        assert np.allclose(p, _min_p_reference(logits, temperature, min_p), atol=1e-12), trial
    logits = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05]))
    assert np.allclose(probabilities(logits, SamplingParams(temperature=1.0, min_p=0.3)),
                       [0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0])  # 0.15 >= 0.3 * 0.5
    assert np.allclose(probabilities(logits, SamplingParams(temperature=1.0, min_p=1.0)), [1, 0, 0, 0, 0])
    # with top-k the same tokens in either order; top-p after min-p (vLLM's order): its mass over what min-p kept
    assert np.allclose(probabilities(logits, SamplingParams(temperature=1.0, min_p=0.3, top_k=2)),
                       [0.5 / 0.7, 0.2 / 0.7, 0, 0, 0])
    assert np.allclose(probabilities(logits, SamplingParams(temperature=1.0, min_p=0.25, top_p=0.8)),
                       [0.5 / 0.7, 0.2 / 0.7, 0, 0, 0])  # renormalised .59, .24, .18: .59 + .24 reaches 0.8
    assert SamplingParams(temperature=1.0, min_p=0.1).filtered_on_host
    assert not SamplingParams(temperature=1.0, top_k=5).filtered_on_host


def test_top_k_keeps_every_token_tied_with_the_kth():
    """Top-k keeps the k-th largest logit's ties (as the graphs' top-k mask does), each with its softmax share."""
    logits = np.array([[3.0, 1.0, 2.0, 2.0, 0.0], [1.0, 1.0, 1.0, 0.0, 1.0]])
    p = probabilities(logits, SamplingParams(temperature=1.0, top_k=2))
    e = np.exp([3.0, 2.0, 2.0])
    assert np.allclose(p[0], [e[0], 0, e[1], e[2], 0] / e.sum())
    assert np.allclose(p[1], [0.25, 0.25, 0.25, 0.0, 0.25])


@pytest.mark.parametrize("bad", [dict(temperature=float("nan")), dict(temperature=float("inf")),
                                 dict(temperature=-0.5), dict(temperature="1"), dict(top_k=-1), dict(top_k=2.5),
                                 dict(top_p=float("nan")), dict(top_p=1.5), dict(top_p=0.0), dict(seed=-1),
                                 dict(seed=1.5), dict(top_k=True), dict(temperature=1e6 * 1.001),
                                 dict(temperature=1e300), dict(temperature=10 ** 400), dict(top_p=10 ** 400),
                                 dict(min_p=-0.1), dict(min_p=1.5), dict(min_p=float("nan")), dict(min_p="0.1")])
def test_sampling_settings_are_checked(bad):
    with pytest.raises(SpeccompileError, match="invalid sampling parameters"):
        SamplingParams(**bad)


def test_temperatures_up_to_the_cap_sample_all_over_the_vocabulary(tiny_generator):
    """Far above the cap T * G overflowed float32 and the lowest ids won; at the cap sampling is near uniform."""
    from speccompile.runtime.sampling import MAX_TEMPERATURE
    firsts = [tiny_generator.generate([1, 5, 9], 1, chat=False, temperature=MAX_TEMPERATURE, seed=s).token_ids[0]
              for s in range(60)]
    assert len(set(firsts)) > 40 and np.median(firsts) > tiny_generator.target.vocab_size / 4


def test_num_draft_drafts_a_chain_of_that_many_instead_of_the_bundles_tree(tiny_generator, monkeypatch):
    g, prompt = tiny_generator, random_prompts(3)[2]
    monkeypatch.setitem(g.trees, "model", TreeSpec.parse("dynamic:12"))  # as a default build gives its drafters
    assert g.generate(prompt, 30, drafter="model").stats["tree"] == g.trees["model"].to_dict()
    chunks = list(g.stream(prompt, 30, drafter="model", num_draft=2))
    assert max(len(c.token_ids) for c in chunks) == 3  # two drafts and the target's token, at most
    res = g.generate(prompt, 30, drafter="model", num_draft=2)
    assert res.stats["tree"] is None and res.token_ids == g.generate(prompt, 30, speculate=False).token_ids


@pytest.mark.parametrize("noise", [True, False])
def test_temperatures_below_the_floor_are_greedy(tiny_generator, monkeypatch, noise):
    """logits / T overflows float32 for T near 1e-38 (every probability NaN: the in-graph rule then rejected every
    draft and drew token 0); below GREEDY_BELOW a request is greedy, as in vLLM, on every path."""
    from speccompile.runtime.sampling import GREEDY_BELOW
    assert SamplingParams(temperature=1e-39, seed=1).greedy and SamplingParams(temperature=1e-39).temperature == 0
    assert not SamplingParams(temperature=GREEDY_BELOW).greedy
    if not noise:  # the sampled rule in the graph, as bundles without the noisy head run it
        monkeypatch.setattr(tiny_generator, "noise_ok", NoiseSupport())
    prompt = random_prompts(3, seed=6)[2]
    greedy = tiny_generator.generate(prompt, 24, speculate=False).token_ids
    for t in (1e-39, 1e-310):
        assert tiny_generator.generate(prompt, 24, temperature=t, seed=3, drafter="model").token_ids == greedy
