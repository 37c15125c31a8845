"""Adaptive drafting: the cost model, the choices it drives on synthetic costs, and the loop still lossless."""
import copy
import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from conftest import assert_lossless, random_prompts
from speccompile.format.trees import TreeSpec
from speccompile.runtime import cost_cache, cost_model
from speccompile.runtime.adaptive import AdaptiveDrafting
from speccompile.runtime.cost_model import HEAD_ROWS, CostModel
from speccompile.runtime.drafters.base import Proposal
from test_decoding import test_sampled_speculative_matches_target_distribution as sampled_matches_target

ROWS, LENGTHS = [1, 2, 4, 8, 16, 25], [16, 1000]


def synthetic(base_ms: float, row_ms: float, head_ms: float = 1.0) -> CostModel:
    """A pass costs base + row_ms per row beyond the first (twice that per row at the longer context)."""
    grid = [[base_ms + row_ms * (r - 1), base_ms + 2 * row_ms * (r - 1)] for r in ROWS]
    return CostModel(ROWS, LENGTHS, {"greedy": grid, "sampled": grid}, {"head": [head_ms] * len(HEAD_ROWS)}, 0.01)


def adaptive(cost: CostModel, depth: int = 4, lookup: int = 6) -> AdaptiveDrafting:
    return AdaptiveDrafting(cost, "head", True, TreeSpec("adaptive", 63, depth=depth, lookup=lookup), True, 64)


def confident_chain(n: int, logp: float) -> tuple[Proposal, np.ndarray]:
    """A chain of n drafter nodes, each with conditional draft probability exp(logp)."""
    return Proposal(np.arange(10, 10 + n), None, np.arange(n) - 1), logp * np.arange(1, n + 1)


def test_cost_model_interpolates_and_round_trips(tmp_path, monkeypatch):
    cm = synthetic(20.0, 1.0)
    assert cm.verify(1, 16) == 20.0 and cm.verify(8, 16) == 27.0
    assert cm.verify(8, 508) == pytest.approx(30.5)  # halfway in length
    assert cm.verify(33, 16) == pytest.approx(52.0)  # linear beyond the last measured row count
    assert cm.draft("head", 3) == 1.0 and cm.draft("lookup", 3) == 0.0
    assert CostModel.from_dict(json.loads(json.dumps(cm.to_dict()))).verify(8, 16) == 27.0


def test_timed_passes_correct_a_mispriced_calibration():
    """Calibrated with dear rows (a busy moment), the passes timed since say a second row costs nothing: the
    prices follow them where they were timed, a row count never timed follows its nearest timed one, the
    other length keeps its calibration, and nothing of it is cached."""
    cm = synthetic(10.0, 5.0)  # 2 rows: 15 ms at 16 tokens
    for _ in range(40):
        cm.observe(1, 16, True, 10.0)
        cm.observe(2, 16, True, 10.5)
    assert cm.verify(1, 16) == pytest.approx(10.0, rel=0.02)
    assert cm.verify(2, 16) == pytest.approx(10.5, rel=0.02)
    assert cm.verify(4, 16) == pytest.approx(25.0 * 10.5 / 15.0, rel=0.02)  # the 2-row ratio
    assert cm.verify(2, 1000) == pytest.approx(20.0)  # no pass timed near that length
    assert cm.verify(2, 16, greedy=False) == pytest.approx(15.0)
    cm.observe(1, 16, True, 1e6)  # one stalled pass moves it a little, not a million-fold
    assert cm.verify(1, 16) < 11.5
    assert "observed" not in cm.to_dict()
    assert CostModel.from_dict(json.loads(json.dumps(cm.to_dict()))).verify(2, 16) == 15.0


def test_prices_kept_as_tables_equal_direct_interpolation():
    """The prices kept per measured length (updated a column per timed pass) equal interpolating the corrected
    grid afresh, along lengths then rows, at any rows and length, after any timed passes."""
    cm, rng = synthetic(10.0, 5.0), np.random.default_rng(0)

    def direct(rows, length, mode):
        grid = np.asarray(cm.verify_ms[mode], np.float64)
        if mode in cm._factors:
            grid = np.maximum.accumulate(grid * cm._factors[mode], axis=0)
        by_row = np.array([np.interp(length, cm.lengths, r) for r in grid])
        if rows <= cm.rows[-1]:
            return float(np.interp(rows, cm.rows, by_row))
        return float(by_row[-1] + (by_row[-1] - by_row[-2]) / (cm.rows[-1] - cm.rows[-2]) * (rows - cm.rows[-1]))

    for _ in range(200):
        greedy = bool(rng.integers(2))
        cm.observe(int(rng.integers(1, 30)), int(rng.integers(1, 1200)), greedy, float(rng.uniform(5, 40)))
        for rows, length in rng.integers(1, [80, 1200], size=(3, 2)):
            assert cm.verify(int(rows), int(length), greedy) == pytest.approx(
                direct(int(rows), int(length), "greedy" if greedy else "sampled"), rel=1e-9)


def test_a_drafter_pass_past_its_calibrated_rows_costs_more():
    """A catch-up over a long accepted run drafts more rows than the calibration timed (HEAD_ROWS): priced on the
    last two points' slope, not as the last point's rows (which made a long run's catch-up look free)."""
    from speccompile.runtime.cost_model import HEAD_ROWS
    cm = synthetic(10.0, 1.0, head_ms=0.5)
    cm.drafter_ms["head"] = [1.0 * r for r in HEAD_ROWS]
    assert [cm.draft("head", r) for r in (1, 3, 4, 6, 10)] == pytest.approx([1.0, 3.0, 4.0, 6.0, 10.0])
    cm.drafter_ms["head"] = [1.0, 2.0, 1.5]  # a noisy calibration: never below its last point
    assert cm.draft("head", 8) == pytest.approx(1.5)


def test_timed_drafting_corrects_the_drafter_price():
    """Drafting timed at three times its calibrated price (a drafter whose weights the target's passes evict):
    the price follows, a catch-up over a whole prompt is not taken for drafting, and nothing of it is cached."""
    cm = synthetic(10.0, 1.0, head_ms=0.5)
    a = adaptive(cm)
    a.drafted(passes=40, tokens=40 * 128, ms=1000.0)  # a prompt's catch-up: no evidence of a drafting's price
    assert cm.draft("head", 1) == pytest.approx(0.5)
    shallow = a.plan(100).draft_ms
    for _ in range(40):
        a.drafted(passes=2, tokens=3, ms=3.0)  # two passes priced 0.5 ms each, timed at 1.5
    assert cm.draft("head", 1) == pytest.approx(1.5, rel=0.02)
    assert cm.draft("head", 1, observed=False) == pytest.approx(0.5)
    assert a.plan(100).draft_ms > shallow
    a.drafted(passes=1, tokens=1, ms=1e6)  # one stalled drafting moves it a little
    assert cm.draft("head", 1) < 2.0
    assert "drafted" not in cm.to_dict()


def test_expensive_rows_draft_nothing():
    """Rows that cost as much as a whole step: every candidate loses to a plain step, and no drafter pass runs."""
    a = adaptive(synthetic(20.0, 20.0))
    plan = a.plan(100)
    assert plan.head_depth == 0
    prop, scores = confident_chain(4, np.log(0.6))
    assert len(a.choose(prop, 4, scores, plan, 100).tokens) == 0
    assert a.summary()["plain_passes"] == 1


def test_a_level_the_cut_mostly_drops_costs_its_drafting_not_a_row():
    """Drafting is cheap, a row dear; the cut keeps the drafter's node on 30% of passes, and a kept node is
    accepted 90% of the time. Priced as a row every pass, drafting loses to a plain step; priced as the rows the
    cut keeps, it wins."""
    from speccompile.runtime.estimates import Rate
    a = adaptive(synthetic(10.0, 3.0, head_ms=0.5), depth=1, lookup=0)
    a.head_kept[0], a.head_reach[0] = Rate(0.3, 50.0), Rate(0.9, 50.0)
    a.head_rows[0] = Rate(1.0, 50.0)  # a row every pass: 1.27 tokens for 13.5 ms against 1 for 10
    assert a.plan(100).head_depth == 0
    a.head_rows[0] = Rate(0.3, 50.0)  # the rows the cut keeps: 1.27 tokens for 11.4 ms
    assert a.plan(100).head_depth == 1


def test_cheap_rows_and_confident_drafts_go_deep():
    a = adaptive(synthetic(20.0, 0.1))
    for _ in range(6):  # a drafter whose nodes are always taken
        plan = a.plan(100)
        prop, scores = confident_chain(4, np.log(0.95))
        kept = a.choose(prop, 4, scores, plan, 100)
        a.update(list(range(len(kept.tokens))))
    assert a.plan(100).head_depth == 4
    assert len(kept.tokens) == 4


def test_unlikely_nodes_are_cut_and_the_cut_is_ancestor_closed():
    """Moderate row costs: the confident root and its child stay; an unlikely sibling subtree goes."""
    a = adaptive(synthetic(20.0, 2.0))
    tokens = np.array([5, 6, 7, 8])
    parents = np.array([-1, -1, 0, 1])  # two roots, each with a child
    scores = np.log(np.array([0.9, 0.02, 0.9 * 0.9, 0.02 * 0.5]))
    kept = a.choose(Proposal(tokens, None, parents), 4, scores, a.plan(100), 100)
    assert kept.tokens.tolist() == [5, 7] and kept.parents.tolist() == [-1, 0]


def test_longer_context_costlier_rows_smaller_trees():
    a = adaptive(synthetic(20.0, 1.5))
    prop, scores = confident_chain(8, np.log(0.7))
    short = len(a.choose(prop, 8, scores, a.plan(16), 16).tokens)
    long = len(a.choose(prop, 8, scores, a.plan(1000), 1000).tokens)
    assert short > long


def one_pass(a: AdaptiveDrafting, prop: Proposal, head: int, scores, accepted: bool) -> Proposal:
    """Plan, cut and learn from one pass whose first kept node is accepted or not."""
    kept = a.choose(prop, head, scores, a.plan(100), 100)
    a.update([0] if accepted and len(kept.tokens) else [])
    return kept


def test_lookup_estimates_are_kept_per_match_length():
    """Over a request where continuations of 3-gram matches are always rejected and those of 1-gram matches
    always taken (the reverse of the priors), the cut learns each apart: afterwards it picks the drafter's node
    over a 3-gram match's continuation and a 1-gram match's continuation over the drafter's node."""
    a = AdaptiveDrafting(synthetic(20.0, 0.1), "head", True, TreeSpec("adaptive", 63, depth=1, lookup=6), True, 64,
                         chains_only=True)
    for _ in range(30):
        for n, taken in ((3, False), (1, True)):
            assert len(one_pass(a, Proposal(np.array([11]), None, np.array([-1]), match_len=n), 0, None, taken).tokens)
    sibling = dict(tokens=np.array([10, 11]), parents=np.array([-1, -1]))  # the drafter's node, lookup's node
    picks = {n: a.choose(Proposal(**sibling, match_len=n), 1, np.log([0.5]), a.plan(100), 100).tokens.tolist()
             for n in (3, 1)}
    assert picks == {3: [10], 1: [11]}
    fresh = AdaptiveDrafting(synthetic(20.0, 0.1), "head", True, TreeSpec("adaptive", 63, depth=1, lookup=6),
                             True, 64, chains_only=True)
    assert {n: fresh.choose(Proposal(**sibling, match_len=n), 1, np.log([0.5]), fresh.plan(100), 100).tokens.tolist()
            for n in (3, 1)} == {3: [11], 1: [10]}  # the priors alone: the other way round


def test_a_node_both_drafters_propose_is_valued_by_their_agreement():
    """A drafter node the head gives 30%: at these row prices a plain step beats verifying it, unless prompt
    lookup proposes it too. Its outcomes teach the agreement's estimate, not the head's calibration."""
    a = adaptive(synthetic(20.0, 8.0), depth=1)
    node, scores = Proposal(np.array([10]), None, np.array([-1]), match_len=3), np.log([0.3])
    assert len(a.choose(node, 1, scores, a.plan(100), 100).tokens) == 0
    agreed = Proposal(np.array([10]), None, np.array([-1]), match_len=3, lookup_agrees=np.array([True]))
    scale = a.head_scale[0].den
    for _ in range(5):
        assert one_pass(a, agreed, 1, scores, True).tokens.tolist() == [10]
    assert a.head_scale[0].den == scale and a.agreed_accept[3][0].value == 1.0


def test_a_long_match_skips_the_drafters_pass_where_one_path_is_verified():
    """Verifying one path a pass, a match whose continuation is likelier to be taken than the drafter's first
    node leaves the drafter nothing to win: no drafting pass. A short match, or a target that verifies trees
    (where the drafter's nodes can sit beside lookup's), still drafts."""
    def planned(match_len: int, chains_only: bool = True) -> int:
        a = AdaptiveDrafting(synthetic(20.0, 0.1), "head", True, TreeSpec("adaptive", 63, depth=2, lookup=6), True,
                             64, chains_only=chains_only)
        return a.plan(100, match_len).head_depth
    assert planned(3) == 0 and planned(0) > 0 and planned(1) > 0 and planned(3, chains_only=False) > 0


def test_a_plain_step_skips_the_lookup_tree_only_where_the_cut_would_keep_nothing():
    """may_verify's bound: wherever it says no prompt-lookup node can pay, choose over the joined tree keeps none
    (random row prices, convex and concave, random estimates, real lookup trees, a random price of verifying any
    node); and it does say so, often."""
    import time
    from speccompile.runtime.drafters.lookup import LookupDrafter, join_lookup
    rng = np.random.default_rng(0)
    lookup, skipped, kept = LookupDrafter(), 0, 0
    for trial in range(300):
        steps = np.cumsum(rng.uniform(0.0, 8.0, (len(ROWS), len(LENGTHS))) ** rng.uniform(0.5, 2.0), axis=0)
        grid = (rng.uniform(5.0, 20.0) + np.cumsum(steps, axis=1)).tolist()
        cost = CostModel(ROWS, LENGTHS, {"greedy": grid, "sampled": grid}, {}, 0.01)
        cost.overhead.finish(time.perf_counter() - 0.01, 10.0 - rng.uniform(0.0, 5.0), True)  # verifying costs more
        a = AdaptiveDrafting(cost, "lookup", False, TreeSpec("adaptive", 63, depth=4, lookup=6), True, 64)
        for first in (True, False):  # estimates learnt from random outcomes
            for m, rates in enumerate(a.lookup_accept[first, m] for m in range(4)):
                for r in rates[:3]:
                    tried = int(rng.integers(1, 5))
                    r.add(float(rng.binomial(tried, rng.uniform())), float(tried))
        context = rng.integers(0, 6, int(rng.integers(8, 60)))
        length = int(rng.integers(10, 1200))
        match = lookup.matches(context)
        plan = a.plan(length, match[1])
        nodes = plan.lookup_nodes
        chosen = a.choose(join_lookup(Proposal.empty(), context, lookup, nodes, nodes, match), 0, None, plan,
                          length)
        if not a.may_verify(plan, match[1], length, nodes):
            skipped += 1
            assert not len(chosen.tokens)
        kept += len(chosen.tokens) > 0
    assert skipped > 30 and kept > 30, (skipped, kept)


def test_a_skipped_depth_is_probed_again():
    """Rows too dear to draft: the plan still probes one level now and then, and a probe verifies a node (else
    estimates grown too low would never be tested again); a node the cut drops teaches nothing."""
    a = adaptive(synthetic(20.0, 20.0))
    prior = a.head_reach[0].value, a.head_reach[0].den
    depths = []
    for _ in range(250):
        plan = a.plan(100)
        depths.append(plan.head_depth)
        prop, scores = confident_chain(max(plan.head_depth, 1), np.log(0.6))
        kept = a.choose(prop, len(prop.tokens), scores, plan, 100)
        assert len(kept.tokens) == (1 if plan.probe else 0)
        if not plan.probe:
            a.update([])
            assert (a.head_reach[0].value, a.head_reach[0].den) == prior  # nothing verified: no evidence
        else:
            a.update([0])
            assert a.head_reach[0].den > prior[1]  # evidence taken
            prior = a.head_reach[0].value, a.head_reach[0].den
    assert 0 in depths and 1 in depths


def probe_gaps(cost: CostModel, passes: int = 240) -> list[int]:
    """Passes between probes of a drafter whose nodes are seldom accepted (every probe's node rejected)."""
    a = adaptive(cost, depth=1, lookup=0)
    a.head_reach[0].add(0.0, 6.0)
    probes = []
    for i in range(passes):
        plan = a.plan(100)
        prop, scores = confident_chain(1, np.log(0.3))
        a.choose(prop, 1, scores, plan, 100) if plan.head_depth else a.plain(plan, 0, 100)
        a.update([])
        probes += [i] if plan.probe else []
    return np.diff(probes).tolist()


def test_a_level_far_from_paying_is_probed_seldom():
    """A probe's expected loss sets how often it comes: every PROBE_EVERY passes where drafting is close to
    paying, several times further apart where a row costs as much as a plain step, but still now and then."""
    from speccompile.runtime.adaptive import PROBE_EVERY
    close, far = probe_gaps(synthetic(20.0, 1.0)), probe_gaps(synthetic(20.0, 20.0), 600)
    assert max(close) <= 3 * PROBE_EVERY and close.count(PROBE_EVERY) > len(close) // 2
    assert len(far) >= 2 and min(far) >= 3 * PROBE_EVERY


def test_prompt_lookup_alone_probes_a_match_by_its_expected_loss():
    """Drafting by prompt lookup alone, a probe verifies the match's likeliest node: every PROBE_EVERY passes for a
    match close to paying, several times further apart for one whose continuations are seldom taken, and none
    while nothing matches."""
    from speccompile.runtime.adaptive import PROBE_EVERY

    def probes(cost, taken: float, match_len: int = 2, passes: int = 200) -> list[int]:
        a = AdaptiveDrafting(cost, "lookup", False, TreeSpec("adaptive", 63, depth=4, lookup=6), True, 64)
        a.lookup_accept[True, match_len][0].add(taken * 50, 50.0)
        return [i for i in range(passes) if a.plan(100, match_len).probe]
    close, far = probes(synthetic(20.0, 4.0), 0.15), probes(synthetic(20.0, 20.0), 0.02, passes=400)
    assert np.diff(close).tolist() == [PROBE_EVERY] * (len(close) - 1) and len(close) > 10
    assert 2 <= len(far) and min(np.diff(far)) >= 3 * PROBE_EVERY
    assert probes(synthetic(20.0, 4.0), 0.15, match_len=0) == []


def test_passes_that_draft_are_priced_with_what_they_took_beyond_their_price():
    """Passes that verify nodes and run 10 ms past their price (plain steps on it) make a level that paid on paper
    lose, for the request that timed them and for the next one on the same cost model; and the cut verifies
    nothing where a node is worth less than that."""
    import time
    cost = synthetic(20.0, 1.0)
    a = adaptive(cost, depth=1, lookup=0)
    a.head_reach[0].add(1.0, 4.0)
    assert a.plan(100).head_depth == 1
    for drafted, price, wall in [(True, 22.0, 32.0), (False, 20.0, 20.0)] * 10:
        cost.overhead.finish(time.perf_counter() - wall / 1e3, price, drafted)  # a pass of `wall` ms
    assert 8.0 < cost.overhead.verify_extra() < 11.0
    assert a.plan(100).head_depth == 0
    b = adaptive(cost, depth=1, lookup=0)
    b.head_reach[0].add(1.0, 4.0)
    assert b.plan(100).head_depth == 0
    prop, scores = confident_chain(1, np.log(0.3))  # 0.3 of a token for 1 ms of rows: kept, but not for 11 ms
    assert len(adaptive(synthetic(20.0, 1.0)).choose(prop, 1, scores, b.plan(100), 100).tokens) == 1
    assert len(b.choose(prop, 1, scores, b.plan(100), 100).tokens) == 0


def test_the_plain_steps_a_verifying_pass_slows_are_its_cost():
    """Plain steps soon after a verifying pass that run longer than steady ones add what they took more to the price
    of verifying (and to nothing else); the steps soon after a request's prefill are nobody's cost."""
    import time
    from speccompile.runtime.pass_overhead import AFTER
    cost = synthetic(20.0, 1.0)
    a = adaptive(cost, depth=1, lookup=0)

    def step(verified, wall, price=20.0):
        a._time(time.perf_counter() - wall / 1e3, price, verified)
    for _ in range(AFTER):
        step(False, 30.0)  # slowed by the prefill: not timed
    assert cost.overhead.mean(False) == 0.0 and cost.overhead.slowdown() == 0.0
    for _ in range(40):
        step(True, 22.5, 22.0)  # 0.5 ms past its price
        for slower in [3.0, 2.0, 1.0, 0.5][:AFTER]:
            step(False, 20.2 + slower)
        for _ in range(6):
            step(False, 20.2)  # steady: 0.2 ms past
    assert 0.15 < cost.overhead.mean(False) < 0.25
    assert 6.0 < cost.overhead.slowdown() < 6.8
    assert 6.2 < cost.overhead.verify_extra() < 7.0


def test_a_pass_shared_with_other_requests_is_not_timed_as_this_requests():
    cost = synthetic(20.0, 1.0)
    a = adaptive(cost, depth=1, lookup=0)
    for alone in (False, True):
        plan = a.plan(100)
        prop, scores = confident_chain(1, np.log(0.9))
        a.choose(prop, 1, scores, plan, 100)
        before = cost.overhead.mean(True), cost.overhead.mean(False)
        a.update([0], alone)
        assert ((cost.overhead.mean(True), cost.overhead.mean(False)) == before) == (not alone)


@pytest.mark.parametrize("drafter", ["model", "layerskip:2", "lookup"])
@pytest.mark.parametrize("row_ms", [0.05, 3.0])
def test_adaptive_greedy_equals_autoregressive(tiny_generator, drafter, row_ms, monkeypatch):
    g = tiny_generator
    monkeypatch.setattr(g, "_cost", synthetic(5.0, row_ms))  # cheap rows draft big trees, dear rows small ones or none
    accepted = assert_lossless(g, drafter, random_prompts(4), 24, tree="adaptive+lookup:4")
    if row_ms < 1:
        assert max(accepted) > 1.0


@pytest.mark.parametrize("trees_exact", [True, False])
def test_adaptive_requests_share_the_scheduler_passes(tiny_generator, trees_exact, monkeypatch):
    """Adaptive requests hold scheduler slots like any other: alone a slot plans as the caller's own loop would;
    shared, within its share of the pass's rows (over a target whose trees are not exact, trees_exact False, a
    shared pass verifies one prompt-lookup node of at most SHARED_LOOKUP_SLOTS slots, else plain steps). Every
    request's tokens equal autoregressive decoding's."""
    from speccompile.runtime import shared_drafts
    from speccompile.runtime.streams import drain
    g = tiny_generator
    cost = synthetic(5.0, 0.05)
    cost.drafter_ms["model"] = [0.01] * len(HEAD_ROWS)  # drafting nearly free, even at the most the timing moves it
    monkeypatch.setattr(g, "_cost", cost)
    monkeypatch.setattr(g, "trees_exact", trees_exact)
    prompts, lengths = random_prompts(4, seed=7), [8, 8, 8, 64]  # the last runs alone once the others end
    plain = [g.generate(p, n, speculate=False).token_ids for p, n in zip(prompts, lengths)]
    shared = g.scheduler.shared_passes
    monkeypatch.setattr(g.scheduler, "trace", [])
    shared_rows = []  # per pass of two decoding slots or more: each one's rows (a prompt chunk in the pass left out)
    run = g.scheduler.engine.run

    def counted(steps, *a):
        rows = [len(st.tokens) for st in steps if st.rows is not None]  # a prompt chunk's step has no rows
        if len(rows) > 1:
            shared_rows.append(rows)
        return run(steps, *a)
    monkeypatch.setattr(g.scheduler.engine, "run", counted)
    drew = (lambda rows: max(rows) > 1) if trees_exact else (lambda rows: max(rows) == 2)  # a draft, a lookup node
    # all four queued before any is read: the first rounds share every pass, whatever the machine's load (the
    # drafts' cut still follows the measured pass times, so a run whose shared passes drew no draft is run again)
    for _ in range(5):
        shared_rows.clear(), g.scheduler.trace.clear()
        streams = [g.stream(p, n, drafter="model", tree="adaptive+lookup:4") for p, n in zip(prompts, lengths)]
        results = [drain(s) for s in streams]
        assert [r.token_ids for r in results] == plain
        if any(drew(rows) for rows in shared_rows):
            break
    assert g.scheduler.shared_passes > shared and any(drew(rows) for rows in shared_rows)
    drafted = []
    for r in results:
        assert r.stats["tree"]["kind"] == "adaptive"
        assert r.stats["adaptive"]["passes"] == r.stats["verify_steps"]
        drafted.append(r.stats["verify_steps"] - r.stats["adaptive"]["plain_passes"])
    assert drafted[3] > 0  # alone, it drafts
    assert g._cost.observed  # its passes were timed into the cost model
    if not trees_exact:  # shared: at most a lookup node in a few slots
        assert all(max(rows) <= 2 and sum(r == 2 for r in rows) <= shared_drafts.SHARED_LOOKUP_SLOTS
                   for rows in shared_rows)
    else:  # shared passes draft too, within each slot's share of the pass's rows, the drafting timed
        assert g._cost.drafted
        assert all(sum(rows) <= shared_drafts.SHARED_PASS_ROWS for rows in shared_rows)
    fixed = g.generate(prompts[1], 8, drafter="model", tree="dynamic:3")
    assert fixed.stats["adaptive"] is None and fixed.token_ids == plain[1]


def test_adaptive_sampled_keeps_target_distribution(tiny_generator, monkeypatch):
    monkeypatch.setattr(tiny_generator, "_cost", synthetic(5.0, 0.05))
    sampled_matches_target(tiny_generator, "model", tree="adaptive+lookup:4")


def test_passes_sampled_by_noise_are_priced_apart_from_greedy_ones(tiny_generator, monkeypatch):
    """A request sampled by noise is planned and timed on the cost model's noise prices (its noise rows cost time
    of their own), a greedy one on the greedy prices: neither's timed passes correct the other's."""
    g = tiny_generator
    assert g.noise_ok  # its graphs have the exact greedy head
    cost = synthetic(5.0, 0.05)
    monkeypatch.setattr(g, "_cost", cost)
    prompt = random_prompts(1)[0]
    g.generate(prompt, max_new_tokens=12, drafter="model", tree="adaptive+lookup:4", temperature=0.7, seed=3)
    assert cost.for_noise().observed and not cost.observed and not cost.for_noise(typical=True).observed
    g.generate(prompt, max_new_tokens=12, drafter="model", tree="adaptive+lookup:4")
    assert cost.observed and cost.for_noise() is cost.for_noise()
    # typical acceptance's passes read their rows back and judge them on the host: priced apart from exact ones
    before = copy.deepcopy(cost.for_noise().observed)
    g.generate(prompt, max_new_tokens=12, drafter="model", tree="adaptive+lookup:4", temperature=0.7, seed=3,
               acceptance="typical")
    assert cost.for_noise(typical=True).observed and cost.for_noise().observed == before


def test_calibration_is_cached_outside_the_bundle(tiny_bundle, tmp_path, monkeypatch):
    import speccompile
    monkeypatch.setenv("SPECCOMPILE_CACHE", str(tmp_path))
    g = speccompile.load(tiny_bundle, threads=1)
    cm = g.cost_model()
    assert cm.verify(8, 100) >= cm.verify(1, 100) > 0
    assert set(cm.drafter_ms) == set(g.drafters) and cm.drafter_ms["model"]
    path = cost_cache.cache_path(tiny_bundle, 1)
    assert path.startswith(str(tmp_path)) and json.load(open(path))["verify_ms"]
    again = speccompile.load(tiny_bundle, threads=1).cost_model()
    assert again.verify_ms == cm.verify_ms  # read back, not measured again
    assert speccompile.load(tiny_bundle, threads=1).cost_model(recalibrate=True).key["measured"]
    padded = speccompile.load(tiny_bundle, threads=1)
    padded.target.min_rows = 2  # as on a CPU whose one-row product kernel differs (runtime/row_parity.py)
    cm = padded.cost_model(recalibrate=True)
    assert cm.key["one_row_pad"] and any("pad row" in line for line in cm.describe())
    assert any("pad row" in line for line in again.describe()) == (g.target.min_rows > 1)  # as measured here


def test_a_recalibration_waits_for_the_generation_it_would_disturb(tiny_bundle, tmp_path, monkeypatch):
    """cost_model(recalibrate=True) from another thread ran the target engine at once, under a half-read stream:
    its K/V overwritten, the stream went on with other tokens than its own."""
    import time

    import speccompile
    from speccompile.runtime.streams import drain
    monkeypatch.setenv("SPECCOMPILE_CACHE", str(tmp_path))
    g = speccompile.load(tiny_bundle, threads=1)
    prompt = random_prompts(1, seed=7)[0]
    solo = g.generate(prompt, 40, speculate=False).token_ids
    stream = g.stream(prompt, 40, speculate=False)
    for _ in range(4):
        next(stream)
    with ThreadPoolExecutor(1) as pool:
        measured = pool.submit(g.cost_model, True)
        time.sleep(0.5)  # long enough for a calibration that does not wait to be under way
        assert drain(stream).token_ids == solo
        assert measured.result(timeout=300).verify(1, 16) > 0


def test_a_recalibration_inside_this_threads_own_generation_is_refused(tiny_bundle, tmp_path, monkeypatch):
    """cost_model(recalibrate=True) in the thread whose own loop holds a half-read stream (typical acceptance under
    top-p; any request of a bundle without the batched graph) measured at once, overwriting the stream's K/V: the stream went
    on with other tokens, or failed inside a drafter."""
    import speccompile
    from speccompile.errors import SpeccompileError
    from speccompile.runtime.streams import drain
    monkeypatch.setenv("SPECCOMPILE_CACHE", str(tmp_path))
    g = speccompile.load(tiny_bundle, threads=1)
    prompt, own_loop = random_prompts(1, seed=7)[0], dict(temperature=0.7, top_p=0.9, acceptance="typical", seed=0)
    solo = g.generate(prompt, 40, **own_loop).token_ids
    stream = g.stream(prompt, 40, **own_loop)
    next(stream)
    with pytest.raises(SpeccompileError, match="finish or close"):
        g.cost_model(recalibrate=True)
    assert drain(stream).token_ids == solo
    assert g.cost_model(recalibrate=True).verify(1, 16) > 0  # once the stream is done


@pytest.mark.parametrize("home", ["unknown", "relative XDG_CACHE_HOME"])
def test_the_cost_cache_never_lands_in_the_working_directory(tiny_bundle, tmp_path, monkeypatch, home):
    """With HOME unset and no passwd entry (a container's arbitrary uid) expanduser leaves "~", and a relative
    XDG_CACHE_HOME is invalid (the XDG spec): the cost model was written under the working directory, so a bundle
    run from inside it held a file its manifest does not list and no longer loaded. Now a relative XDG_CACHE_HOME
    is ignored, and without a home the measurement is kept in memory alone."""
    import shutil
    import speccompile
    from speccompile.format.bundle import read_manifest
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    monkeypatch.delenv("SPECCOMPILE_CACHE", raising=False)
    if home == "unknown":
        monkeypatch.delenv("HOME", raising=False)
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
        monkeypatch.setattr(os.path, "expanduser", lambda path: path)  # what it does for a uid without an entry
    else:
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        monkeypatch.setenv("XDG_CACHE_HOME", "cache")
    monkeypatch.chdir(bundle)
    assert speccompile.load(".", threads=1).cost_model().rows
    read_manifest(".")  # nothing was added to the bundle
    if home == "unknown":
        assert cost_cache.cache_path(".", 1) is None and cost_cache.load_cached(".", 1) is None
    else:
        assert cost_cache.load_cached(".", 1) is not None
        assert cost_cache.cache_path(".", 1).startswith(str(tmp_path / "home" / ".cache" / "speccompile"))


HOSTILE_CACHES = {
    "rows one": lambda d: d.update(rows=[1]),
    "times zero": lambda d: d.update(verify_ms={k: [[0.0] * len(d["lengths"])] * len(d["rows"])
                                                for k in d["verify_ms"]}, lookup_ms=0.0),
    "a list": lambda d: d.clear() or d.update(version=[1, 2]),
    "grid of another shape": lambda d: d["verify_ms"].update(greedy=[[1.0]]),
    "NaN time": lambda d: d["verify_ms"]["greedy"][0].__setitem__(0, float("nan")),
    "negative drafter": lambda d: d["drafter_ms"].update(model=[-1.0, -1.0, -1.0]),
    "strings": lambda d: d.update(lookup_ms="fast"),
    "rows huge": lambda d: d.update(rows=list(range(1, 200_001))),
    "a grid an object": lambda d: d["verify_ms"].update(greedy={}),
    # each accepted once, then a crash while drafting or in inspect, or prices that overflow to inf and NaN
    "rows one with its grid": lambda d: d.update(rows=[1], verify_ms={k: [v[0]] for k, v in d["verify_ms"].items()}),
    "drafter times text": lambda d: d["drafter_ms"].update(model=["1.0", "1.5", "2.0"]),
    "a time an integer beyond a float": lambda d: d["verify_ms"]["greedy"][0].__setitem__(0, 10 ** 400),
    "lookup an integer beyond a float": lambda d: d.update(lookup_ms=10 ** 400),
    "times near the float limit": lambda d: d.update(verify_ms={k: [[1e308] * len(d["lengths"])] * len(d["rows"])
                                                               for k in d["verify_ms"]}),
    # accepted, and the prices past the last row count fell below zero: the planner kept every node it could
    "times falling with more rows": lambda d: d["verify_ms"].update(
        greedy=[[float(len(d["rows"]) - i)] * len(d["lengths"]) for i in range(len(d["rows"]))]),
}


@pytest.mark.parametrize("damage", HOSTILE_CACHES, ids=list(HOSTILE_CACHES))
def test_a_damaged_cost_cache_is_measured_again(tiny_bundle, tmp_path, monkeypatch, damage):
    """A cache file that is not a sound measurement (wrong shapes, zero, negative or NaN times, other types) once
    crashed every generation and inspect until deleted by hand, or planned nonsense; now it is measured again."""
    import speccompile
    monkeypatch.setenv("SPECCOMPILE_CACHE", str(tmp_path))
    good = speccompile.load(tiny_bundle, threads=1).cost_model()
    path = cost_cache.cache_path(tiny_bundle, 1)
    doc = json.load(open(path))
    HOSTILE_CACHES[damage](doc)
    with open(path, "w") as f:
        json.dump(doc, f)
    assert cost_cache.load_cached(tiny_bundle, 1) is None and cost_cache.cached_models(tiny_bundle) == []
    g = speccompile.load(tiny_bundle, threads=1)
    cm = g.cost_model()
    assert cm.rows == good.rows and g.generate([5, 6, 7, 5, 6], 8, drafter="model", tree="adaptive").token_ids
    assert cost_cache.load_cached(tiny_bundle, 1) is not None  # the new measurement replaced it


def test_the_cost_cache_is_keyed_by_cpu_and_device(tiny_bundle, tmp_path, monkeypatch):
    """Kernel costs follow the CPU's instruction sets and the device: a cache from another never prices passes
    here (platform.processor() is empty on Linux, so the key once named no CPU at all)."""
    from speccompile.runtime.machine_id import cpu_identity
    monkeypatch.setenv("SPECCOMPILE_CACHE", str(tmp_path))
    key = cost_model.machine_key(1)["machine"]
    assert cpu_identity()["model"] in key and "cpu" in key
    assert cost_cache.cache_path(tiny_bundle, 1, "cpu") != cost_cache.cache_path(tiny_bundle, 1, "cuda")
    monkeypatch.setattr(cost_model, "cpu_identity", lambda: {"model": "Another CPU", "kernel_flags": ["avx2"]})
    assert cost_model.machine_key(1)["machine"] != key


def test_the_cost_cache_is_keyed_by_the_kernels_build(monkeypatch):
    """Another release's kernels time otherwise: their build's hash is part of the key, the name their library is
    filed under, told without building it (a bundle without them loads without a compiler's run)."""
    import os

    from speccompile.plugins import q4_matmul
    key = cost_model.machine_key(1)["machine"]
    assert f"kernels {q4_matmul.build_key()}" in key
    if not q4_matmul.unavailable():
        assert os.path.basename(os.path.dirname(q4_matmul.library())) == q4_matmul.build_key()
    q4_matmul.build_key.cache_clear()
    monkeypatch.setattr(q4_matmul, "_compile", lambda *a: pytest.fail("build_key compiled the kernels"))
    assert q4_matmul.build_key() in key
    monkeypatch.setattr(q4_matmul, "build_key", lambda: "0123456789abcdef")
    assert cost_model.machine_key(1)["machine"] != key


def test_inspect_names_the_cost_model_this_machine_uses_first(tiny_bundle, tmp_path, monkeypatch):
    """A shared cache folder holds cost models of other machines (or onnxruntime versions): inspect lists the one
    a load here would use first, and says of each other one that it is not used here."""
    from click.testing import CliRunner

    import speccompile
    from speccompile.cli import main
    monkeypatch.setenv("SPECCOMPILE_CACHE", str(tmp_path))
    speccompile.load(tiny_bundle, threads=1).cost_model()
    mine = json.load(open(cost_cache.cache_path(tiny_bundle, 1)))
    with monkeypatch.context() as m:  # a model measured under another onnxruntime
        m.setattr(cost_cache, "machine_key", lambda threads, device="cpu": {"machine": "a 0 CPU", "threads": 1})
        cost_cache.save(cost_model.CostModel.from_dict({**mine, "key": {"machine": "a 0 CPU", "threads": 1}}),
                        tiny_bundle, 1)
    assert len(cost_cache.cached_models(tiny_bundle)) == 2
    out = CliRunner().invoke(main, ["inspect", tiny_bundle, "--no-verify"]).output
    heads = [line for line in out.splitlines() if line.startswith("cost model")]
    assert len(heads) == 2 and heads[0].endswith("; this machine's") and mine["key"]["machine"] in heads[0]
    assert "a 0 CPU; another machine's or onnxruntime's, not used here" in heads[1]


def test_a_short_context_calibrates_the_rows_it_holds(tmp_path, monkeypatch):
    """A bundle whose context is shorter than the largest calibrated pass (25 rows) once could not generate with
    its adaptive default tree at all."""
    import speccompile
    from speccompile.compile.driver import build_bundle
    monkeypatch.setenv("SPECCOMPILE_CACHE", str(tmp_path / "cache"))
    out = str(tmp_path / "b")
    build_bundle("tiny:llama", out, drafts=["lookup"], max_seq_len=24, tree="adaptive", progress=lambda m: None)
    g = speccompile.load(out, threads=1)
    cm = g.cost_model()
    assert max(cm.rows) <= 22 and min(cm.lengths) >= 1
    assert g.generate([5, 6, 7, 5, 6, 7], 8, drafter="lookup").token_ids == \
        g.generate([5, 6, 7, 5, 6, 7], 8, speculate=False).token_ids


def test_a_moved_bundle_still_decodes_and_calibrates(tiny_bundle, tmp_path, monkeypatch):
    """The cost model's cache is named after the bundle's manifest, read when it is saved: a bundle folder moved
    after loading (a serve whose bundle was renamed) once failed its first adaptive request."""
    import shutil
    import speccompile
    monkeypatch.setenv("SPECCOMPILE_CACHE", str(tmp_path / "cache"))
    moved = tmp_path / "b"
    shutil.copytree(tiny_bundle, moved)
    g = speccompile.load(str(moved), threads=1)
    shutil.move(str(moved), str(tmp_path / "elsewhere"))
    assert g.generate([5, 6, 7, 5, 6], 8, drafter="model", tree="adaptive").token_ids


def test_calibration_after_a_request_that_filled_the_cache(tmp_path, monkeypatch):
    """The first adaptive request calibrates the cost model on the target engine, whose cache the previous request
    may have left full (a plain request on a bundle without the batched graph, or a typical-acceptance one under
    top-p, which runs serialized on slot 0): calibration once stepped past the compiled context and failed the request."""
    import speccompile
    from speccompile.compile.driver import build_bundle
    monkeypatch.setenv("SPECCOMPILE_CACHE", str(tmp_path / "cache"))
    out = str(tmp_path / "b")
    build_bundle("tiny:llama", out, drafts=["lookup"], max_seq_len=64, weights="int4", max_batch=1,
                 progress=lambda m: None)
    g = speccompile.load(out, threads=1, context_cache=False)
    prompt = [int(i) for i in np.random.default_rng(0).integers(3, 384, 20)]
    assert len(g.generate(prompt, 44, speculate=False).token_ids) == 44  # the cache now holds all 64 slots
    assert g.generate(prompt, 10).token_ids == g.generate(prompt, 10, speculate=False).token_ids


def test_the_cost_cache_is_keyed_by_threads_and_kernel_flags(tmp_path, monkeypatch):
    """Pass times follow the thread count and the instruction sets that pick the kernels: a cache measured with
    others never prices passes here. A model of another cache version is measured again."""
    monkeypatch.setenv("SPECCOMPILE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "manifest.json").write_text("{}")
    bundle = str(tmp_path)
    assert cost_model.machine_key(1)["threads"] == 1 and cost_model.machine_key(2)["threads"] == 2
    assert cost_cache.cache_path(bundle, 1) != cost_cache.cache_path(bundle, 2)
    monkeypatch.setattr(cost_model, "cpu_identity", lambda: {"model": "A CPU", "kernel_flags": ["avx2"]})
    avx2 = cost_model.machine_key(1)["machine"]
    monkeypatch.setattr(cost_model, "cpu_identity", lambda: {"model": "A CPU", "kernel_flags": ["avx2", "avx512f"]})
    assert cost_model.machine_key(1)["machine"] != avx2
    old = synthetic(20.0, 1.0).to_dict() | {"version": cost_model.CACHE_VERSION - 1}
    with pytest.raises(ValueError):
        CostModel.from_dict(old)
