"""Adaptive drafting: each pass drafts the tree that maximizes the expected committed tokens per second.

Two decisions per pass, both priced by the measured cost model (runtime/cost_model.py):
  1. before drafting, how deep the drafter's own dynamic tree goes (each level is one drafter pass), 0 for none:
     from the recent rate at which the accepted path ran through drafter nodes at each depth;
  2. after drafting (the drafter's tree joined by prompt lookup), which nodes to verify: every node gets the
     probability that the accepted path reaches it -- the drafter's own conditional probability times a
     per-depth calibration of how often such nodes were accepted lately, or for lookup nodes their recent
     acceptance at that depth after a match of that length (a 3-gram match's continuation is taken far more
     often than a 1-gram one's) -- and the tree is cut to the ancestor-closed set whose expected tokens per
     predicted pass time (drafting spent + verify rows at this context length) is best. The empty set is a
     plain decode step: speculation switched off where it would lose.
A depth the plan keeps skipping is probed again, verifying at least one node, so estimates never go stale for good
(prompt lookup drafting alone: its likeliest node where it matches): every PROBE_EVERY passes at the most, and for
a depth (or a match) far from paying only once EXPLORE_SHARE of the time since the last probe covers the probe's
expected loss. A depth the cut left nothing at teaches nothing (its nodes were never tried). Verifying any node is
priced with what such passes took beyond their price lately, more than plain steps did (runtime/pass_overhead.py).

Only which candidates are verified changes, never how they are accepted: greedy output stays the target's
exactly and sampled output keeps its distribution (the tree rules of runtime/acceptance.py hold for any tree).
The estimates live per request and start from fixed priors; the prices follow the passes timed so far, so which
nodes are verified may differ between two runs of one request. Greedy output and samples drawn per position (by
noise, or top-p's uniforms: runtime/noise.py, sampling.py) do not depend on it; what draws per draft (typical
acceptance, drafts sampled from q) reproduces from its seed only where the drafts are the same.
"""
from __future__ import annotations

import time

import numpy as np

from speccompile.format.trees import TreeSpec, depths
from speccompile.runtime.cost_model import HEAD_ROWS, CostModel
from speccompile.runtime.drafters.base import Proposal
from speccompile.runtime.drafters.lookup import LookupDrafter, LookupReach, MatchIndex
from speccompile.runtime.estimates import (AGREED_PRIOR, DEPTHS, HEAD_PRIOR, LOOKUP_PRIOR, NO_FLAGS, NO_NODES, NO_PROBS,
                                           NO_SCORE_PRIOR, Kept, Plan, Rate, by_depth, first_rate, match_index,
                                           shrunk)
from speccompile.runtime.pass_overhead import AFTER

PROBE_EVERY = 8  # passes between tries of one level deeper than the plan would draft, at the least
# and no sooner than this share of the passes' time since the last try would pay for the try's expected loss
EXPLORE_SHARE = 0.01
REACH_LIMIT = 4  # lookup continuations reach at most this many times the tree's L deep (as fixed trees do)


class AdaptiveDrafting:
    """One request's estimates and choices. has_head: the drafter drafts a tree of its own (not prompt lookup)."""

    def __init__(self, cost: CostModel, drafter: str | None, has_head: bool, tree: TreeSpec, greedy: bool,
                 max_rows: int, chains_only: bool = False):
        """chains_only: verify one path a pass (Generator.trees_exact: a target whose tree rows are not exact)."""
        self.cost, self.drafter, self.greedy, self.max_rows = cost, drafter, greedy, max_rows
        self.chains_only = chains_only
        self.max_depth = tree.depth if has_head else 0
        self.branching = tree.branching
        self.reach = LookupReach(tree.lookup, REACH_LIMIT * tree.lookup) if tree.lookup else None
        self.head_scale = [Rate(1.0, 1.0) for _ in range(DEPTHS)]  # accepted / predicted, drafter nodes per depth
        # the accepted path runs through a drafter node at depth d, given it did at d - 1
        self.head_reach = [Rate() for _ in range(DEPTHS)]
        # a lookup node is accepted, given its parent was, per match length: its parent's first lookup child (the
        # most recent match's continuation) apart from the others, which mostly compete with it
        self.lookup_accept = {(first, m): [Rate() for _ in range(DEPTHS)]
                              for first in (True, False) for m in range(len(LOOKUP_PRIOR))}
        # a drafter node that prompt lookup proposed too is accepted, given its parent was, per match length
        self.agreed_accept = [[Rate() for _ in range(DEPTHS)] for _ in range(len(LOOKUP_PRIOR))]
        self.lookup_gain, self.lookup_rows = Rate(0.3, 2.0), Rate(2.0, 2.0)  # per pass: accepted, verified
        # per depth: passes whose cut kept a drafter node at that depth, of those that drafted it; and how many
        # drafter nodes it kept there (the verify rows a level of drafting costs)
        self.head_kept = [Rate(1.0, 2.0) for _ in range(DEPTHS)]
        self.head_rows = [Rate(1.0, 2.0) for _ in range(DEPTHS)]
        self.since_probe, self.last_accepted = 0, 0
        self.kept: Kept | None = None
        self._pass_start: float | None = None  # time.perf_counter() at this pass's planning
        # plain steps since this request's last pass that verified nodes, or its prefill; whether it verified any
        self._quiet, self._after_verify = 0, False
        self._matches: MatchIndex | None = None  # prompt lookup's matches over this request's context
        self.passes, self.plain_passes, self.rows = 0, 0, 0
        self.depth_counts: dict[int, int] = {}

    # ---- before drafting ---------------------------------------------------------------------------------
    def _draft_prices(self, lookup: bool, behind: int | None = None) -> list[float]:
        """Predicted drafting time by drafter depth 0 .. max_depth: the catch-up over the tokens the drafter has not
        run (`behind`, as the drafter tells; else the last pass's), then one pass per further level (and prompt
        lookup's host time if it joins)."""
        base = self.cost.lookup_ms if lookup else 0.0
        if not self.max_depth:
            return [base]
        catch_up = self.cost.draft(self.drafter, behind or self.last_accepted + 1)
        level = self.cost.draft(self.drafter, self.branching) if self.max_depth > 1 else 0.0
        return [base] + [base + catch_up + d * level for d in range(self.max_depth)]

    def _verify_ms(self, rows: float, length: int, prices=None) -> float:
        """A pass over an expected (fractional) number of rows: between the whole numbers around it. prices:
        cost.row_prices at this length, if the caller has them."""
        lo = int(rows)
        prices = self.cost.row_prices(length, self.greedy) if prices is None else prices
        if lo + 1 > len(prices):
            ms = self.cost.verify(lo, length, self.greedy)
            return ms + (rows - lo) * (self.cost.verify(lo + 1, length, self.greedy) - ms) if rows > lo else ms
        ms = float(prices[lo - 1])
        return ms + (rows - lo) * (float(prices[lo]) - ms) if rows > lo else ms

    def lookup_wins(self, match_len: int) -> bool:
        """Verifying one path a pass, whether the continuation of a match this long is likelier to be taken than
        the drafter's first node: the cut would then seldom keep the drafter's path, and drafting it buys
        nothing. Both sides are the estimates learnt so far in this request."""
        if not (match_index(match_len) and self.chains_only and self.reach):
            return False
        head = self.head_reach[0]
        return self.lookup_estimate(match_len) > (head.num + HEAD_PRIOR) / (head.den + 1.0)

    def lookup_estimate(self, match_len: int) -> float:
        """How likely a match this long's next token is taken, as this request has found so far."""
        m = match_index(match_len)
        return first_rate(self.lookup_accept[True, m], LOOKUP_PRIOR[m])

    def matches(self, lookup: LookupDrafter, context: np.ndarray) -> tuple[np.ndarray, int]:
        """lookup.matches(context), kept up to date over this request's context (drafters/lookup.py MatchIndex)."""
        if self._matches is None or self._matches.lookup is not lookup:
            self._matches = MatchIndex(lookup)
        return self._matches.matches(context)

    def lookup_plan(self, nodes: int) -> Plan:
        """A pass that drafts by prompt lookup alone, at most `nodes` nodes (a shared pass's rows)."""
        self._pass_start = time.perf_counter()
        return Plan(0, 0, nodes, self._draft_prices(True)[0])

    def plan(self, length: int, match_len: int = 0, behind: int | None = None) -> Plan:
        """How deep the drafter drafts this pass, and how many lookup nodes join it; match_len: the n-gram prompt
        lookup matches on at the context's end (0: none, or not known); behind: the rows the drafter's catch-up
        would run (Drafter.rows_behind: after plain steps, every token they committed)."""
        self._pass_start = time.perf_counter()
        lookup = self.reach.reach if self.reach else 0
        if self.lookup_wins(match_len):
            return self.lookup_plan(lookup)
        self.since_probe += 1
        if not self.max_depth:  # prompt lookup drafting alone: no drafter level to price; its nodes, which the cut
            # would otherwise never verify again once a few were rejected, are what a probe tests
            probe = lookup > 0 and match_len > 0 and self._lookup_probe_due(match_len, length)
            self.since_probe = 0 if probe else self.since_probe
            return Plan(0, 0, lookup, self._draft_prices(bool(lookup))[0], probe)
        drafting = self._draft_prices(bool(lookup), behind)
        rates, times = self._rates(length, lookup, drafting)
        best = int(np.argmax(rates))
        probe = best < self.max_depth and self._probe_due(rates, times, best)
        if probe:  # look again at one level more
            best, self.since_probe = best + 1, 0
        return Plan(best, 2 * best, lookup, drafting[best], probe)

    def _rates(self, length: int, lookup: int, drafting: list[float]) -> tuple[list[float], list[float]]:
        """Per drafter depth 0 .. max_depth: the expected committed tokens per ms, and the pass's expected ms (a
        pass's measured excess over its price included where it verifies nodes: runtime/pass_overhead.py)."""
        gain = self.lookup_gain.value if lookup else 0.0
        extra_rows = self.lookup_rows.value if lookup else 0.0
        excess = self.cost.overhead.verify_extra()
        prices = self.cost.row_prices(length, self.greedy)
        rates, times = [], []
        # per depth: the expected tokens (1 + the chances that the accepted path runs through a drafter node at
        # each level drafted, kept and accepted), and the rows, which are the drafter nodes the cut keeps there,
        # not one a level: a level whose node the cut mostly drops costs its drafting but seldom a row
        value, reach, rows, above = 1.0, 1.0, 1.0, HEAD_PRIOR
        for depth in range(self.max_depth + 1):
            if 0 < depth <= DEPTHS:
                above = shrunk(self.head_reach[depth - 1], above)  # by_depth, one level at a time
                reach *= self.head_kept[depth - 1].value * above
                value += reach
            if depth:
                rows += self.head_rows[min(depth - 1, DEPTHS - 1)].value
            draft = drafting[depth] + (excess if depth else 0.0)
            alone = draft + self._verify_ms(rows, length, prices)
            joined = draft + self._verify_ms(rows + extra_rows, length, prices)  # the cut may drop lookup
            rates.append(max(value / alone, (value + gain) / joined))
            times.append(alone if value / alone >= (value + gain) / joined else joined)
        return rates, times

    def _probe_due(self, rates: list[float], times: list[float], best: int) -> bool:
        """Whether to try one level deeper than the best plan this pass: PROBE_EVERY passes after the last try at
        the earliest, and once EXPLORE_SHARE of the passes' time since then pays for the try's expected loss
        against the best plan (a level far from paying is tried seldom, one close to it as often as that)."""
        if self.since_probe < PROBE_EVERY:
            return False
        loss = times[best + 1] * (1.0 - rates[best + 1] / rates[best])
        return self.since_probe * EXPLORE_SHARE * times[best] >= loss

    def _lookup_probe_due(self, match_len: int, length: int) -> bool:
        """_probe_due for prompt lookup drafting alone: the try verifies the match's likeliest node, a row and the
        excess of a pass that verifies (runtime/pass_overhead.py) for the chance that it is taken."""
        if self.since_probe < PROBE_EVERY:
            return False
        plain, row = self._verify_ms(1, length), self._verify_ms(2, length) + self.cost.overhead.verify_extra()
        loss = row - (1.0 + self.lookup_estimate(match_len)) * plain
        return self.since_probe * EXPLORE_SHARE * plain >= loss

    def draft(self, drafter, context, plan: Plan, cap: int, params, rng) -> Proposal:
        """The drafter's dynamic tree as `plan` says, within `cap` nodes, its drafting time taken (`drafted`)."""
        spec = TreeSpec("dynamic", min(plan.head_nodes, cap), depth=min(plan.head_depth, cap),
                        branching=self.branching)
        eng = getattr(drafter, "engine", None)
        passes, tokens, t0 = getattr(eng, "passes", 0), getattr(eng, "tokens_run", 0), time.perf_counter()
        prop = drafter.propose_tree(context, spec, params, rng)
        if hasattr(eng, "passes"):
            self.drafted(eng.passes - passes, eng.tokens_run - tokens, (time.perf_counter() - t0) * 1e3)
        return prop

    def drafted(self, passes: int, tokens: int, ms: float) -> None:
        """The drafter's graph ran `passes` times over `tokens` tokens in `ms` this pass: its price follows what
        drafting takes now. A catch-up over a whole prompt (more tokens a pass than drafting runs) is not one."""
        if passes and tokens <= passes * HEAD_ROWS[-1]:
            predicted = passes * self.cost.draft(self.drafter, tokens / passes, observed=False)
            self.cost.observe_draft(self.drafter, predicted, ms)

    # ---- after drafting ----------------------------------------------------------------------------------
    def _reach_probabilities(self, prop: Proposal, head: int, scores) -> tuple[np.ndarray, ...]:
        """Per node: the probability the accepted path reaches it, its depth, whether the drafter proposed it, the
        drafter's own conditional probability for it, whether it is its parent's first lookup child and whether
        prompt lookup proposed a drafter node too."""
        k = len(prop.tokens)
        parents = np.arange(k) - 1 if prop.parents is None else prop.parents
        level = depths(parents)
        from_head = np.arange(k) < head
        reach, own, first = np.zeros(k), np.zeros(k), np.zeros(k, bool)
        m = match_index(prop.match_len)
        lookup_accept = {f: by_depth(self.lookup_accept[f, m], LOOKUP_PRIOR[m] if f else LOOKUP_PRIOR[m] / 4)
                         for f in (True, False)}
        agreed = np.zeros(k, bool) if prop.lookup_agrees is None else prop.lookup_agrees & from_head
        agreed_accept = by_depth(self.agreed_accept[m], AGREED_PRIOR[m]) if agreed.any() else None
        has_lookup_child = set()
        for i in range(k):
            p, b = parents[i], min(level[i], DEPTHS - 1)
            above = reach[p] if p >= 0 else 1.0
            if from_head[i]:
                if scores is None:
                    own[i], scale = 1.0, NO_SCORE_PRIOR * self.head_scale[b].value
                else:
                    own[i], scale = np.exp(scores[i] - (scores[p] if p >= 0 else 0.0)), self.head_scale[b].value
                estimate = min(1.0, own[i] * scale)
                reach[i] = above * (max(estimate, agreed_accept[b]) if agreed[i] else estimate)
            else:
                first[i] = p not in has_lookup_child
                has_lookup_child.add(p)
                reach[i] = above * lookup_accept[bool(first[i])][b]
        return parents, level, from_head, reach, own, first, agreed

    def may_verify(self, plan: Plan, match_len: int, length: int, nodes: int) -> bool:
        """Whether `choose` could keep a node this pass: false only where it provably keeps none (no drafter level
        planned, and none of up to `nodes` prompt-lookup nodes can pay), so that a plain step skips building and
        weighing the tree. No lookup node is likelier to be reached than a child of the root, and k of them pay
        only if k such chances outweigh the k rows' price: p * k * (drafting + a plain step) > verify(1 + k) -
        verify(1) + what verifying any node costs beyond its rows, for some k (choose's rule, bounded)."""
        if plan.head_depth:
            return True
        if not match_len or nodes <= 0:  # nothing to join: choose would get no node
            return False
        if plan.probe:
            return True
        m = match_index(match_len)
        p = max(first_rate(self.lookup_accept[True, m], LOOKUP_PRIOR[m]),
                first_rate(self.lookup_accept[False, m], LOOKUP_PRIOR[m] / 4))
        prices = self.cost.row_prices(length, self.greedy)
        rows = prices[:min(nodes, self.max_rows - 1, len(prices) - 1) + 1].tolist()  # plain Python: a plain step's
        gain, excess = p * (plan.draft_ms + rows[0]), self.cost.overhead.verify_extra()  # few microseconds
        return any(gain * k > rows[k] - rows[0] + excess for k in range(1, len(rows)))

    def plain(self, plan: Plan, match_len: int, length: int) -> Proposal:
        """A pass that verifies nothing (a plain step), kept for `update` as a cut to nothing."""
        self.kept = Kept(NO_NODES, NO_NODES, NO_FLAGS, NO_FLAGS, NO_PROBS, NO_FLAGS, match_index(match_len), plan,
                         plan.draft_ms + self.cost.verify(1, length, self.greedy))
        self._count(plan, 0)
        return Proposal.empty()

    def choose(self, prop: Proposal, head: int, scores, plan: Plan, length: int) -> Proposal:
        """The ancestor-closed part of `prop` worth verifying (possibly nothing: a plain step). head: how many of
        its first nodes the drafter proposed (the rest came from prompt lookup); scores: their path
        log-probabilities, if the drafter gives them."""
        if not len(prop.tokens) and not plan.head_depth:  # nothing drafted: a plain step, no estimate to weigh
            return self.plain(plan, prop.match_len, length)
        parents, level, from_head, reach, own, first, agreed = self._reach_probabilities(prop, head, scores)
        children: dict[int, list[int]] = {}
        for i, p in enumerate(parents):
            children.setdefault(int(p), []).append(i)
        frontier, order = list(children.get(-1, [])), []
        total, best_len = 1.0, 0
        best_rate = total / (plan.draft_ms + self.cost.verify(1, length, self.greedy))
        excess = self.cost.overhead.verify_extra()  # what verifying any node costs beyond its rows
        while frontier and len(order) < self.max_rows - 1:
            i = max(frontier, key=lambda v: reach[v])
            frontier.remove(i)
            order.append(i)
            # a chain: the path goes on below i only; a tree: i's children join the frontier
            frontier = children.get(i, []) + ([] if self.chains_only else frontier)
            total += reach[i]
            rate = total / (plan.draft_ms + self.cost.verify(1 + len(order), length, self.greedy) + excess)
            if rate > best_rate:
                best_rate, best_len = rate, len(order)
        if plan.probe:  # estimates grown too low would otherwise never be put to the test again
            best_len = max(best_len, min(1, len(order)))
        elif plan.head_depth:
            kept_levels = level[order[:best_len]][from_head[order[:best_len]]]
            for d in range(min(plan.head_depth, DEPTHS)):
                self.head_kept[d].add(float(d in kept_levels), 1.0)
                self.head_rows[d].add(float((kept_levels == d).sum()), 1.0)
        keep = np.array(sorted(order[:best_len]), np.int64)  # ascending: still parents before children
        index = np.full(len(parents) + 1, -1, np.int64)
        index[keep] = np.arange(len(keep))
        new_parents = index[parents[keep]] if len(keep) else np.zeros(0, np.int64)
        self.kept = Kept(new_parents, level[keep], from_head[keep], first[keep], own[keep], agreed[keep],
                         match_index(prop.match_len), plan,
                         plan.draft_ms + self.cost.verify(1 + len(keep), length, self.greedy))
        self._count(plan, len(keep))
        return Proposal(prop.tokens[keep], None, new_parents) if len(keep) else Proposal.empty()

    def skip(self) -> Proposal:
        """A pass with no room to draft (the answer's end, or a shared pass with no rows to spare): a plain step,
        which teaches the estimates nothing."""
        self.kept = None
        self._count(Plan(0, 0, 0, 0.0), 0)
        return Proposal.empty()

    def _time(self, start: float, price_ms: float, verified: bool) -> None:
        """Time the pass into the cost model's PassOverhead: a plain step among the few after a verifying pass as
        one it slowed; one as soon after the prefill, slowed by that, not at all."""
        if verified or self._quiet >= AFTER:
            self.cost.overhead.finish(start, price_ms, verified)
        elif self._after_verify:
            self.cost.overhead.finish(start, price_ms, False, after=self._quiet)
        self._quiet = 0 if verified else self._quiet + 1
        self._after_verify = self._after_verify or verified

    def _count(self, plan: Plan, rows: int) -> None:
        self.passes += 1
        self.plain_passes += rows == 0
        self.rows += rows
        self.depth_counts[plan.head_depth] = self.depth_counts.get(plan.head_depth, 0) + 1

    # ---- after verifying ---------------------------------------------------------------------------------
    def update(self, path: list[int], alone: bool = True) -> None:
        """Learn from the pass just verified: `path` the accepted nodes of the kept tree; alone: the pass ran this
        request only (its time is this request's)."""
        kept, self.last_accepted = self.kept, len(path)
        if kept is None:
            return
        start, self._pass_start = self._pass_start, None
        if alone and start is not None:  # a pass shared with other requests took their time too
            self._time(start, kept.price_ms, len(kept.parents) > 0)
        if not len(kept.parents):  # a plain step: prompt lookup's share of a planned pass was nothing
            if kept.plan.lookup_nodes:
                self.lookup_gain.add(0.0, 1.0)
                self.lookup_rows.add(0.0, 1.0)
            if self.reach:
                self.reach.update(0, 0)
            return
        on = np.zeros(len(kept.parents), bool)
        on[path] = True
        tried = np.array([p < 0 or on[p] for p in kept.parents], bool)  # nodes whose parent was accepted
        for b in range(min(int(kept.level.max(initial=-1)) + 1, DEPTHS)):
            at = tried & (np.minimum(kept.level, DEPTHS - 1) == b)
            head = at & kept.from_head & ~kept.agreed
            if head.any():
                self.head_scale[b].add(float(on[head].sum()), float(kept.predicted[head].sum()))
            agreed = at & kept.agreed
            if agreed.any():
                self.agreed_accept[kept.match][b].add(float(on[agreed].sum()), float(agreed.sum()))
            for f in (True, False):
                look = at & ~kept.from_head & (kept.first == f)
                if look.any():
                    self.lookup_accept[f, kept.match][b].add(float(on[look].sum()), float(look.sum()))
        path_head = kept.from_head[path] if path else np.zeros(0, bool)
        verified = set(kept.level[kept.from_head].tolist())  # the drafter's depths the cut left something at
        for d in range(kept.plan.head_depth):
            if d not in verified or (d and not (d <= len(path_head) and path_head[d - 1])):
                break  # nothing verified there, or not reached through the drafter at d - 1: no evidence
            self.head_reach[d].add(float(d < len(path_head) and path_head[d]), 1.0)
        if kept.plan.lookup_nodes:
            self.lookup_gain.add(float((~path_head).sum()), 1.0)
            self.lookup_rows.add(float((~kept.from_head).sum()), 1.0)
        if self.reach:
            self.reach.update(len(path), int(kept.level.max()) + 1 if len(kept.level) else 0)

    def summary(self) -> dict:
        """What the request chose: passes, plain steps among them, mean verified draft nodes, drafter depths."""
        return {"passes": self.passes, "plain_passes": self.plain_passes,
                "mean_draft_nodes": self.rows / self.passes if self.passes else 0.0,
                "drafter_depths": {str(d): c for d, c in sorted(self.depth_counts.items())}}
