"""Adaptive drafting's plan around choose/update's arithmetic, on synthetic costs and synthetic acceptance: a timed
pass's correction, the sampled mode's prices, the probe interval, the engine's row limit, estimates kept per request,
and which slots of a shared pass verify a prompt-lookup node."""
import dataclasses
import types

import numpy as np
import pytest

from speccompile.format.trees import TreeSpec
from speccompile.runtime import shared_drafts
from speccompile.runtime.adaptive import PROBE_EVERY, AdaptiveDrafting
from speccompile.runtime.estimates import Rate
from speccompile.runtime.cost_model import HEAD_ROWS, CostModel
from speccompile.runtime.drafters.base import Proposal
from speccompile.runtime.sampling import SamplingParams
from test_adaptive import ROWS, LENGTHS, adaptive, confident_chain, synthetic


def test_a_timed_pass_corrects_the_price_at_once_by_its_weight():
    """A pass timed at twice its price raises it at once (a price asked again at the length asked last is not the
    one remembered from before the pass), but by one pass against the calibration's several: not to twice. A
    stalled pass counts as twice its price, no more."""
    cm = synthetic(10.0, 5.0)
    assert cm.verify(2, 16) == 15.0
    prices = []
    for ms in (30.0, 150.0):
        cm.observe(2, 16, True, ms)
        prices.append(cm.verify(2, 16))
    assert 15.0 < prices[0] < prices[1] < 15.0 * 1.5
    unasked = synthetic(10.0, 5.0)  # the same passes timed, no price asked before them
    for _ in prices:
        unasked.observe(2, 16, True, 30.0)
    assert unasked.verify(2, 16) == prices[1]
    cm, between = synthetic(10.0, 5.0), synthetic(10.0, 5.0).verify(2, 100)
    assert cm.verify(2, 100) == between
    cm.observe(2, 16, True, 30.0)
    assert cm.verify(2, 100) > between


def test_a_timed_pass_corrects_its_nearest_row_count():
    """Seven-row passes timed at twice their price, one-, two- and four-row passes at theirs: the correction lands
    on eight rows, the nearest measured row count, and four rows keep their price."""
    cm = synthetic(10.0, 5.0)
    for _ in range(60):
        for rows, ratio in ((1, 1.0), (2, 1.0), (4, 1.0), (7, 2.0)):
            cm.observe(rows, 16, True, ratio * (10.0 + 5.0 * (rows - 1)))  # its calibrated price at 16 tokens
    assert cm.verify(4, 16) == pytest.approx(25.0, rel=0.02)
    assert cm.verify(8, 16) == pytest.approx(2 * 45.0, rel=0.02)


def test_prices_are_constant_beyond_the_measured_lengths():
    """Past the longest measured length (the end of the context) and before the shortest, a pass costs what it
    cost there: not extrapolated into a cheaper or negative price."""
    cm = synthetic(10.0, 5.0)
    for rows in (1, 2, 8, 25, 40):
        assert cm.verify(rows, 5000) == cm.verify(rows, 1000) and cm.verify(rows, 1) == cm.verify(rows, 16)


def two_mode_costs(greedy_row_ms: float, sampled_row_ms: float) -> CostModel:
    """Verify passes whose rows cost greedy_row_ms greedy and sampled_row_ms sampled (the full logits)."""
    def grid(row_ms):
        return [[20.0 + row_ms * (r - 1)] * len(LENGTHS) for r in ROWS]
    return CostModel(ROWS, LENGTHS, {"greedy": grid(greedy_row_ms), "sampled": grid(sampled_row_ms)},
                     {"head": [0.5] * len(HEAD_ROWS)}, 0.01)


@pytest.mark.parametrize("greedy", [True, False])
def test_a_sampled_request_is_planned_by_the_sampled_passes_prices(greedy):
    """Rows cheap in a greedy pass and as dear as a step in a sampled one: a greedy request drafts and verifies a
    confident chain, a sampled one neither drafts nor verifies it."""
    a = AdaptiveDrafting(two_mode_costs(0.1, 20.0), "head", True, TreeSpec("adaptive", 63, depth=4, lookup=0),
                         greedy, 64)
    plan = a.plan(100)
    prop, scores = confident_chain(4, np.log(0.8))
    kept = a.choose(prop, 4, scores, dataclasses.replace(plan, head_depth=4), 100)
    assert (plan.head_depth > 0) == greedy
    assert (len(kept.tokens) > 0) == greedy


def test_a_skipped_depth_close_to_paying_is_probed_every_probe_every_passes():
    """A level whose drafts are seldom taken, rows cheap: the plan drafts none but probes one level deeper on
    exactly every PROBE_EVERY-th pass (its expected loss is small: test_adaptive.py has the rule)."""
    a = adaptive(synthetic(20.0, 1.0))
    a.head_reach[0].add(0.0, 6.0)
    probes = [i for i in range(3 * PROBE_EVERY) if a.plan(100).probe]
    assert probes == [PROBE_EVERY - 1, 2 * PROBE_EVERY - 1, 3 * PROBE_EVERY - 1]


def test_a_probes_forced_node_is_not_counted_as_the_cuts_choice():
    """Rows too dear to draft: a probe verifies a node the cut would have dropped. The estimate of how often the cut
    keeps a drafter node at that depth (which prices a level of drafting) is left as it was."""
    a = adaptive(synthetic(20.0, 20.0))
    a.since_probe = 1000  # long enough for a probe this far from paying
    plan = a.plan(100)
    kept_before = [(r.num, r.den) for r in a.head_kept + a.head_rows]
    prop, scores = confident_chain(plan.head_depth, np.log(0.6))
    assert plan.probe and len(a.choose(prop, len(prop.tokens), scores, plan, 100).tokens) == 1
    assert [(r.num, r.den) for r in a.head_kept + a.head_rows] == kept_before


def test_a_probe_never_plans_past_the_trees_depth():
    """A plan that already drafts the tree's whole depth has no level to probe: its depth stays within the tree."""
    a = adaptive(synthetic(20.0, 0.01, head_ms=0.01), depth=2, lookup=0)
    plans = [a.plan(100) for _ in range(3 * PROBE_EVERY)]
    assert max(p.head_depth for p in plans) == 2 and not any(p.probe for p in plans)


def test_the_cut_keeps_no_more_rows_than_the_engine_verifies():
    """Rows nearly free and every node confident: the cut still keeps at most max_rows - 1 draft nodes (the pending
    token takes a row of the pass)."""
    a = AdaptiveDrafting(synthetic(20.0, 0.01), "head", True, TreeSpec("adaptive", 63, depth=8, lookup=0), True, 4)
    prop, scores = confident_chain(8, np.log(0.99))
    assert len(a.choose(prop, 8, scores, a.plan(100), 100).tokens) == 3


def test_each_request_keeps_its_own_estimates():
    """One request learns that its drafter's nodes are never taken; another request on the same cost model still
    plans and cuts from the priors, as a fresh one does."""
    cost = synthetic(20.0, 2.0)
    taught, other = adaptive(cost), adaptive(cost)
    prop, scores = confident_chain(4, np.log(0.9))
    for _ in range(30):
        taught.choose(prop, 4, scores, taught.plan(100), 100)
        taught.update([])
    fresh = adaptive(synthetic(20.0, 2.0))

    def cut(a):
        return len(a.choose(prop, 4, scores, dataclasses.replace(a.plan(100), probe=False), 100).tokens)
    assert cut(other) == cut(fresh) > cut(taught)


def test_a_shared_pass_verifies_lookup_nodes_of_the_likeliest_greedy_slots(monkeypatch):
    """Over a target that verifies one path, the greedy slots whose prompt-lookup match this request has found
    taken most often, at most SHARED_LOOKUP_SLOTS of them and only at SHARED_LOOKUP_MIN or above, verify a lookup
    node; a sampled slot never does (its draws follow its drafts)."""
    tree = TreeSpec("adaptive", 63, depth=2, lookup=4)
    estimates = {0: 0.3, 1: 0.9, 2: 0.7, 3: 0.8, 4: 0.95, 5: 0.85}  # slot: how often its 3-gram matches are taken
    slots = []
    for index, p in estimates.items():
        greedy = index != 4
        a = AdaptiveDrafting(synthetic(20.0, 1.0), "head", True, tree, greedy, 64, chains_only=True)
        a.lookup_accept[True, 3][0] = Rate(p, 1e6)
        a.matches = lambda lookup, ctx: (np.array([0]), int(ctx[-1]))  # the request's index finds a 3-gram match
        slots.append(types.SimpleNamespace(index=index, adapt=a, drafter=None, context=np.array([5, 3]), n=2,
                                           params=types.SimpleNamespace(greedy=greedy), fixed_output=greedy))
    gen = types.SimpleNamespace(lookup_of=lambda drafter: None)

    def chosen(most: int, least: float) -> list[int]:
        monkeypatch.setattr(shared_drafts, "SHARED_LOOKUP_SLOTS", most)
        monkeypatch.setattr(shared_drafts, "SHARED_LOOKUP_MIN", least)
        picked = shared_drafts.lookup_slots(gen, slots)
        assert all(match[1] == 3 for match in picked.values())
        return sorted(picked)
    assert chosen(2, 0.5) == [1, 5]  # the likeliest two
    assert chosen(4, 0.75) == [1, 3, 5]  # all greedy slots at the floor or above


def test_a_fraction_of_a_row_is_priced_between_the_whole_rows():
    """Drafting cheap, a row dear; the cut keeps the drafter's node on 30% of passes but then 0.8 rows of it: priced
    as 0.8 of a row (not as none), the level loses to a plain step."""
    a = adaptive(synthetic(10.0, 3.0, head_ms=0.5), depth=1, lookup=0)
    a.head_kept[0], a.head_reach[0] = Rate(0.3, 50.0), Rate(0.9, 50.0)
    a.head_rows[0] = Rate(0.8, 50.0)
    assert a.plan(100).head_depth == 0


def test_lookup_rows_that_buy_little_leave_the_plan_as_without_lookup():
    """Prompt lookup's nodes have added six rows a pass for a tenth of a token: their rows are priced, so joining
    them never pays, and the drafter drafts as deep as it would with no lookup at all."""
    def planned(lookup: int) -> int:
        a = adaptive(synthetic(10.0, 0.5, head_ms=0.2), depth=3, lookup=lookup)
        a.lookup_gain, a.lookup_rows = Rate(0.1, 1e3), Rate(6.0, 1e3)
        a.head_reach = [Rate(0.3, 1e3) for _ in a.head_reach]
        return a.plan(100).head_depth
    assert planned(6) == planned(0) > 0


def test_drafting_already_spent_still_counts_in_the_plain_steps_price():
    """A pass whose drafting took as long as a step: the cut weighs a node against a plain step that paid for
    that drafting too (it is spent either way), so a node worth its row is verified."""
    a = adaptive(synthetic(20.0, 1.0), depth=1, lookup=0)
    prop, scores = confident_chain(1, np.log(0.3))
    plan = dataclasses.replace(a.plan(100), head_depth=1, draft_ms=20.0, probe=False)
    assert len(a.choose(prop, 1, scores, plan, 100).tokens) == 1


def test_the_estimates_follow_the_request_as_it_goes():
    """A drafter whose nodes were taken for a long stretch and are then always rejected: within a few passes the
    plan stops drafting, as the older passes weigh less and less."""
    a = adaptive(synthetic(20.0, 3.0), depth=2, lookup=0)
    prop, scores = confident_chain(2, np.log(0.9))

    def run(passes: int, taken: bool) -> int:
        for _ in range(passes):
            a.since_probe = 0  # no probes: the estimates alone
            plan = a.plan(100)
            kept = a.choose(prop, 2, scores, plan, 100)
            a.update(list(range(len(kept.tokens))) if taken else [])
        return plan.head_depth
    assert run(60, True) > 0
    assert run(20, False) == 0


def test_the_catch_up_over_the_accepted_tokens_is_priced_by_their_rows():
    """After a pass that accepted three tokens, the drafter's first pass runs over four rows (those tokens and the
    target's own): the same plan's drafting is priced as that pass, not as a one-row one."""
    cost = synthetic(20.0, 0.01)
    cost.drafter_ms["head"] = [1.0, 2.0, 4.0]  # by HEAD_ROWS: 1, 2, 4 rows
    a = adaptive(cost, depth=2, lookup=0)
    before = a.plan(100)
    a.update([0, 1, 2])
    after = a.plan(100)
    assert before.head_depth == after.head_depth == 2
    assert after.draft_ms - before.draft_ms == pytest.approx(cost.draft("head", 4) - cost.draft("head", 1))


def test_the_catch_up_is_priced_by_the_rows_the_drafter_is_behind():
    """A drafter with a cache of its own (an MTP head, a draft model) runs every token committed since it last
    drafted before it drafts: after a run of plain steps, many rows. The plan prices the rows the drafter says it
    is behind, and drafts nothing where that catch-up outweighs the drafts' expected tokens."""
    cost = synthetic(20.0, 0.01)
    cost.drafter_ms["head"] = [1.0, 2.0, 4.0]  # by HEAD_ROWS: 1, 2, 4 rows; past 4 a row more each
    near = adaptive(cost, depth=1, lookup=0).plan(100, behind=1)
    assert near.head_depth == 1 and near.draft_ms == pytest.approx(cost.draft("head", 1))
    assert adaptive(cost, depth=1, lookup=0)._draft_prices(False, 12) == pytest.approx([0.0, cost.draft("head", 12)])
    assert adaptive(cost, depth=1, lookup=0).plan(100, behind=200).head_depth == 0


def test_drafters_with_a_cache_say_how_far_behind_they_are(tiny_generator):
    """The draft model's rows behind a context: those its catch-up would run (at least the last token), none
    known for prompt lookup, which keeps no cache."""
    g = tiny_generator
    drafter = g.drafters["model"]
    drafter.reset()
    context = np.arange(5, 25, dtype=np.int64)
    assert drafter.rows_behind(len(context)) == len(context)
    drafter.propose_tree(context, TreeSpec("dynamic", 2, depth=2, branching=1), SamplingParams(), None)
    assert drafter.rows_behind(len(context)) == 1
    assert drafter.rows_behind(len(context) + 7) == 7  # six fed, then the last token's pass
    assert g.lookup.rows_behind(len(context)) is None


def test_an_mtp_heads_rows_behind_are_those_its_catch_up_runs():
    """The MTP head (and EAGLE's, built on it) runs the pairs (h_t, x_t+1) its cache lacks, and the last one again
    for its logits: rows_behind counts exactly the rows _catch_up hands its engine, from a fresh prompt, after a
    pass, and after a run of plain steps whose features it has been given."""
    from speccompile.runtime.drafters.mtp import MtpDrafter

    class Cache:
        length = 0

        def truncate(self, n):
            self.length = n

    ran = []
    engine = types.SimpleNamespace(cache=Cache(), max_seq_len=64, vocab_size=8, hidden=np.zeros((128, 4), np.float32))
    engine.forward = lambda tokens, positions, hidden_in: ran.append(len(tokens)) or (np.zeros((len(tokens), 8)), None)
    head = MtpDrafter("mtp", engine)
    context = np.arange(40, dtype=np.int64)
    for known, length in ((30, 31), (30, 31), (37, 38), (37, 40)):
        head.observe(0, np.zeros((known, 4), np.float32))
        behind, ran[:] = head.rows_behind(length), []
        head._catch_up(context[:length])
        assert behind == sum(ran), (known, length)


def test_prompt_lookups_host_time_is_priced_at_every_depth():
    """Prompt lookup joins whatever the drafter drafts: its host time is part of every depth's drafting price."""
    cost = synthetic(20.0, 0.01)
    cost.lookup_ms = 5.0
    a = adaptive(cost, depth=2, lookup=6)
    plan = a.plan(100)
    assert plan.head_depth == 2
    assert plan.draft_ms == pytest.approx(5.0 + cost.draft("head", 1) + cost.draft("head", a.branching))


def test_prompt_lookup_drafting_alone_is_probed_again():
    """Prompt lookup drafting alone (no drafter levels to probe), rows a quarter of a step: after a few rejected
    continuations the cut verifies none, and no verified node meant no evidence, so lookup stayed off for the rest
    of the request. A probe verifies its likeliest node every PROBE_EVERY passes: once the text repeats, the
    estimates learn it and the continuations are verified again."""
    a = AdaptiveDrafting(synthetic(20.0, 5.0), "lookup", False, TreeSpec("adaptive", 63, depth=0, lookup=6), True, 64)
    prop = Proposal(np.arange(10, 14), None, np.arange(4) - 1, match_len=3)
    verified = []
    for i in range(20 + 6 * PROBE_EVERY):
        kept = a.choose(prop, 0, None, a.plan(100, 3), 100)
        a.update(list(range(len(kept.tokens))) if i >= 20 else [])  # rejected at first, then always taken
        verified.append(len(kept.tokens))
    assert sum(verified[2:20]) <= 20 // PROBE_EVERY  # off, but for probes
    assert all(verified[-PROBE_EVERY:])  # on again


@pytest.mark.parametrize("count", [2, 3, 4, 5])
def test_greedy_slots_of_a_shared_pass_draft_within_its_rows(count):
    """Over a target that verifies trees, greedy slots sharing a pass draft within SHARED_PASS_ROWS together: each
    slot's pending token and its drafts, at least one draft node a slot."""
    rooms = []
    gen = types.SimpleNamespace(trees_exact=True, max_seq_len=1000,
                                plan_adaptive=lambda *args, **kw: rooms.append(args[3]) or Proposal.empty())
    slots = [types.SimpleNamespace(index=i, adapt=object(), drafter=None, context=np.zeros(50, np.int64), n=20,
                                   generated=1, req=types.SimpleNamespace(max_new_tokens=500), rng=None,
                                   params=types.SimpleNamespace(greedy=True), fixed_output=True)
             for i in range(count)]
    shared_drafts.propose_shared(gen, slots, 900)
    assert len(rooms) == count and min(rooms) >= 1
    assert count * (1 + max(rooms)) <= shared_drafts.SHARED_PASS_ROWS
