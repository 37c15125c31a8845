"""Temperature sampling by the argmax of noisy logits (runtime/noise.py): the noise is a function of the seed and
the position, the tokens are distributed exactly as the target's softmax(logits / T), and speculation (any drafter,
chains and trees, a request alone or sharing passes) samples token for token what plain decoding samples."""
import numpy as np
import pytest

from conftest import random_prompts
from speccompile.runtime.generator import drain
from speccompile.runtime.noise import GumbelNoise, NoiseSupport, by_noise, sampled_by_noise
from speccompile.runtime.sampling import SamplingParams, probabilities
from test_decoding import chi2_pvalue


def test_a_positions_noise_depends_on_the_seed_and_the_position_only():
    a, b = GumbelNoise(7, 0.5, 300), GumbelNoise(7, 0.5, 300)
    rows = a.rows([3, 4, 5])
    assert np.array_equal(b.rows([5])[0], rows[2])  # drawn in another order: the same row
    assert np.array_equal(b.rows([4, 4])[1], rows[1])
    assert not np.array_equal(rows[0], rows[1])
    assert not np.array_equal(GumbelNoise(8, 0.5, 300).rows([3])[0], rows[0])
    assert not np.array_equal(GumbelNoise(None, 0.5, 300).rows([3]), GumbelNoise(None, 0.5, 300).rows([3]))
    assert np.allclose(GumbelNoise(7, 1.0, 300).rows([3])[0] * 0.5, rows[0], atol=1e-6)
    g = GumbelNoise(1, 1.0, 50000).rows([0])[0] / 1.0  # standard Gumbel: mean Euler's gamma, variance pi^2 / 6
    assert abs(g.mean() - 0.5772) < 0.02 and abs(g.var() - np.pi ** 2 / 6) < 0.05


def test_which_settings_are_sampled_by_noise():
    assert by_noise(SamplingParams(temperature=0.7)) and by_noise(SamplingParams(temperature=0.7, top_k=5))
    assert not by_noise(SamplingParams(temperature=0.7, top_k=5), NoiseSupport(temperature=True))
    for p in (SamplingParams(), SamplingParams(temperature=0.7, top_p=0.9), SamplingParams(temperature=0.7, min_p=0.1),
              SamplingParams(temperature=0.7, top_p=0.9, acceptance="typical")):
        assert not by_noise(p)
    # typical acceptance too: the noise draws, its rule reads the rows (runtime/acceptance.py TypicalRule)
    typical = SamplingParams(temperature=0.7, top_k=4, acceptance="typical", typical_epsilon=0.2, typical_alpha=0.5)
    params, noise = sampled_by_noise(typical, NoiseSupport(True, True), 10)
    rule = noise.typical
    assert params.greedy and (rule.temperature, rule.top_k, rule.epsilon, rule.alpha) == (0.7, 4, 0.2, 0.5)
    assert sampled_by_noise(SamplingParams(temperature=0.7), NoiseSupport(True, True), 10)[1].typical is None
    params, noise = sampled_by_noise(SamplingParams(temperature=0.7, seed=1, top_k=3), NoiseSupport(True, True), 10)
    assert params.greedy and noise.temperature == 0.7 and noise.rows([4]).top_k == 3
    assert sampled_by_noise(SamplingParams(temperature=0.7, top_k=10), NoiseSupport(True, True), 10)[1].top_k == 0
    assert sampled_by_noise(SamplingParams(temperature=0.7), NoiseSupport(), 10) == (SamplingParams(temperature=0.7),
                                                                                   None)


def test_the_tiny_target_samples_by_noise(tiny_generator):
    assert tiny_generator.noise_ok == NoiseSupport(True, True)  # its graphs have the exact greedy head


def test_requests_sampled_by_noise_count_the_screened_passes_bytes(tiny_generator):
    """Temperature and top-k requests run greedy passes through the screen (here): their stats count a screened
    pass's weight bytes, as greedy requests do; top-p ones the float32 head's."""
    g, prompt = tiny_generator, random_prompts(1)[0]
    assert g.pass_bytes["screened"] < g.pass_bytes["full"]
    for settings, bytes_per_pass in ((dict(), "screened"), (dict(temperature=0.8), "screened"),
                                     (dict(temperature=0.8, top_k=5), "screened"),
                                     (dict(temperature=0.8, top_p=0.9), "full"),
                                     (dict(temperature=0.8, min_p=0.1), "full")):
        stats = g.generate(prompt, 4, seed=1, **settings).stats
        assert stats["target_weight_bytes"] == g.pass_bytes[bytes_per_pass], settings


@pytest.mark.parametrize("drafter,tree", [("model", None), ("lookup", None), ("layerskip:2", None),
                                          ("model", "dynamic:4"), ("model", "dynamic:3+lookup:4")])
def test_speculation_samples_what_plain_decoding_samples(tiny_generator, drafter, tree):
    g = tiny_generator
    accepted = []
    for seed, prompt in enumerate(random_prompts(4)):
        ref = g.generate(prompt, 20, speculate=False, temperature=4.0, seed=seed)
        res = g.generate(prompt, 20, drafter=drafter, tree=tree, temperature=4.0, seed=seed)
        assert res.token_ids == ref.token_ids, (drafter, tree, seed)
        accepted.append(res.stats["mean_accepted_tokens"])
    assert max(accepted) > 1.0  # drafts were taken: the tokens were not all plain steps


@pytest.mark.parametrize("drafter,tree", [("model", None), ("model", "dynamic:3+lookup:4")])
def test_top_k_speculation_samples_what_plain_decoding_samples(tiny_generator, drafter, tree):
    """Top-k by noise: the argmax within the k largest logits, so speculation keeps plain decoding's draws."""
    g, changed = tiny_generator, 0
    for seed, prompt in enumerate(random_prompts(4)):
        ref = g.generate(prompt, 20, speculate=False, temperature=4.0, top_k=4, seed=seed).token_ids
        res = g.generate(prompt, 20, drafter=drafter, tree=tree, temperature=4.0, top_k=4, seed=seed).token_ids
        assert res == ref, (drafter, tree, seed)
        changed += ref != g.generate(prompt, 20, speculate=False, temperature=4.0, seed=seed).token_ids
    assert changed  # top-k did change what was drawn


def test_requests_sharing_passes_sample_what_they_sample_alone(tiny_generator):
    g = tiny_generator
    prompts = random_prompts(5, seed=3)
    temperature = [3.0, 0.0, 3.0, 3.0, 3.0]  # a greedy request between them: its rows take no noise
    top_k = [0, 0, 5, 2, 0]  # each row its own top-k in a shared pass
    alone = [g.generate(p, 16, drafter="model", temperature=t, top_k=k, seed=i).token_ids
             for i, (p, t, k) in enumerate(zip(prompts, temperature, top_k))]
    shared = g.scheduler.shared_passes
    streams = [g.stream(p, 16, drafter="model", temperature=t, top_k=k, seed=i)
               for i, (p, t, k) in enumerate(zip(prompts, temperature, top_k))]
    assert [drain(s).token_ids for s in streams] == alone
    assert g.scheduler.shared_passes > shared  # they did share passes
    assert len(set(map(tuple, alone))) > 1


@pytest.mark.parametrize("drafter,top_k", [("model", 0), ("lookup", 0), ("model", 3)])
def test_noisy_argmax_draws_from_the_targets_distribution(tiny_generator, drafter, top_k):
    """The joint distribution of the first two tokens, sampled by noise with speculation, against softmax of the
    target's own float32 logits over temperature (within the top k)."""
    g, T = tiny_generator, 4.0
    params = SamplingParams(temperature=T, top_k=top_k)
    prompt = np.array(random_prompts(2)[1], np.int64)
    eng = g.target
    eng.cache.truncate(0)
    p1 = probabilities(eng.forward(prompt)[0][0].copy(), params)
    likely = np.flatnonzero(p1 > 1e-3)
    joint = {}
    for t1 in likely:
        eng.cache.truncate(len(prompt))
        p2 = probabilities(eng.forward(np.array([t1]))[0][0].copy(), params)
        for t2 in np.flatnonzero(p2 > 1e-3):
            joint[(t1, t2)] = p1[t1] * p2[t2]
    cells = sorted(joint)
    probs = np.append([joint[c] for c in cells], 0.0)
    probs[-1] = 1.0 - probs.sum()  # everything else: one pooled cell
    counts = np.zeros(len(probs))
    for seed in range(2000):
        first = tuple(g.generate(prompt, 6, drafter=drafter, temperature=T, top_k=top_k, seed=seed,
                                 chat=False).token_ids[:2])
        counts[cells.index(first) if first in joint else -1] += 1
    assert len(cells) > (5 if not top_k else top_k) and chi2_pvalue(counts, probs) > 1e-3


def test_noise_rows_of_different_positions_are_independent():
    """No position's row repeats another's, shifted or not: the tokens drawn at two positions would be coupled
    (each position's draws once ran into the next position's, so a row was the previous one shifted by four)."""
    noise = GumbelNoise(3, 1.0, 4096)
    rows = noise.rows(range(6))
    for i in range(6):
        for j in range(i + 1, 6):
            for shift in range(-32, 33):
                a, b = (rows[i][shift:], rows[j][:len(rows[j]) - shift]) if shift >= 0 else \
                    (rows[i][:shift], rows[j][-shift:])
                assert np.mean(a == b) < 0.01 and abs(np.corrcoef(a, b)[0, 1]) < 0.1, (i, j, shift)


def test_a_drafters_perturbed_logits_are_its_logits_plus_the_noise_rows_the_target_reads():
    """GumbelNoise.perturbed (Drafter.couple): logits plus each position's row (through a draft vocabulary's
    target ids), the rows kept for the target's pass that follows (the same arrays, nothing drawn again), and with
    top-k every token outside the drafter's own k largest logits out of the draw."""
    noise = GumbelNoise(5, 0.8, 40)
    logits = np.random.default_rng(0).standard_normal((2, 10)).astype(np.float32)
    token_map = np.arange(0, 40, 4)
    out = noise.perturbed(logits, [7, 9], token_map)
    later = noise.rows([6, 7, 8, 9])  # the target's pass, from an earlier position on
    assert np.array_equal(out, logits + np.stack([later[1][token_map], later[3][token_map]]))
    assert noise.perturbed(np.zeros(40, np.float32), 8).shape == (1, 40)
    again = noise.rows([7])[0]
    assert again is later[1]  # kept, not drawn over
    top = GumbelNoise(5, 0.8, 40, top_k=3).perturbed(logits, [7, 9], token_map)
    for row, lg in zip(top, logits):
        assert set(np.flatnonzero(np.isfinite(row))) == set(np.argsort(-lg)[:3])
