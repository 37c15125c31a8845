"""Continuous batching: the requests of many callers share the target's passes.

Callers take turns running rounds (runtime/turns.py: no thread of its own). Requests join and leave between passes;
each holds a sequence slot of the batched KV cache (`KVCache.slot`) with its own drafter, sampling parameters,
random generator, stop conditions, acceptance, roll back and compaction. Each round runs at most one prefill chunk
of each joining request (so a long prompt does not stall the others), then one pass that verifies every decoding
slot's pending token and draft tree (runtime/batch_engine.py; which drafts a shared pass verifies:
runtime/shared_drafts.py); one joining request's chunk, shorter, rides in that pass. Over speccompile's attention
kernel, which runs each slot's real rows alone (BatchEngine.padding_free), every joining request's chunk rides in
it, or, with no slot decoding, the joining requests' chunks share one prefill pass. A request alone in slot 0 runs
the single-sequence graph, exactly as the Generator's own loop does (in-graph acceptance, nothing batched to pay
for).

Every slot's tokens are those it would get alone: greedy, the target's argmax rows are the same whatever else
shares the pass, and so are those of a request sampled by noise (temperature alone, runtime/noise.py: its noise
is a function of its seed and the position); sampled otherwise, a slot draws from its own generator in the order it
would alone (a verify block's uniforms as one [rows, 2] table read by the rule the verify graph applies), so a
seed reproduces a run where the drafts are the same (adaptive drafting's cut follows the measured pass times:
runtime/adaptive.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from speccompile.format.bundle import check_unchanged, file_stamps
from speccompile.runtime.acceptance import (Verdict, accept_by_graph_rule, accept_greedy,
                                            accept_on_host, committed_rows)
from speccompile.runtime.batch_engine import BatchEngine
from speccompile.runtime.drafters.base import Drafter
from speccompile.runtime.drafters.lookup import LookupReach
from speccompile.runtime.kv_cache import KVCache
from speccompile.runtime.logprobs import full_rows
from speccompile.runtime.noise import coupling, sampled_by_noise
from speccompile.runtime.sampling import PositionDraws
from speccompile.runtime.shared_drafts import propose_shared
from speccompile.runtime.shared_catch_up import SharedCatchUp
from speccompile.runtime.slots import DONE, Handle, Slot, prefix_leader, without_cancelled
from speccompile.runtime.text_stream import TextStream
from speccompile.runtime.turns import Turns

# A joining request's prompt chunk in a pass with decoding slots: the one-row slots' attention is laid out as deep
# as the chunk, so a chunk shorter than a prefill pass's own pays (docs/results.md, "a joining prompt inside the
# decode pass").
MIXED_CHUNK = 64


@dataclass
class RoundTally:
    """The scheduler's rounds so far by kind, (slots decoding, whether a prompt chunk ran): for each kind the rounds,
    their seconds and the tokens they committed. `bench --streams` reads it around a serving run: how much of the
    run all its streams decoded together, how fast, and what the prompts and fewer slots took."""
    kinds: dict[tuple[int, bool], list] = field(default_factory=dict)

    def add(self, decoding: int, prompt: bool, seconds: float, tokens: int) -> None:
        row = self.kinds.setdefault((decoding, prompt), [0, 0.0, 0])
        row[0], row[1], row[2] = row[0] + 1, row[1] + seconds, row[2] + tokens

    def snapshot(self) -> dict[tuple[int, bool], tuple[int, float, int]]:
        return {kind: tuple(row) for kind, row in self.kinds.items()}


class Scheduler(Turns):
    def __init__(self, gen, cache: KVCache, batch_entry: dict):
        """gen: the Generator (its target engine is bound to slot 0 of `cache`, its drafters serve slot 0)."""
        super().__init__(gen, [None] * cache.batch)
        self.cache, self.entry = cache, batch_entry
        self.slot_caches = [gen.target.cache] + [cache.slot(b) for b in range(1, cache.batch)]
        self._engine: BatchEngine | None = None
        self.loaded = file_stamps(gen.bundle_dir, gen.manifest["files"])  # what is opened later must match
        self._drafters: dict[tuple[int, str], Drafter] = {}  # slot b > 0's own instance of each drafter
        self.trace: list | None = None  # a list: each pass appends ("prefill", slot) or ("decode", slots), the
        # slot whose prompt chunk rides in the pass last
        self.shared_passes = 0  # decode passes that verified two or more slots at once (or one and a prompt chunk)
        self.mix_prefill = True  # a joining request's chunk may ride in a decode pass (MIXED_CHUNK)
        self.rounds = RoundTally()
        self.emitted = 0  # tokens handed to the requests so far
        self.catch_ups = SharedCatchUp(gen.drafter_context, lambda: check_unchanged(gen.bundle_dir, self.loaded))

    @property
    def engine(self) -> BatchEngine:
        """The batched graph's session, opened the first time two requests share a pass."""
        if self._engine is None:
            g = self.gen
            check_unchanged(g.bundle_dir, self.loaded)
            self._engine = BatchEngine(g.bundle_dir, self.entry, self.cache, g.threads, g.device, g.target.min_rows)
        return self._engine

    def _catch_up(self, slots: list[Slot]) -> None:
        """The slots' drafters' catch-up passes, one per drafter shared by several (runtime/shared_catch_up.py)."""
        self.catch_ups.catch_up(slots, lambda name: {0: self.gen.drafters[name]} | {
            b: d for (b, n), d in self._drafters.items() if n == name})

    # ---- a round -----------------------------------------------------------------------------------------
    def _round(self) -> None:
        """Free cancelled slots, admit waiting requests, run a prefill chunk of each, then one decode pass."""
        start, emitted = time.perf_counter(), self.emitted
        self._free_cancelled()
        self._admit()
        joining = [s for s in filter(None, self.slots) if not s.decoding and not self._waits(s)]
        decoding = [s for s in filter(None, self.slots) if s.decoding and s.n]
        self._passes(joining, decoding)
        self.rounds.add(len(decoding), bool(joining), time.perf_counter() - start, self.emitted - emitted)

    def _passes(self, joining: list[Slot], decoding: list[Slot]) -> None:
        """A round's passes: the joining requests' chunks and the decoding slots' pass."""
        if len(joining) + len(decoding) > 1 and self.mix_prefill and self.engine.padding_free:
            self._round_together(joining, decoding)
            return
        # one joining request's chunk rides in the decode pass, shortened (MIXED_CHUNK); any other joining
        # request's chunk runs in a pass of its own: the attention lays every slot out as deep as the pass's
        # longest step, so two prompts' chunks together would pay for each other's padding rows
        mixed = joining.pop(0) if (decoding and joining and self.mix_prefill and self.engine.packed) else None
        for s in joining:
            self._prefill(s)
        if mixed is not None and self._rows_left() < MIXED_CHUNK:  # after the chunks above, which deepen slots
            self._prefill(mixed)
            mixed = None
        if decoding:
            self._decode(decoding, [mixed] if mixed else [])

    def _round_together(self, joining: list[Slot], decoding: list[Slot]) -> None:
        """A round where no slot pays for another's padding rows: the joining requests' chunks in the decode pass
        (MIXED_CHUNK each), or in one prefill pass of their own (a prefill chunk each) when no slot decodes; apart,
        as _round runs them, where the pass would not fit after the deepest slot's K/V."""
        size = MIXED_CHUNK if decoding else self.gen.prefill_chunk
        if self._rows_left() < size:
            for s in joining:
                self._prefill(s)
            joining = []
        if decoding:
            self._decode(decoding, joining)
        elif len(joining) == 1:
            self._prefill(joining[0])
        elif joining:
            self._prefill_together(joining)

    def _rows_left(self) -> int:
        """Rows a shared pass may lay out: every slot as deep as its longest step, after the slot's K/V."""
        return self.cache.capacity - max([s.cache.length for s in filter(None, self.slots)] + [0])

    def _free_cancelled(self) -> None:
        for s in filter(None, self.slots):
            if s.handle.cancelled:
                self._finish(s)

    def _admit(self) -> None:
        with self.wake:
            self.waiting = without_cancelled(self.waiting)  # a caller gone meanwhile: its request never runs
            while self.waiting and None in self.slots and not self.draining:
                handle = self.waiting.popleft()
                b = self.slots.index(None)
                try:
                    self.slots[b] = self._new_slot(b, handle)
                except Exception as e:  # noqa: BLE001 - this request's own error, not the others' (the slot stays free)
                    handle.queue.put(e)

    def _new_slot(self, b: int, handle: Handle) -> Slot:
        req = handle.request
        drafter = req.drafter
        if drafter is not None and b > 0:
            key = (b, drafter.name)
            if key not in self._drafters:
                check_unchanged(self.gen.bundle_dir, self.loaded)
                self._drafters[key] = self.gen.fork_drafter(drafter.name, b)
            drafter = self._drafters[key]
        if drafter is not None:
            drafter.reset()
        context = np.zeros(len(req.ids) + req.max_new_tokens, np.int64)
        context[:len(req.ids)] = req.ids
        tree = req.tree
        params, noise = sampled_by_noise(req.params, self.gen.noise_ok, self.gen.target.vocab_size)
        if drafter is not None:
            drafter.couple(coupling(noise))
        adapt = (self.gen.adaptive_for(drafter, tree, full_rows(params, req.logprobs), noise)
                 if tree is not None and tree.adaptive else None)
        reach = None if adapt else LookupReach.joining(tree, self.gen.lookup_reach_limit)  # as Generator.steps
        handle.stats.adapt = adapt
        cache = self.slot_caches[b]
        cache.truncate(0)
        slot = Slot(b, handle, cache, drafter, np.random.default_rng(req.params.seed), context, reach, adapt,
                    params=params, noise=noise, draws=PositionDraws(req.params.seed),
                    stops=TextStream(self.gen.tokenizer, req.stop) if req.stop else None)
        self._restore_prefix(slot)
        if self.gen.context_cache:
            slot.leader = prefix_leader(slot, self.slots, self.gen.context_cache.block_tokens)
        return slot

    def _restore_prefix(self, s: Slot) -> None:
        """The longest prefix of s's prompt the context cache holds, restored into its slot (as Generator._prefill
        does for a request run alone): its prefill starts after it."""
        ctx_cache, ids = self.gen.context_cache, s.req.ids
        hit = ctx_cache.restore(ids, s.cache, s.drafter) if ctx_cache else 0
        s.prefilled = hit
        s.cache.truncate(hit)
        stats = s.handle.stats
        stats.prompt_cache_hit_tokens, stats.prompt_cache_miss_tokens = hit, len(ids) - hit

    def _waits(self, s: Slot) -> bool:
        """Whether s still waits for its leader's prompt (slots.prefix_leader); once the leader has run it, or
        left, s restores what the context cache holds of its own prompt and runs the rest."""
        leader = s.leader
        if leader is None:
            return False
        if self.slots[leader.index] is leader and not leader.decoding:
            return True
        s.leader = None
        if s.drafter is not None:
            s.drafter.reset()  # a restore fills a drafter just reset
        self._restore_prefix(s)
        return False

    def _finish(self, s: Slot, error: BaseException | None = None) -> None:
        ctx_cache = self.gen.context_cache
        if ctx_cache and error is None and s.decoding:  # the answer's blocks too: a chat's next turn starts with them
            ctx_cache.save(s.context, min(s.cache.length, s.n), s.cache, s.drafter)
        s.handle.queue.put(error if error is not None else DONE)
        s.cache.truncate(0)
        self.slots[s.index] = None

    def _emit(self, s: Slot, new: list[int]) -> None:
        s.handle.queue.put((time.perf_counter(), new))  # its reader may come much later: the stats time the pass
        self.emitted += len(new)
        if s.complete(new, s.req.end_ids):
            self._finish(s)

    def _idle(self, running: list[Slot]) -> dict[int, int]:
        """The committed lengths of the occupied slots a pass does not run (its throw-away rows go past them)."""
        return {s.index: s.cache.length for s in filter(None, self.slots) if s not in running}

    # ---- prefill -----------------------------------------------------------------------------------------
    def _prefill(self, s: Slot) -> None:
        """One chunk of a joining request's prompt; after its last chunk the request has its first token (as
        Generator._prefill). Slot 0 runs the single-sequence graph, bound to it; the others the batched graph over
        their slot alone."""
        if self.trace is not None:
            self.trace.append(("prefill", (s.index,)))
        step = s.chunk(self.gen.prefill_chunk)
        if s.index == 0:
            logits, argmax = self.gen.target.forward(step.tokens, full_logits=s.full_logits, noise=step.noise)
            self._prefilled(s, len(step.tokens), self.gen.target, logits, argmax, slice(0, len(step.tokens)))
            return
        results = self.engine.run([step], s.full_logits, self._idle([s]))
        self._prefilled(s, len(step.tokens), self.engine, *results[s.index])

    def _prefill_together(self, slots: list[Slot]) -> None:
        """One chunk of each joining request's prompt, all in one pass of the batched graph."""
        if self.trace is not None:
            self.trace.append(("prefill", tuple(s.index for s in slots)))
        self.shared_passes += 1
        steps = [s.chunk(self.gen.prefill_chunk) for s in slots]
        results = self.engine.run(steps, any(s.full_logits for s in slots), self._idle(slots))
        for s, step in zip(slots, steps):
            self._prefilled(s, len(step.tokens), self.engine, *results[s.index])

    def _prefilled(self, s: Slot, count: int, engine, logits, argmax, rows) -> None:
        """Account for a chunk of `count` tokens of s's prompt that `engine` just ran (their hidden states at
        `rows`)."""
        start = s.prefilled
        if s.drafter and s.drafter.wants_hidden:
            s.drafter.observe(start, s.drafter.features(engine, rows))
        s.prefilled = start + count
        s.cache.truncate(s.prefilled)
        if s.decoding:
            if self.gen.context_cache:
                self.gen.context_cache.save(s.req.ids, len(s.req.ids), s.cache, s.drafter)
            params = s.params
            s.token = int(argmax[0]) if params.greedy else s.draws.token(logits[0], params, len(s.req.ids))
            if s.handle.stats.logprobs:
                s.handle.stats.logprobs.add_pass(logits, [], [], s.token)
            s.n = len(s.req.ids)
            self._emit(s, [s.token])

    # ---- decode ------------------------------------------------------------------------------------------
    def _decode(self, slots: list[Slot], mixed: list[Slot]) -> None:
        """One pass over every decoding slot: each one's pending token and its drafts, verified together; and a
        chunk of each joining request's prompt in `mixed`. A sampled slot whose drafts do not fit after the
        deepest slot of that pass verifies them in a pass of its own (_propose)."""
        for s in slots:
            s.context[s.n] = s.token  # committed, but not yet in the target's cache
            s.n += 1
        shared = len(slots) > 1 or mixed or slots[0].index  # the batched graph's pass
        inside = self._rows_left() - 1 if shared else self.gen.max_seq_len  # drafts that keep it inside the cache
        propose_shared(self.gen, slots, inside, self._catch_up)
        if not shared:  # alone: as Generator.steps, its graph
            s = slots[0]
            if self.trace is not None:
                self.trace.append(("decode", (s.index,)))
            (path, token), in_graph = self.gen.verify(s.token, s.prop, s.n, s.params, s.rng, s.noise, s.draws,
                                                      s.handle.stats.logprobs)
            self.gen.commit(s.n, s.prop.parents, path, s.drafter)
            self._accepted(s, Verdict(path, token), in_graph)
            return
        apart = [s for s in slots if len(s.prop.tokens) > inside]  # never a fixed_output one
        if len(apart) < len(slots) or mixed:
            self._verify([s for s in slots if s not in apart], mixed)
        for s in apart:  # alone in its pass, a slot's drafts fit after its own K/V (its room, as alone)
            self._verify([s])

    def _verify(self, slots: list[Slot], mixed: list[Slot] = ()) -> None:
        """One batched pass over the slots' verify blocks (and a prompt chunk of each of `mixed`): each slot's
        verdict."""
        running = slots + list(mixed)
        if self.trace is not None:
            self.trace.append(("decode", tuple(s.index for s in running)))
        self.shared_passes += len(running) > 1
        chunks = [m.chunk(MIXED_CHUNK) for m in mixed]
        steps = [s.block() for s in slots] + chunks
        results = self.engine.run(steps, any(s.full_logits for s in running), self._idle(running))
        for m, chunk in zip(mixed, chunks):
            self._prefilled(m, len(chunk.tokens), self.engine, *results[m.index])
        for s in slots:
            logits, argmax, rows = results[s.index]
            verdict, in_graph = self._accept(s, logits, argmax)
            if s.handle.stats.logprobs:
                s.handle.stats.logprobs.add_pass(logits, verdict.path, s.prop.tokens, verdict.token)
            self._commit(s, verdict.path, rows)
            self._accepted(s, verdict, in_graph, alone=len(running) == 1)

    def _accept(self, s: Slot, logits, argmax) -> tuple[Verdict, bool | None]:
        """The slot's verdict from its rows, drawing from its generator as the single-sequence path would."""
        prop, params = s.prop, s.params
        if not len(prop.tokens):
            token = int(argmax[0]) if params.greedy else s.draws.token(logits[0], params, s.n)
            return Verdict([], token), None
        if s.noise is not None and s.noise.typical:  # lossy, asked for: the rows' estimates and draws
            return s.noise.typical.verdict(prop.tokens, prop.parents, logits, argmax), False
        parents = np.arange(len(prop.tokens)) - 1 if prop.parents is None else prop.parents
        if params.greedy:  # the argmax rows come from the graph; the host walks the tree
            return accept_greedy(prop.tokens, parents, argmax), False
        if self.gen.target.verifies_sampled and not params.filtered_on_host and prop.q is None:
            return accept_by_graph_rule(prop, logits, params, s.rng), False  # the verify graph's rule and draws
        return accept_on_host(prop, logits, argmax, params, s.rng, s.draws, s.n), False

    def _commit(self, s: Slot, path: list[int], rows: np.ndarray) -> None:
        """Keep the accepted nodes' K/V after the committed tokens in the slot's cache (Generator.commit)."""
        n = s.n
        if s.prop.parents is not None:
            s.cache.compact(n + np.array(path, np.int64), n)
        s.cache.truncate(n + len(path))
        if s.drafter and s.drafter.wants_hidden:
            kept = rows[committed_rows(path)]
            s.drafter.observe(n - 1, s.drafter.features(self.engine, kept))

    def _accepted(self, s: Slot, verdict: Verdict, in_graph: bool | None, alone: bool = True) -> None:
        path, prop = verdict.path, s.prop
        accepted = prop.tokens[path]
        s.context[s.n:s.n + len(path)] = accepted
        s.n += len(path)
        s.token = verdict.token
        if s.reach:
            s.reach.update(len(path), prop.depth)
        if s.adapt:
            s.adapt.update(path, alone)
        s.handle.stats.record(len(prop.tokens), len(path), prop.depth, in_graph)
        self._emit(s, [*accepted.tolist(), verdict.token])
