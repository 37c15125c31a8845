"""The decode loop: prefill, then draft -> verify -> accept -> roll back, a pass at a time.

`DecodeLoop.steps` runs it for one sequence; the scheduler (runtime/scheduler.py) runs the same parts (`propose` or
`propose_adaptive`, `verify`, `commit`) for each sequence slot of a shared pass. Generator (runtime/generator.py) is
a DecodeLoop over a loaded bundle: the attributes below are what its constructor sets."""
from __future__ import annotations

import dataclasses
import time
from typing import Iterator, NamedTuple

import numpy as np

from speccompile.format.trees import ADAPTIVE_LOOKUP, TreeSpec, depths
from speccompile.graphs import MAX_STEP_TOKENS
from speccompile.runtime import cost_cache
from speccompile.runtime.acceptance import (SpecDecodeStats, Verdict, accept_by_graph_rule, accept_on_host,
                                            chain_parents, committed_rows)
from speccompile.runtime.adaptive import AdaptiveDrafting
from speccompile.runtime.context_cache import ContextCache
from speccompile.runtime.calibration import CALIBRATION_PROMPT
from speccompile.runtime.cost_model import CostModel
from speccompile.runtime.estimates import Plan
from speccompile.runtime.drafters.base import Drafter, Proposal
from speccompile.runtime.drafters.lookup import LookupDrafter, LookupReach, join_lookup
from speccompile.runtime.logprobs import Logprobs, full_rows
from speccompile.runtime.noise import GumbelNoise, coupling, sampled_by_noise
from speccompile.runtime.sampling import PositionDraws, SamplingParams

PREFILL_CHUNK = MAX_STEP_TOKENS

# a plain step is timed into the cost model once in this many: a pass's update costs a few hundredths of a plain
# step's host time, and the one-row price needs few of them to follow the machine
PLAIN_TIMED_EVERY = 4
# a joined tree's lookup continuations reach at most this many times L deep (drafters/lookup.py LookupReach): a
# wide pass costs a few narrow ones, so a repeating answer may commit that many more tokens for it
LOOKUP_REACH_LIMIT = 4


class Planned(NamedTuple):
    """Adaptive drafting's plan for one pass, before its drafts are made (DecodeLoop.plan_adaptive)."""
    plan: Plan
    match: tuple | None  # prompt lookup's match
    cap: int  # the draft nodes the pass may verify
    room: int  # the tokens the request may still take


def prefill_spans(length: int, hit: int, scored_rows: int = 0) -> list[tuple[int, int]]:
    """The prompt's chunks after the `hit` tokens restored, as (start, stop). scored_rows (prompt logprobs: the
    rows a pass may return): chunks of at most that many before the last token, which runs alone."""
    if not scored_rows:
        return [(s, min(s + PREFILL_CHUNK, length)) for s in range(hit, length, PREFILL_CHUNK)]
    size = min(PREFILL_CHUNK, scored_rows)
    return [(s, min(s + size, length - 1)) for s in range(hit, length - 1, size)] + [(length - 1, length)]


class DecodeLoop:
    """The passes of speculative decoding over a target engine, its drafters and the context cache."""
    target: object  # the target's Engine
    drafters: dict[str, Drafter]
    lookup: LookupDrafter  # the prompt lookup that joins other drafters' trees
    context_cache: ContextCache | None
    trees_exact: bool  # the target verifies trees exactly (else one path a pass: graphs.trees_exact)
    noise_ok: bool  # temperature sampling by noisy argmaxes (runtime/noise.py)
    max_seq_len: int  # the compiled context
    bundle_dir: str
    threads: int | None
    _pending: np.ndarray  # a plain decode step's one token
    _cost: CostModel | None  # the cost model, measured or read on first use
    _plain_steps = 0  # plain steps run (PLAIN_TIMED_EVERY)

    def steps(self, prompt: np.ndarray, max_new_tokens: int, drafter: Drafter | None, k: int,
              params: SamplingParams, stats: SpecDecodeStats, tree: TreeSpec | None = None) -> Iterator[list[int]]:
        """Yield the tokens committed by each pass: the prefill's first token, then each verify pass's."""
        rng, draws = np.random.default_rng(params.seed), PositionDraws(params.seed)
        params, noise = sampled_by_noise(params, self.noise_ok, self.target.vocab_size)  # then greedy + noise
        adapt = (self.adaptive_for(drafter, tree, full_rows(params, stats.logprobs), noise)
                 if tree is not None and tree.adaptive else None)
        stats.adapt = adapt
        if drafter:
            drafter.couple(coupling(noise))
        token = self._prefill(prompt, drafter, params, draws, stats, noise)
        context = np.concatenate([np.asarray(prompt, np.int64), np.zeros(max_new_tokens, np.int64)])
        n, generated = len(prompt), 1
        reach = None if adapt else LookupReach.joining(tree, LOOKUP_REACH_LIMIT)
        yield [token]
        while generated < max_new_tokens:
            context[n] = token  # committed, but not yet in the target's cache
            n += 1
            room = min(max_new_tokens - generated - 1, self.max_seq_len - n)  # draft tokens that could be used
            prop = (self.propose_adaptive(context[:n], drafter, adapt, room, params, rng) if adapt else
                    self.propose(context[:n], drafter, k, tree, room, reach, params, rng))
            (path, token), in_graph = self.verify(token, prop, n, params, rng, noise, draws, stats.logprobs)
            self.commit(n, prop.parents, path, drafter)
            accepted = prop.tokens[path]
            context[n:n + len(path)] = accepted
            n += len(path)
            new = [*accepted.tolist(), token]
            generated += len(new)
            if reach:
                reach.update(len(path), prop.depth)
            if adapt:
                adapt.update(path)
            stats.record(len(prop.tokens), len(path), prop.depth, in_graph)
            yield new

    def _prefill(self, prompt: np.ndarray, drafter: Drafter | None, params: SamplingParams, draws: PositionDraws,
                 stats: SpecDecodeStats, noise: GumbelNoise | None = None) -> int:
        """Run the prompt into the target's cache (and the drafter's features), after the longest prefix the
        context cache gives back; returns the first new token (with noise: the noisy argmax, a draw)."""
        if drafter:
            drafter.reset()
        cache, scored = self.target.cache, stats.prompt_logprobs
        # prompt logprobs need every prompt row's logits: nothing restored, and the prompt but its last token run
        # with every row through the head, then that token alone, as any chunk's last (so the first new token is
        # the one a request without them gets)
        hit = self.context_cache.restore(prompt, cache, drafter) if self.context_cache and not scored else 0
        cache.truncate(hit)
        stats.prompt_cache_hit_tokens, stats.prompt_cache_miss_tokens = hit, len(prompt) - hit
        for start, stop in prefill_spans(len(prompt), hit, self.target.max_rows if scored else 0):
            chunk = prompt[start:stop]
            last = noise.rows([len(prompt)]) if noise and stop == len(prompt) else None
            every = np.arange(len(chunk)) if scored and stop < len(prompt) else None  # every row's logits
            logits, argmax = self.target.forward(chunk, rows=every, noise=last,
                                                 full_logits=every is not None or full_rows(params, stats.logprobs))
            if every is not None:  # row j gives the log-probability of the prompt token after it
                scored.add(logits, every, prompt[start + 1:stop + 1])
            if drafter and drafter.wants_hidden:
                drafter.observe(start, drafter.features(self.target, slice(0, len(chunk))))
            cache.truncate(start + len(chunk))
        if self.context_cache:
            self.context_cache.save(prompt, len(prompt), cache, drafter)
        token = int(argmax[0]) if params.greedy else draws.token(logits[0], params, len(prompt))
        if stats.logprobs:
            stats.logprobs.add_pass(logits, [], [], token)
        return token

    def propose(self, context, drafter, k, tree, room, reach, params, rng) -> Proposal:
        """The drafter's chain (at most k tokens) or tree, within `room` tokens; joined by lookup if asked."""
        if not drafter or room <= 0:
            return Proposal.empty()
        if tree is None:
            prop = drafter.propose(context, min(k, room), params, rng)
            return Proposal(prop.tokens[:min(k, room)], prop.q)
        prop = drafter.propose_tree(context, tree.limited(room, self.target.max_rows - 1), params, rng)
        if reach and prop.q is None:
            free = max(0, min(room, self.target.max_rows - 1) - len(prop.tokens))
            prop = join_lookup(prop, context, self.lookup, min(reach.reach, free), min(room, reach.reach))
        return prop if self.trees_exact else prop.first_path()

    def adaptive_for(self, drafter: Drafter | None, tree: TreeSpec, full_logits: bool,
                     noise: GumbelNoise | None = None) -> AdaptiveDrafting | None:
        """The per-request state of adaptive drafting (runtime/adaptive.py), priced by this machine's cost model:
        a request whose passes read the float32 rows (full_logits: logprobs.full_rows) as sampled passes are, one
        sampled by `noise` by the model's noise prices (CostModel.for_noise)."""
        if drafter is None:
            return None
        is_lookup = isinstance(drafter, LookupDrafter)
        if is_lookup and not tree.lookup:  # prompt lookup drafting alone: its nodes are the whole tree
            tree = dataclasses.replace(tree, lookup=ADAPTIVE_LOOKUP)
        cost = self._noise_cost(self._measured_cost(), noise)
        return AdaptiveDrafting(cost, drafter.name, not is_lookup, tree, not full_logits, self.target.max_rows,
                                chains_only=not self.trees_exact)

    def propose_adaptive(self, context, drafter: Drafter, adapt: AdaptiveDrafting, room: int, params,
                         rng, match: tuple | None = None, lookup_only: bool = False) -> Proposal:
        """The drafter's dynamic tree as deep as the plan says (or none), joined by prompt lookup, cut to the nodes
        worth verifying (maybe none: a plain step). match: prompt lookup's here, if the caller has it;
        lookup_only: no drafter pass, prompt lookup's nodes alone (a shared pass's rows)."""
        planned = self.plan_adaptive(context, drafter, adapt, room, match, lookup_only)
        if isinstance(planned, Proposal):
            return planned
        return self.draft_planned(context, drafter, adapt, planned, params, rng)

    def plan_adaptive(self, context, drafter: Drafter, adapt: AdaptiveDrafting, room: int, match: tuple | None = None,
                      lookup_only: bool = False) -> Proposal | Planned:
        """propose_adaptive's plan, before any drafter pass: a Proposal where it drafts nothing (a plain step)."""
        cap = min(room, self.target.max_rows - 1)
        if cap <= 0:
            return adapt.skip()
        match = adapt.matches(self.lookup_of(drafter), context) if match is None and adapt.reach else match
        plan = (adapt.lookup_plan(cap) if lookup_only else
                adapt.plan(len(context), match[1] if match else 0, drafter.rows_behind(len(context))))
        match_len = match[1] if match else 0
        nodes = min(plan.lookup_nodes, cap)
        if not adapt.may_verify(plan, match_len, len(context), nodes):  # a plain step: no tree to build and weigh
            return adapt.plain(plan, match_len, len(context))
        return Planned(plan, match, cap, room)

    def draft_planned(self, context, drafter: Drafter, adapt: AdaptiveDrafting, planned: Planned, params,
                      rng) -> Proposal:
        """A plan's drafts: the drafter's tree (plan.head_depth > 0), prompt lookup's nodes, cut to those worth it."""
        plan, match, cap, room = planned
        prop = Proposal.empty()
        if plan.head_depth:
            prop = adapt.draft(drafter, context, plan, cap, params, rng)
        head, scores = len(prop.tokens), prop.scores
        if plan.lookup_nodes:
            prop = join_lookup(prop, context, self.lookup_of(drafter), min(plan.lookup_nodes, max(0, cap - head)),
                               min(room, plan.lookup_nodes), match)
        return adapt.choose(prop, head, scores, plan, len(context))

    def lookup_of(self, drafter: Drafter | None) -> LookupDrafter:
        """The prompt lookup that joins `drafter`'s drafts (itself, if it is one)."""
        return drafter if isinstance(drafter, LookupDrafter) else self.lookup

    def _measured_cost(self, recalibrate: bool = False) -> CostModel:  # for callers holding the engines already
        if self._cost is None or recalibrate:
            self._cost = cost_cache.cached_or_calibrated(
                self.bundle_dir, self.target, self.drafters, self.threads, self.lookup, recalibrate,
                self.tokenizer.encode_chat(CALIBRATION_PROMPT))
        return self._cost

    def verify(self, token: int, prop: Proposal, n: int, params: SamplingParams, rng,
               noise: GumbelNoise | None = None, draws: PositionDraws | None = None,
               logprobs: Logprobs | None = None) -> tuple[Verdict, bool | None]:
        """One target pass over the pending token and the draft: (the verdict, whether acceptance ran in the
        graph; None for a plain decode step, without drafts); the committed tokens' entries added to `logprobs`.
        Timed into the cost model once adaptive drafting has loaded it, so that its prices follow the passes as
        they run now (a plain step once in PLAIN_TIMED_EVERY)."""
        t0 = time.perf_counter()
        out = self._target_pass(token, prop, n, params, rng, noise, draws, logprobs)
        if self._cost is not None and (len(prop.tokens) or self._timed_plain_step()):
            greedy_pass = not full_rows(params, logprobs)  # filed as what it ran: the exact greedy head or not
            cost = self._noise_cost(self._cost, noise)  # noise rows cost time of their own
            cost.observe(1 + len(prop.tokens), n - 1, greedy_pass, (time.perf_counter() - t0) * 1e3)
        return out

    @staticmethod
    def _noise_cost(cost: CostModel, noise: GumbelNoise | None) -> CostModel:
        return cost if noise is None else cost.for_noise(noise.typical is not None)

    def _timed_plain_step(self) -> bool:
        self._plain_steps += 1
        return self._plain_steps % PLAIN_TIMED_EVERY == 0

    def _target_pass(self, token: int, prop: Proposal, n: int, params: SamplingParams, rng, noise, draws,
                     logprobs: Logprobs | None):
        full = full_rows(params, logprobs)
        if not len(prop.tokens):  # nothing to verify: a plain decode step (the verify ops would only cost time)
            self._pending[0] = token
            logits, argmax = self.target.forward(self._pending, full_logits=full,
                                                 noise=noise.rows([n]) if noise else None)
            verdict = Verdict([], int(argmax[0]) if params.greedy else draws.token(logits[0], params, n))
            if logprobs:
                logprobs.add_pass(logits, verdict.path, prop.tokens, verdict.token)
            return verdict, None
        block = np.concatenate([[token], prop.tokens]).astype(np.int64)
        if prop.parents is None:  # a chain
            block_parents, positions = None, None
        else:
            block_parents = np.concatenate([[-1], prop.parents + 1])  # tree roots hang off the pending token
            positions = n - 1 + depths(block_parents)
        drawn = noise.rows(n + (np.arange(len(block)) if positions is None else positions - n + 1)) if noise else None
        typical = noise.typical if noise is not None else None  # lossy, asked for: its rule reads the rows
        by_graph = self.target.verifies_sampled and not params.greedy and (
            not params.filtered_on_host and prop.q is None and not params.typical)
        if not logprobs and not typical and (self.target.verifies and params.greedy or by_graph):
            # the verify graph accepts: O(nodes) numbers come back, not the [nodes, V] logits. The host path
            # remains for logprobs, top-p and min-p, typical acceptance, for chains drawn from draft distributions q (see
            # verify.emit_verify) and for bundles built before the verify extension.
            verdict = self.target.verify(block, positions, chain_parents(len(block)) if block_parents is None
                                         else block_parents, params.temperature, params.top_k,
                                         None if params.greedy else rng.random((len(block), 2)), drawn)
            return Verdict(*verdict), True
        logits, argmax = self.target.forward(block, positions, block_parents, rows=np.arange(len(block)),
                                             full_logits=full, noise=drawn)
        verdict = (typical.verdict(prop.tokens, prop.parents, logits, argmax) if typical else
                   accept_by_graph_rule(prop, logits, params, rng) if by_graph else
                   accept_on_host(prop, logits, argmax, params, rng, draws, n))  # by_graph: the graph's draws
        if logprobs:
            logprobs.add_pass(logits, verdict.path, prop.tokens, verdict.token)
        return verdict, False

    def commit(self, n: int, parents: np.ndarray | None, path: list[int], drafter: Drafter | None) -> None:
        """Keep the accepted nodes' K/V after the committed tokens; the rejected slots are simply forgotten."""
        cache = self.target.cache
        if parents is not None:
            cache.compact(n + np.array(path, np.int64), n)  # node i sits at slot n + i
        cache.truncate(n + len(path))
        if drafter and drafter.wants_hidden:  # the pending token and the accepted nodes, now committed
            drafter.observe(n - 1, drafter.features(self.target, committed_rows(path)))
