"""A compiled draft model with its own KV cache: a separate small model, or the target's first L layers
(self-speculative early exit, whose graph shares the target's weights in the bundle)."""
from __future__ import annotations

import numpy as np

from speccompile.graphs import MAX_STEP_TOKENS
from speccompile.runtime.context_cache import Arrays, Part, kv_part, read_kv, write_kv
from speccompile.runtime.drafters.base import CaughtUp, Drafter, Proposal, RuntimeContext
from speccompile.runtime.engine import Engine
from speccompile.runtime.sampling import probabilities, sample


def load(entry: dict, ctx: RuntimeContext) -> "DraftModelDrafter":
    """A separate draft model (kind "model"), its graph pre-packed for multi-row passes."""
    return DraftModelDrafter(entry["name"], Engine(ctx.bundle_dir, ctx.model(entry), ctx.threads, ctx.device,
                                                   max_rows=ctx.max_rows, cache=ctx.slot_cache(entry)))


class DraftModelDrafter(Drafter):
    def __init__(self, name: str, engine: Engine):
        self.name, self.engine = name, engine
        self.cached = np.zeros(engine.max_seq_len, np.int64)  # the tokens whose K/V the draft cache holds
        self.caught = CaughtUp()  # the context's last row (logits, token), where a shared pass ran its catch-up

    def reset(self) -> None:
        self.engine.cache.truncate(0)
        self.caught.clear()

    def state_parts(self) -> dict[str, Part]:
        # optional: without it, _sync re-runs the prefix through the draft model on the first proposal
        return {"kv": kv_part(self.engine.cache, required=False)}

    def save_state(self, part, tokens, start, stop) -> Arrays | None:
        cache = self.engine.cache
        if part != "kv" or cache.length < stop or not np.array_equal(self.cached[:stop], tokens[:stop]):
            return None
        return read_kv(cache, start, stop)

    def load_state(self, part, tokens, arrays) -> None:
        self.caught.clear()
        if part == "kv":
            n = len(arrays["key"])
            write_kv(self.engine.cache, arrays)
            self.cached[:n] = tokens[:n]
            self.engine.cache.truncate(n)

    def propose(self, context, k, params, rng) -> Proposal:
        eng, cache = self.engine, self.engine.cache
        k = min(k, eng.max_seq_len - len(context))
        tokens = np.zeros(k, np.int64)
        q = None if params.greedy else np.zeros((k, eng.vocab_size))
        if k <= 0:
            return Proposal(tokens, q)
        logits, token = self._catch_up(context)
        for i in range(k):
            if params.greedy:
                tokens[i] = token if self.noise is None else int(np.argmax(self.ranked(logits, len(context) + i)))
            else:
                q[i] = probabilities(logits, params)
                tokens[i] = sample(q[i], rng)
            if i + 1 < k:  # the draft fed back
                out, argmax = eng.forward(tokens[i:i + 1])
                self.cached[cache.length] = tokens[i]
                cache.truncate(cache.length + 1)
                logits, token = out[0], int(argmax[0])
        return Proposal(tokens, q)

    def propose_tree(self, context, tree, params, rng) -> Proposal:
        eng, cache = self.engine, self.engine.cache
        n = len(context)
        logits, _ = self._catch_up(context)
        t = _TreeDraft(eng, n, n - 1, logits, ranked=self.ranks)
        keep = grow_tree(t, tree, min(tree.size, eng.max_seq_len - n, eng.max_rows))
        cache.truncate(n)  # the tree's draft K/V are dropped; accepted tokens are re-run next time (cheap rows)
        return t.proposal(keep)

    def _catch_up(self, context) -> tuple[np.ndarray, int]:
        """The context into the draft cache: the logits and greedy token after its last token."""
        row = self.caught.take(self._state(context))
        if row is not None:
            return row
        self._sync(context)
        cache, feed = self.engine.cache, context[self.engine.cache.length:]
        logits, argmax = self.engine.forward(feed)
        self.cached[cache.length:len(context)] = feed
        cache.truncate(len(context))
        return logits[0], int(argmax[0])

    def catch_up_step(self, context) -> tuple | None:
        if self.caught.holds(self._state(context)):
            return None
        self._sync(context)
        start = self.engine.cache.length
        return start, context[start:], None, None

    def caught_up(self, context, logits, token, hidden) -> None:
        start = self.engine.cache.length
        self.cached[start:len(context)] = context[start:]
        self.engine.cache.truncate(len(context))
        self.caught.put(self._state(context), logits, token)

    def _state(self, context) -> tuple:
        """What a caught-up row is valid for: the tokens in the cache and the last one (taken by the very next
        drafting, so no other context of that length comes between)."""
        return len(context), self.engine.cache.length, int(context[-1])

    def rows_behind(self, context_len: int) -> int:
        return max(1, context_len - min(self.engine.cache.length, context_len - 1))  # at least; more past a rejection

    def _sync(self, context) -> None:
        """Keep the cache's longest prefix that still agrees with the context (roll back the rejected tail) and leave
        at least the context's last token to run, since its logits predict the next token: what is left runs in one
        catch-up pass, so more than a pass takes runs before it, in chunks."""
        cache = self.engine.cache
        n = min(cache.length, len(context))
        diff = np.flatnonzero(self.cached[:n] != context[:n])
        cache.truncate(int(diff[0]) if len(diff) else n)
        if cache.length == len(context):
            cache.truncate(len(context) - 1)
        while len(context) - cache.length > MAX_STEP_TOKENS:
            chunk = context[cache.length:cache.length + MAX_STEP_TOKENS]
            self.engine.forward(chunk)
            self.cached[cache.length:cache.length + len(chunk)] = chunk
            cache.truncate(cache.length + len(chunk))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    """float64 log-probabilities of float32 logits (the normalizer summed in float64; a pass per step over V)."""
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True, dtype=np.float64))


class _TreeDraft:
    """The nodes of one tree proposal, grown by running chosen nodes through the draft model with tree attention.

    Nodes the model has run occupy the draft cache after the context, in the order they were run (the "run
    region"); each new run sees the context and its own ancestors there."""

    def __init__(self, engine: Engine, committed: int, base_position: int, root_logits: np.ndarray,
                 root_hidden: np.ndarray | None = None, token_map: np.ndarray | None = None, ranked=None):
        """committed: cache slots every node sees; a node at depth d sits at position base_position + d.
        root_logits: the draft logits after the context. root_hidden: for an MTP head, the hidden state its
        depth-1 nodes take as input (deeper nodes take their parent's output hidden state). ranked(logits,
        positions, token_map): the drafter's logits as it ranks them (Drafter.ranks: coupled to the request's
        noise), None: as they are."""
        self.eng, self.committed, self.base = engine, committed, base_position
        self.tokens, self.parents, self.scores, self.depth = [], [], [], []
        self.token_map = token_map  # a reduced draft vocabulary's ids -> target ids
        self.ranked = ranked  # None: the logits as they are
        if ranked is not None:
            root_logits = ranked(root_logits, base_position + 1, token_map)
        self.logprobs = {-1: _log_softmax(root_logits)}  # node -> its draft log-probabilities (after it)
        self.hidden = None if root_hidden is None else {-1: root_hidden}  # node -> its output hidden state
        self.slot, self.run_parents = {}, []  # node -> run-region index; parents in the region

    @property
    def free(self) -> int:
        """Cache slots left for the run region."""
        return self.eng.max_seq_len - self.eng.cache.length

    def add(self, parent: int, token: int, logprob: float) -> int:
        self.tokens.append(token)
        self.parents.append(parent)
        self.scores.append((self.scores[parent] if parent >= 0 else 0.0) + logprob)
        self.depth.append(self.depth[parent] + 1 if parent >= 0 else 1)
        return len(self.tokens) - 1

    def children(self, parent: int, ranks: int):
        lp = self.logprobs[parent]
        if ranks == 1:
            top = np.array([np.argmax(lp)])
        else:
            top = np.argpartition(lp, -ranks)[-ranks:] if ranks < len(lp) else np.arange(len(lp))
            top = top[np.argsort(-lp[top], kind="stable")]
        ids = top if self.token_map is None else self.token_map[top]
        return [(int(i), float(lp[t])) for i, t in zip(ids, top)]

    def run(self, nodes: list[int]) -> None:
        nodes = [v for v in nodes if v not in self.slot]
        if not nodes:
            return
        cache = self.eng.cache
        for v in nodes:
            self.slot[v] = len(self.run_parents)
            self.run_parents.append(self.slot[self.parents[v]] if self.parents[v] >= 0 else -1)
        hidden_in = None if self.hidden is None else np.stack([self.hidden[self.parents[v]] for v in nodes])
        logits, _ = self.eng.forward(np.array([self.tokens[v] for v in nodes], np.int64),
                                     positions=self.base + np.array([self.depth[v] for v in nodes]),
                                     parents=np.array(self.run_parents), rows=np.arange(len(nodes)),
                                     committed=self.committed, hidden_in=hidden_in)
        cache.truncate(cache.length + len(nodes))
        if self.ranked is not None:
            logits = self.ranked(logits, self.base + 1 + np.array([self.depth[v] for v in nodes]), self.token_map)
        lps = _log_softmax(logits)
        for i, (v, lp) in enumerate(zip(nodes, lps)):
            self.logprobs[v] = lp
            if self.hidden is not None:
                self.hidden[v] = self.eng.hidden[i].copy()

    def proposal(self, keep: list[int]) -> Proposal:
        """The kept nodes (closed under ancestors), ordered by depth then score, as a Proposal."""
        order = sorted(keep, key=lambda v: (self.depth[v], -self.scores[v]))
        index = {v: i for i, v in enumerate(order)}
        return Proposal(np.array([self.tokens[v] for v in order], np.int64), None,
                        np.array([index[self.parents[v]] if self.parents[v] >= 0 else -1 for v in order], np.int64),
                        np.array([self.scores[v] for v in order], np.float64))


def grow_tree(t: _TreeDraft, tree, size: int) -> list[int]:
    """Grow `t` into the requested shape; returns the nodes to keep (closed under ancestors)."""
    if tree.kind == "dynamic":  # EAGLE-2: expand the most probable frontier nodes, keep the best `size` overall
        b = tree.branching
        frontier = [t.add(-1, tok, lp) for tok, lp in t.children(-1, b)]
        for _ in range(tree.depth - 1):
            # A child scores at most its parent, and the bar (the size-th best score so far) only rises, so a
            # frontier node below the bar has no descendant among the kept nodes: skip it, and stop drafting once
            # none is left. The kept set is the same as without the cut; a weak draft costs fewer draft passes.
            scores = sorted((t.scores[v] for v in range(len(t.tokens))), reverse=True)
            bar = scores[size - 1] if len(scores) >= size else -np.inf
            expand = [v for v in sorted(frontier, key=lambda v: -t.scores[v])[:b] if t.scores[v] >= bar]
            expand = expand[:t.free]  # near the end of the context the run region has fewer slots
            if not expand:
                break
            t.run(expand)
            frontier = [t.add(v, tok, lp) for v in expand for tok, lp in t.children(v, b)]
        # a child's score never exceeds its parent's, so the best `size` nodes are closed under ancestors
        keep = sorted(range(len(t.tokens)), key=lambda v: (-t.scores[v], t.depth[v]))[:size]
    else:  # static (and chain): each path picks its rank among its parent's draft candidates
        node_of = {(): -1}
        paths = tree.paths[:size]
        for d in range(1, tree.depth + 1):
            level = [p for p in paths if len(p) == d and p[:-1] in node_of]
            t.run(sorted({node_of[p[:-1]] for p in level} - {-1})[:t.free])  # one draft pass per depth
            for p in level:
                if node_of[p[:-1]] not in t.logprobs:  # not run: no slot left in the context
                    continue
                cands = t.children(node_of[p[:-1]], p[-1] + 1)
                if len(cands) > p[-1]:
                    node_of[p] = t.add(node_of[p[:-1]], *cands[p[-1]])
        keep = list(range(len(t.tokens)))
    return keep
