"""Prompt lookup: propose the tokens that followed earlier occurrences of the context's last n-gram.

No graph and no weights; strong wherever the answer repeats the prompt (summaries, code edits, RAG). A chain
follows the most recent match; a tree merges the continuations of several matches into a trie.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from speccompile.format.trees import TreeSpec
from speccompile.runtime.drafters.base import Drafter, Proposal, RuntimeContext


def load(entry: dict, ctx: RuntimeContext) -> "LookupDrafter":
    return LookupDrafter(entry["name"], entry.get("max_ngram", 3))


class LookupDrafter(Drafter):
    def __init__(self, name: str = "lookup", max_ngram: int = 3, min_ngram: int = 1, max_matches: int = 8):
        self.name, self.max_ngram, self.min_ngram, self.max_matches = name, max_ngram, min_ngram, max_matches

    def matches(self, context: np.ndarray) -> tuple[np.ndarray, int]:
        """Start indices of the continuations after earlier occurrences of the longest matching suffix n-gram,
        most recent first, and that n (0 when nothing matches). A longer match predicts its continuation far
        better, so adaptive drafting keeps its acceptance estimates per n."""
        n_ctx = len(context)
        for n in range(min(self.max_ngram, n_ctx - 1), self.min_ngram - 1, -1):
            suffix = context[n_ctx - n:]
            hits = np.ones(n_ctx - n, bool)  # candidate starts i < n_ctx - n
            for j in range(n):
                hits &= context[j:n_ctx - n + j] == suffix[j]
            starts = np.flatnonzero(hits)
            if len(starts):
                return starts[::-1] + n, n
        return np.zeros(0, np.int64), 0

    def propose(self, context, k, params, rng) -> Proposal:
        starts, _ = self.matches(context)
        if not len(starts):
            return Proposal.empty()
        return Proposal(np.array(context[starts[0]:starts[0] + k], np.int64))

    def propose_tree(self, context, tree: TreeSpec, params, rng) -> Proposal:
        return join_lookup(Proposal.empty(), context, self, tree.size, tree.depth)


class MatchIndex:
    """LookupDrafter.matches over one request's growing context, kept up to date a pass at a time: the n-grams
    ending at each position, by n, with where they ended. A pass then looks up three n-grams instead of scanning
    the whole context (the adaptive loop asks on every pass, plain steps included). The runtime only appends to a
    request's context; one that is shorter than what was indexed, or holds another token where the indexed one
    ended, is indexed again from its start."""

    def __init__(self, lookup: LookupDrafter):
        self.lookup = lookup
        self._clear()

    def _clear(self) -> None:
        self._ends: list[dict[tuple, list[int]]] = [{} for _ in range(self.lookup.max_ngram + 1)]
        self._tokens: list[int] = []  # the tokens indexed so far

    def matches(self, context: np.ndarray) -> tuple[np.ndarray, int]:
        self._extend(context)
        n_ctx, lookup = len(context), self.lookup
        for n in range(min(lookup.max_ngram, n_ctx - 1), lookup.min_ngram - 1, -1):
            ends = self._ends[n].get(tuple(self._tokens[n_ctx - n:]), ())
            earlier = ends[:-1] if ends and ends[-1] == n_ctx else ends  # the suffix itself is no match
            if earlier:
                return np.array(earlier[::-1], np.int64), n
        return np.zeros(0, np.int64), 0

    def _extend(self, context: np.ndarray) -> None:
        done = len(self._tokens)
        if len(context) < done or (done and int(context[done - 1]) != self._tokens[-1]):
            self._clear()
            done = 0
        self._tokens += context[done:].tolist()
        tokens = self._tokens
        for end in range(done + 1, len(tokens) + 1):
            for n in range(1, min(self.lookup.max_ngram, end) + 1):
                self._ends[n].setdefault(tuple(tokens[end - n:end]), []).append(end)


def join_lookup(prop: Proposal, context: np.ndarray, lookup: LookupDrafter, nodes: int, depth: int,
                match: tuple[np.ndarray, int] | None = None) -> Proposal:
    """`prop`'s tree (a chain when parents is None) joined by up to `nodes` nodes of prompt lookup's continuations,
    at most `depth` deep, merged as a trie: a continuation that agrees with the drafter adds only where it goes
    further. Every node stays deterministic, so greedy and sampled tree acceptance both hold (q must be None).
    The result's match_len is the n-gram the continuations matched on; its lookup_agrees marks the drafter's
    nodes that the most recent match's continuation runs through (two drafters agreeing: taken far more often).
    match: lookup.matches(context), when the caller has it already."""
    tokens = [int(t) for t in prop.tokens]
    parents = list(range(-1, len(tokens) - 1)) if prop.parents is None else [int(p) for p in prop.parents]
    children = {(p, t): i for i, (p, t) in enumerate(zip(parents, tokens))}
    drafted, added = len(tokens), 0
    agrees = np.zeros(drafted + nodes, bool)
    starts, match_len = lookup.matches(context) if match is None else match
    for m, begin in enumerate(starts[:lookup.max_matches]):
        parent = -1
        for t in context[begin:begin + depth]:
            key = (parent, int(t))
            if key not in children:
                if added >= nodes:
                    break
                children[key] = len(tokens)
                tokens.append(int(t))
                parents.append(parent)
                added += 1
            parent = children[key]
            agrees[parent] |= m == 0 and parent < drafted
        if added >= nodes:
            break
    return Proposal(np.array(tokens, np.int64), None, np.array(parents, np.int64), match_len=match_len,
                    lookup_agrees=agrees[:len(tokens)])


@dataclasses.dataclass
class LookupReach:
    """How deep a joined tree's lookup continuations go (and how many nodes they may add): `base` (the tree's L)
    to start, doubled after each pass that accepted a whole deepest branch -- the text is repeating itself, as
    small models' greedy output often does over long answers, and a deeper continuation will likely be taken too
    -- up to `limit`; back to `base` after a pass that did not. Drafts stay deterministic, so this changes how
    many tokens a pass may commit, never which."""
    base: int
    limit: int
    reach: int = 0

    def __post_init__(self):
        self.reach = self.base

    @classmethod
    def joining(cls, tree, limit: int) -> LookupReach | None:
        """The reach of `tree`'s lookup continuations, up to `limit` times its L (None: no tree, or none joined)."""
        return cls(tree.lookup, limit * tree.lookup) if tree is not None and tree.lookup else None

    def update(self, accepted: int, deepest: int) -> None:
        self.reach = min(self.limit, 2 * self.reach) if deepest and accepted >= deepest else self.base
