"""Sampled acceptance by the target's own draws (acceptance.accept_drawn). A request sampled by the rule on the host
(top-p or min-p: not by noise, runtime/noise.py) draws the token at each position with a uniform that depends only on
its seed and the position (sampling.PositionDraws), and a deterministic draft is accepted where it equals that draw.
So speculation commits, token for token, what plain sampling commits with the same seed, whatever the drafts
(adaptive drafting's, which follow measured times, included), alone or sharing passes; and the committed tokens
follow the target's distribution."""
import numpy as np
import pytest

from conftest import random_prompts
from speccompile.runtime.acceptance import accept_drawn
from speccompile.runtime.generator import drain
from speccompile.runtime.sampling import PositionDraws, SamplingParams, probabilities
from test_adaptive import synthetic
from test_decoding import chi2_pvalue

TOP_P = dict(temperature=4.0, top_p=0.9)  # peaked tiny targets: about half the positions draw among several tokens
MIN_P = dict(temperature=4.0, min_p=0.05)


def test_a_positions_uniform_depends_on_the_seed_and_the_position_only():
    a, b = PositionDraws(7), PositionDraws(7)
    us = [a.uniform(t) for t in (3, 4, 5)]
    assert b.uniform(5) == us[2] and b.uniform(3) == us[0] and len(set(us)) == 3  # any order: the same uniform
    assert PositionDraws(8).uniform(3) != us[0]
    assert PositionDraws(None).uniform(3) != PositionDraws(None).uniform(3)
    u = np.array([a.uniform(t) for t in range(4000)])
    assert 0.0 <= u.min() and u.max() < 1.0 and abs(u.mean() - 0.5) < 0.02 and abs(u.var() - 1 / 12) < 0.005
    for lag in range(1, 9):  # neighbouring positions' uniforms are unrelated (noise rows once were: test_noise.py)
        assert abs(np.corrcoef(u[:-lag], u[lag:])[0, 1]) < 0.06 and np.mean(u[:-lag] == u[lag:]) == 0.0


def test_drawn_acceptance_takes_what_recursive_rejection_takes():
    """Over the uniform's whole range: two sibling candidates x, y are taken with probabilities p(x) and p(y)
    (recursive rejection takes x with p(x), then y with p'(y) = p(y) / (1 - p(x)), the same in all), and the
    committed token follows p."""
    p = np.array([[0.1, 0.4, 0.2, 0.3], [0.25] * 4, [0.5, 0.5, 0.0, 0.0]])
    tokens, parents = np.array([1, 3]), np.array([-1, -1])
    grid = (np.arange(20000) + 0.5) / 20000
    verdicts = [accept_drawn(tokens, parents, p, lambda row, u=u: u) for u in grid]
    first = np.array([v.path[0] if v.path else -1 for v in verdicts])
    assert abs((first == 0).mean() - 0.4) < 1e-3 and abs((first == 1).mean() - 0.3) < 1e-3
    committed = np.array([tokens[v.path[0]] if v.path else v.token for v in verdicts])
    assert np.allclose(np.bincount(committed, minlength=4) / len(grid), p[0], atol=1e-3)
    chain = accept_drawn(np.array([2, 0]), np.array([-1, 0]), p, lambda row: [0.6, 0.1, 0.9][row])
    assert chain.path == [0, 1] and chain.token == 1  # draws 2, then 0, then the bonus draw at row 2


@pytest.mark.parametrize("drafter,tree,settings", [
    ("model", "dynamic:4", TOP_P), ("lookup", None, TOP_P), ("model", "dynamic:3+lookup:4", TOP_P),
    ("model", "adaptive+lookup:4", TOP_P), ("model", "dynamic:3+lookup:4", MIN_P),
    ("model", "adaptive+lookup:4", MIN_P)])
def test_host_filtered_speculation_samples_what_plain_decoding_samples(tiny_generator, drafter, tree, settings,
                                                                       monkeypatch):
    """Top-p and min-p, whose rows the host filters."""
    g = tiny_generator
    monkeypatch.setattr(g, "_cost", synthetic(5.0, 0.05))  # adaptive drafting: rows cheap enough to draft
    accepted = []
    for seed, prompt in enumerate(random_prompts(4)):
        ref = g.generate(prompt, 20, speculate=False, seed=seed, **settings)
        res = g.generate(prompt, 20, drafter=drafter, tree=tree, seed=seed, **settings)
        assert res.token_ids == ref.token_ids, (drafter, tree, seed)
        assert res.stats["verified_on_host"] > 0 and res.stats["verified_in_graph"] == 0
        accepted.append(res.stats["mean_accepted_tokens"])
    assert max(accepted) > 1.0  # drafts were taken


def test_top_p_with_a_chain_drawn_from_q_keeps_the_distribution_not_the_tokens(tiny_generator):
    """A draft model's chain is drawn from its distributions q and accepted by rejection against them (min(1, p/q),
    the request's generator's uniforms), not where it equals the target's draws: under top-p it samples the
    target's distribution (test_decoding.py), reproducibly per seed, but not plain sampling's tokens for that
    seed (README, docs/guarantees.md "Exact speculation" say so)."""
    g, differ = tiny_generator, 0
    for seed, prompt in enumerate(random_prompts(4)):
        plain = g.generate(prompt, 20, speculate=False, seed=seed, **TOP_P).token_ids
        chain = g.generate(prompt, 20, drafter="model", num_draft=4, seed=seed, **TOP_P)
        assert chain.token_ids == g.generate(prompt, 20, drafter="model", num_draft=4, seed=seed,
                                             **TOP_P).token_ids
        assert chain.stats["mean_accepted_tokens"] > 1.0 or chain.token_ids == plain
        differ += chain.token_ids != plain
    assert differ > 0


@pytest.mark.parametrize("settings", [TOP_P, MIN_P])
def test_host_filtered_requests_sharing_passes_sample_what_they_sample_alone(tiny_generator, settings):
    """Top-p and min-p requests (each with its own drafting) sharing the scheduler's passes."""
    g = tiny_generator
    prompts = random_prompts(5, seed=3)
    kws = [dict(drafter="model", tree="dynamic:4"), dict(drafter="lookup"), dict(speculate=False),
           dict(drafter="model", tree="dynamic:3+lookup:4"), dict(drafter="lookup", tree="dynamic:4")]
    alone = [g.generate(p, 16, seed=i, **settings, **kw).token_ids for i, (p, kw) in enumerate(zip(prompts, kws))]
    shared = g.scheduler.shared_passes
    streams = [g.stream(p, 16, seed=i, **settings, **kw) for i, (p, kw) in enumerate(zip(prompts, kws))]
    assert [drain(s).token_ids for s in streams] == alone
    assert g.scheduler.shared_passes > shared  # they did share passes
    assert len(set(map(tuple, alone))) > 1


@pytest.mark.parametrize("drafter,tree,wide", [("model", "dynamic:4", TOP_P), ("lookup", None, TOP_P),
                                               ("model", "dynamic:4", MIN_P)])
def test_host_filtered_speculation_draws_from_the_targets_distribution(tiny_generator, drafter, tree, wide):
    """The joint distribution of the first two tokens (the second often an accepted draft) against the target's
    own float32 logits after temperature and top-p, or min-p (a high temperature: the tiny target's distributions
    are peaked, and this puts more tokens in play)."""
    g, params = tiny_generator, SamplingParams(**wide)
    prompt = np.array(random_prompts(2)[1], np.int64)
    eng = g.target
    eng.cache.truncate(0)
    p1 = probabilities(eng.forward(prompt)[0][0].copy(), params)
    eos = set(g.tokenizer.eos_token_ids)
    joint = {(t1,): p1[t1] for t1 in np.flatnonzero(p1) if t1 in eos}  # the answer ends there
    for t1 in [t for t in np.flatnonzero(p1) if t not in eos]:
        eng.cache.truncate(len(prompt))
        p2 = probabilities(eng.forward(np.array([t1]))[0][0].copy(), params)
        for t2 in np.flatnonzero(p2):
            joint[(t1, t2)] = p1[t1] * p2[t2]
    cells = sorted(joint)
    counts, accepted = np.zeros(len(cells)), 0.0
    for seed in range(1500):
        res = g.generate(prompt, 6, drafter=drafter, tree=tree, seed=seed, chat=False, **wide)
        counts[cells.index(tuple(res.token_ids[:2]))] += 1
        accepted += res.stats["mean_accepted_tokens"] / 1500
    assert len(cells) > 5 and chi2_pvalue(counts, np.array([joint[c] for c in cells])) > 1e-3
    assert accepted > 1.0
