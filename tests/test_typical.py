"""Typical acceptance (lossy, opt-in): its rule against a numpy reference, greedy still exact, and how far its
output distribution moves from exact sampling on a tiny model."""
import numpy as np
import pytest

from conftest import random_prompts
from speccompile.errors import SpeccompileError
from speccompile.runtime.acceptance import (TypicalRule, accept_on_host, accept_typical, from_table, sequential,
                                            typical_threshold)
from speccompile.runtime.drafters.base import Proposal
from speccompile.runtime.sampling import SamplingParams, acceptance_option, draw, probabilities
from speccompile.runtime.streams import drain


def reference_typical(tokens, parents, p, eps, alpha, uniforms):
    """Every root-to-node path checked on its own; the deepest whose tokens all pass, the first among equals."""
    entropy = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=1)
    threshold = np.minimum(eps, alpha * np.exp(-entropy))
    best = []
    for node in range(len(tokens)):
        path, v = [], node
        while v >= 0:
            path.insert(0, v)
            v = parents[v]
        rows = [0] + [u + 1 for u in path[:-1]]
        if all(p[r, tokens[u]] > threshold[r] for r, u in zip(rows, path)) and len(path) > len(best):
            best = path
    row = best[-1] + 1 if best else 0
    return best, draw(p[row], uniforms[row, 1])


@pytest.mark.parametrize("seed", range(40))
def test_typical_rule_matches_numpy_reference(seed):
    rng = np.random.default_rng(seed)
    n, vocab = int(rng.integers(1, 12)), 6
    parents = np.array([int(rng.integers(-1, i)) for i in range(n)])
    tokens = rng.integers(0, vocab, n)
    p = rng.dirichlet(np.full(vocab, rng.choice([0.2, 1.0, 5.0])), size=n + 1)
    eps, alpha = rng.choice([0.09, 0.3, 0.6]), rng.choice([0.3, 0.9])
    uniforms = rng.random((n + 1, 2))
    path, token = accept_typical(tokens, parents, p, eps, alpha, from_table(uniforms))
    assert (path, token) == reference_typical(tokens, parents, p, eps, alpha, uniforms)


@pytest.mark.parametrize("eps,alpha", [(0.3, 0.9), (0.9, 0.2)])
def test_requests_under_typical_acceptance_use_their_epsilon_and_alpha(eps, alpha):
    """accept_on_host (the runtime's host rule) applies typical acceptance with the request's own EPS and ALPHA,
    each in its place: the same verdicts as accept_typical called with them on the request's distributions."""
    rng = np.random.default_rng(3)
    params = SamplingParams(1.0, acceptance="typical", typical_epsilon=eps, typical_alpha=alpha)
    differs = 0
    for trial in range(200):
        n, vocab = int(rng.integers(1, 8)), 6
        parents = np.array([int(rng.integers(-1, i)) for i in range(n)])
        tokens = rng.integers(0, vocab, n)
        logits = rng.standard_normal((n + 1, vocab)) * float(rng.choice([0.5, 2.0]))
        p = probabilities(logits, params)
        seed = int(rng.integers(2**32))
        got = accept_on_host(Proposal(tokens, None, parents), logits, logits.argmax(-1), params,
                             np.random.default_rng(seed))
        assert got == accept_typical(tokens, parents, p, eps, alpha, sequential(np.random.default_rng(seed)))
        swapped = accept_typical(tokens, parents, p, alpha, eps, sequential(np.random.default_rng(seed)))
        differs += swapped.path != got.path
    assert differs > 10  # the cases tell EPS from ALPHA


def test_acceptance_option_and_params():
    assert acceptance_option(None) == {"acceptance": "exact"}
    assert acceptance_option("typical") == {"acceptance": "typical"}
    assert acceptance_option("typical:0.2,0.5") == {"acceptance": "typical", "typical_epsilon": 0.2,
                                                    "typical_alpha": 0.5}
    # fields by position: an empty EPS leaves EPS its default, and ALPHA is not taken for it
    assert acceptance_option("typical:,0.2") == {"acceptance": "typical", "typical_alpha": 0.2}
    assert acceptance_option("typical:0.2,") == {"acceptance": "typical", "typical_epsilon": 0.2}
    for bad in ("typical:x", "typical:1,2,3", "lenient", 5, ""):
        with pytest.raises(SpeccompileError):
            acceptance_option(bad)
    with pytest.raises(SpeccompileError):
        SamplingParams(0.7, acceptance="typical", typical_epsilon=0.0)
    assert not SamplingParams(0.0, acceptance="typical").typical  # greedy stays exact
    assert SamplingParams(0.7, acceptance="typical").typical


@pytest.mark.parametrize("drafter", ["model", "lookup"])
def test_greedy_under_typical_acceptance_is_exact(tiny_generator, drafter):
    g = tiny_generator
    for prompt in random_prompts(4):
        ref = g.generate(prompt, 24, speculate=False)
        res = g.generate(prompt, 24, drafter=drafter, tree="dynamic:3+lookup:2", acceptance="typical")
        assert res.token_ids == ref.token_ids and res.stats["acceptance"] == "exact"


def first_two_tokens(g, prompt, runs, **kwargs):
    counts, accepted = {}, []
    for seed in range(runs):
        res = g.generate(prompt, 12, seed=seed, **kwargs)
        key = tuple(res.token_ids[:2])
        counts[key] = counts.get(key, 0) + 1
        accepted.append(res.stats["mean_accepted_tokens"])
    return counts, float(np.mean(accepted))


def exact_joint(g, prompt, params):
    eng = g.target
    eng.cache.truncate(0)
    logits, _ = eng.forward(prompt)
    p1 = probabilities(logits[0].copy(), params)
    joint = {}
    for t1 in np.flatnonzero(p1):
        eng.cache.truncate(len(prompt))
        lg, _ = eng.forward(np.array([t1]))
        p2 = probabilities(lg[0].copy(), params)
        for t2 in np.flatnonzero(p2):
            joint[(int(t1), int(t2))] = p1[t1] * p2[t2]
    return joint


def total_variation(counts, joint):
    n = sum(counts.values())
    return 0.5 * sum(abs(counts.get(c, 0) / n - joint.get(c, 0.0)) for c in set(counts) | set(joint))


def test_typical_acceptance_distance_from_exact_sampling(tiny_generator):
    """Exact speculative sampling stays within sampling noise of the target's joint distribution of the first two
    tokens; typical acceptance accepts more per pass and stays within a bounded distance (docs/results.md)."""
    g = tiny_generator
    prompt = np.array(random_prompts(2)[1], np.int64)
    kw = dict(drafter="model", tree="dynamic:3", temperature=1.0, top_k=8)
    joint = exact_joint(g, prompt, SamplingParams(1.0, top_k=8))
    exact, exact_acc = first_two_tokens(g, prompt, 500, **kw)
    typical, typical_acc = first_two_tokens(g, prompt, 500, acceptance="typical", **kw)
    tv_exact, tv_typical = total_variation(exact, joint), total_variation(typical, joint)
    print(f"TV exact {tv_exact:.3f} typical {tv_typical:.3f}; tokens per pass {exact_acc:.2f} {typical_acc:.2f}")
    assert tv_exact < 0.15
    assert typical_acc > exact_acc
    assert tv_typical < 0.3


def test_bench_method_names_carry_the_acceptance():
    from speccompile.bench.methods import split_acceptance, split_method
    assert split_method("mtp@dynamic:2+lookup:6~typical:0.1,0.3") == ("mtp", "dynamic:2+lookup:6")
    assert split_acceptance("mtp@dynamic:2+lookup:6~typical:0.1,0.3") == ("mtp@dynamic:2+lookup:6", "typical:0.1,0.3")
    assert split_acceptance("mtp") == ("mtp", None)


@pytest.mark.parametrize("seed", range(30))
def test_typical_rule_by_noise_matches_the_host_rule(seed):
    """A request sampled by noise applies typical acceptance to the pass's rows in float32 (TypicalRule): the path
    the numpy reference takes on the float64 distribution (temperature, top-k) of the same rows, then the row's
    own draw (the noisy argmax the graph returns) at the path's end."""
    rng = np.random.default_rng(seed)
    n, vocab = int(rng.integers(1, 10)), 40
    parents = np.array([int(rng.integers(-1, i)) for i in range(n)])
    logits = (rng.standard_normal((n + 1, vocab)) * float(rng.choice([0.5, 2.0, 4.0]))).astype(np.float32)
    # drafts among each parent row's likelier tokens, so that both verdicts occur
    tokens = np.array([int(rng.choice(np.argsort(-logits[p + 1])[:6])) for p in parents])
    temperature, top_k = float(rng.choice([0.7, 1.0])), int(rng.choice([0, 5, 12]))
    eps, alpha = float(rng.choice([0.09, 0.3])), float(rng.choice([0.3, 0.9]))
    p = probabilities(logits, SamplingParams(temperature, top_k=top_k))
    rule = TypicalRule(temperature, top_k, eps, alpha)
    terms = rule.terms(logits[0])  # typical where x >= floor and x > bar = log Z + log typical_threshold
    x = logits[0] * np.float32(1 / temperature) - terms.shift
    kept = x >= terms.floor
    assert np.array_equal(kept, p[0] > 0)
    log_z = np.log(np.exp(x[kept].astype(np.float64)).sum())
    assert np.isclose(terms.bar - log_z, np.log(typical_threshold(p[0], eps, alpha)), atol=1e-5)
    draws = rng.integers(0, vocab, n + 1)
    path, _ = reference_typical(tokens, parents, p, eps, alpha, rng.random((n + 1, 2)))
    got = rule.verdict(tokens, parents, logits, draws)
    assert got == (path, int(draws[path[-1] + 1 if path else 0]))
    if np.array_equal(parents, np.arange(n) - 1):  # a chain: parents None says the same
        assert rule.verdict(tokens, None, logits, draws) == got


def test_typical_acceptance_by_noise_reads_the_screened_rows(tiny_generator, monkeypatch):
    """Over a target whose graphs sample by noise, a typical request's passes go through the exact head's screen
    (no float32 head product a pass: full_logits off), and a seed gives the same answer twice."""
    g = tiny_generator
    seen = []
    forward = g.target.forward

    def spy(*args, **kwargs):
        seen.append((kwargs.get("full_logits", True), kwargs.get("noise") is not None))
        return forward(*args, **kwargs)

    monkeypatch.setattr(g.target, "forward", spy)
    prompt = random_prompts(2)[1]
    kw = dict(drafter="model", tree="dynamic:3", temperature=0.8, seed=5, acceptance="typical", chat=False)
    first = g.generate(prompt, 20, **kw)
    assert seen and all(not full and noisy for full, noisy in seen)
    assert first.stats["mean_accepted_tokens"] > 1.0 and first.stats["acceptance"] == "typical (lossy)"
    monkeypatch.undo()
    assert g.generate(prompt, 20, **kw).token_ids == first.token_ids


def test_typical_requests_share_passes_and_keep_their_bounded_distance(tiny_generator):
    """Sampled by noise, typical requests are served by the scheduler's shared passes (four at a time here) instead
    of each holding the slots in a loop of its own: they share passes, accept more than exact speculation, and
    their first two tokens stay within the bounded distance of the target's joint distribution."""
    g = tiny_generator
    prompt = np.array(random_prompts(2)[1], np.int64)
    kw = dict(drafter="model", tree="dynamic:3", temperature=1.0, top_k=8, acceptance="typical")
    joint = exact_joint(g, prompt, SamplingParams(1.0, top_k=8))
    shared_before, counts, accepted = g.scheduler.shared_passes, {}, []
    for first in range(0, 400, 4):
        streams = [g.stream(prompt, 12, seed=seed, **kw) for seed in range(first, first + 4)]
        for res in [drain(s) for s in streams]:
            key = tuple(res.token_ids[:2])
            counts[key] = counts.get(key, 0) + 1
            accepted.append(res.stats["mean_accepted_tokens"])
    _, exact_acc = first_two_tokens(g, prompt, 100, **{k: v for k, v in kw.items() if k != "acceptance"})
    tv = total_variation(counts, joint)
    print(f"TV typical, shared passes {tv:.3f}; tokens per pass {np.mean(accepted):.2f} (exact {exact_acc:.2f})")
    assert g.scheduler.shared_passes - shared_before > 100
    assert np.mean(accepted) > exact_acc and tv < 0.3
