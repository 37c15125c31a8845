"""Acceptance: which drafted tokens the target keeps, the token it adds after them, and the statistics of both.

A draft is a tree of nodes in topological order, each with a parent index (-1: child of the pending token, the
last committed one); a chain is the tree whose parents are i - 1. Row 0 of the target's outputs is the pending
token, row 1 + i is node i. One verify pass commits:
  - the accepted nodes: a path from a root down, each node taken by the rule below;
  - then one token of the target's own: the *recovered* token when candidates after the path's end were tried
    and all rejected (greedy: the target's choice; sampled: a draw from p with the rejected tokens removed), or
    the *bonus* token when the path ends at a node without children (a draw from p, or the argmax).
Greedy: a node is accepted when its token is the target's argmax at its parent's row.
Sampled, deterministic candidates (trees, prompt lookup; SpecInfer's recursive rejection): the children of the
path's end are tried in order, child x accepted with probability p'(x), p' being p with the already rejected
siblings removed and renormalised. Sampled, a chain drawn from draft distributions q (Leviathan et al. / Chen et
al.): accept x with probability min(1, p(x)/q(x)); on the first rejection draw from norm(max(0, p - q)).
Either way the committed tokens have exactly the target's distribution p (after temperature / top-k / min-p / top-p).
Sampled with uniforms per position (sampling.PositionDraws; the runtime's rule for deterministic candidates on the
host): the target's own draw at each row, a node accepted where its token equals the draw at its parent's row
(accept_drawn): the same acceptance as recursive rejection, and plain sampling's tokens whatever the drafts.

The sampled rules read their uniforms through `Uniform` (row, use): use 0 is a node's test at its own row, use 1
the draw after the path at its end's row. The runtime passes `sequential(rng)`; `from_table(u)` reads a [rows, 2]
table as the in-graph rule (speccompile.compile.graph.verify) does, so the two can be compared draw for draw.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import numpy as np

from speccompile.format.trees import depths
from speccompile.runtime.sampling import PositionDraws, draw, probabilities

Uniform = Callable[[int, int], float]
TEST, DRAW = 0, 1  # the two uses of a row's uniforms


class Verdict(NamedTuple):
    path: list[int]  # the accepted nodes, root first (a chain's: 0 .. n-1)
    token: int  # the recovered or bonus token after them


def sequential(rng: np.random.Generator) -> Uniform:
    """Uniforms drawn from rng in the order the rule asks for them."""
    return lambda row, use: rng.random()


def from_table(uniforms: np.ndarray) -> Uniform:
    """Uniforms read from a [rows, 2] table, as the in-graph rule reads its `uniforms` input."""
    return lambda row, use: float(uniforms[row, use])


def chain_parents(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64) - 1


def committed_rows(path: list[int]):
    """The rows of a verify block that were committed: the pending token's and the accepted nodes' (a plain step's
    one row as a slice, which reads its features without a gathered copy)."""
    return slice(0, 1) if not path else np.concatenate([[0], np.add(path, 1)]).astype(int)


def accept_greedy(tokens: np.ndarray, parents: np.ndarray, target_argmax: np.ndarray) -> Verdict:
    """The longest root-to-node path whose tokens are the target's greedy choices; target_argmax [1 + n]."""
    return _follow(tokens, parents, lambda row: int(target_argmax[row]))


def _follow(tokens: np.ndarray, parents: np.ndarray, choice: Callable[[int], int]) -> Verdict:
    """The path that takes, from each row on it (row 0: the pending token; row 1 + i: node i), the child whose
    token is the target's choice there; then that row's choice."""
    path, row = [], 0
    while True:
        want = choice(row)
        hit = np.flatnonzero((parents == (path[-1] if path else -1)) & (tokens == want))
        if not len(hit):
            return Verdict(path, want)
        path.append(int(hit[0]))
        row = path[-1] + 1


def accept_sampled(tokens: np.ndarray, parents: np.ndarray, p: np.ndarray, uniform: Uniform) -> Verdict:
    """Recursive rejection over deterministic candidates; p [1 + n, V] the target's distributions per row."""
    path, row = [], 0
    while True:
        dist = p[row].copy()
        accepted = None
        for child in np.flatnonzero(parents == (path[-1] if path else -1)):
            x = tokens[child]
            if uniform(child + 1, TEST) < dist[x]:
                accepted = int(child)
                break
            dist[x] = 0.0  # rejected: p' without x
            total = dist.sum()
            if total <= 0:
                break
            dist /= total
        if accepted is None:
            return Verdict(path, draw(dist if dist.sum() > 0 else p[row], uniform(row, DRAW)))
        path.append(accepted)
        row = accepted + 1


def accept_drawn(tokens: np.ndarray, parents: np.ndarray, p: np.ndarray, uniform_at: Callable[[int], float]
                 ) -> Verdict:
    """Deterministic candidates against the target's own draws: at each row the token at quantile
    uniform_at(row) of p [1 + n, V]; a node is accepted when its token is the draw at its parent's row. A
    candidate x is taken with probability p(x), and siblings x, y with p(x) + p(y), as by recursive rejection,
    and every committed token is the target's draw: given uniforms per position, what plain sampling commits."""
    return _follow(tokens, parents, lambda row: draw(p[row], uniform_at(row)))


def accept_chain_q(draft: np.ndarray, q: np.ndarray, p: np.ndarray, uniform: Uniform) -> Verdict:
    """A chain drawn from draft distributions q [n, V] (a prefix vocabulary is padded by the caller);
    p [n + 1, V]."""
    for i, x in enumerate(draft):
        if uniform(i + 1, TEST) * q[i, x] < p[i, x]:  # accept with probability min(1, p/q)
            continue
        residual = np.maximum(p[i] - q[i], 0.0)
        total = residual.sum()
        return Verdict(list(range(i)), draw(residual / total if total > 0 else p[i], uniform(i, DRAW)))
    return Verdict(list(range(len(draft))), draw(p[len(draft)], uniform(len(draft), DRAW)))


def typical_threshold(p: np.ndarray, epsilon: float, alpha: float) -> float:
    """min(epsilon, alpha * exp(-H(p))): a token the target gives more than this is "typical" (Medusa)."""
    nz = p[p > 0]
    return min(epsilon, alpha * float(np.exp(np.sum(nz * np.log(nz)))))


def accept_typical(tokens: np.ndarray, parents: np.ndarray, p: np.ndarray, epsilon: float, alpha: float,
                   uniform: Uniform) -> Verdict:
    """Typical acceptance (lossy, opt-in): the deepest root-to-node path (the first such, in node order) whose
    every token the target gives more than typical_threshold at its parent's row; then a draw from p at the
    path's end. p [1 + n, V] the target's distributions per row."""
    path = typical_path(tokens, parents, lambda row: (p[row], typical_threshold(p[row], epsilon, alpha)),
                        lambda judged, token: judged[0][token] > judged[1])
    row = path[-1] + 1 if path else 0
    return Verdict(path, draw(p[row], uniform(row, DRAW)))


def typical_path(tokens: np.ndarray, parents: np.ndarray | None, judge_row: Callable[[int], object],
                 typical: Callable[[object, int], bool]) -> list[int]:
    """The deepest root-to-node path (the first such, in node order) whose every node's token is typical at its
    parent's row: typical(judge_row(row), token), judge_row run once per row it is asked for. parents None: a
    chain."""
    parents = chain_parents(len(tokens)) if parents is None else parents
    judged: dict[int, object] = {}
    ok = np.zeros(len(tokens), bool)
    depth = np.zeros(len(tokens), np.int64)
    for i, parent in enumerate(parents):
        if parent >= 0 and not ok[parent]:
            continue
        row = parent + 1
        if row not in judged:
            judged[row] = judge_row(row)
        ok[i] = typical(judged[row], int(tokens[i]))
        depth[i] = depth[parent] + 1 if parent >= 0 else 1
    path = []
    if ok.any():
        end = int(np.argmax(np.where(ok, depth, 0)))  # argmax: the first node of the greatest depth
        while end >= 0:
            path.append(end)
            end = int(parents[end])
        path.reverse()
    return path


OUTSIDE = np.float32(-1e30)  # a scaled logit outside the top k (TypicalRule.terms)


class RowTerms(NamedTuple):
    """One row's terms of typical acceptance, in the row's scaled logits x = logits / T - shift (float32): a token
    is typical where x >= floor (its top-k; -inf without) and x > bar (log Z plus the log of typical_threshold)."""
    shift: np.float32
    floor: float
    bar: float


class TypicalRule:
    """Typical acceptance for a request sampled by noise (runtime/noise.py): its sampling settings and threshold,
    applied to a pass's rows in float32 (a float64 distribution a row would cost a good part of a pass), into two
    scratch rows kept for the request."""

    def __init__(self, temperature: float, top_k: int, epsilon: float, alpha: float):
        self.temperature, self.top_k, self.epsilon, self.alpha = temperature, top_k, epsilon, alpha
        self._inverse = np.float32(1.0 / temperature)
        self._log_bound = (float(np.log(epsilon)), float(np.log(alpha)))
        self._scratch: np.ndarray | None = None  # [2, V]: a row's scaled logits and their exponentials

    def terms(self, logits: np.ndarray) -> RowTerms:
        """One row's RowTerms: H = log Z - E[x] over the row's distribution after temperature and top-k."""
        if self._scratch is None or self._scratch.shape[1] != len(logits):
            self._scratch = np.empty((2, len(logits)), np.float32)
        x, e = self._scratch
        np.multiply(logits, self._inverse, out=x)
        shift = x.max()
        x -= shift
        floor = -np.inf
        if self.top_k and self.top_k < len(x):
            floor = float(np.partition(x, -self.top_k)[-self.top_k])
            x[x < floor] = OUTSIDE  # finite: exp gives 0 and 0 * x stays 0 in the entropy's sum
        np.exp(x, out=e)
        total = float(e.sum())
        log_z = float(np.log(total))
        entropy = log_z - float(np.dot(e, x)) / total
        return RowTerms(shift, floor, log_z + min(self._log_bound[0], self._log_bound[1] - entropy))

    def verdict(self, tokens: np.ndarray, parents: np.ndarray | None, logits: np.ndarray,
                draws: np.ndarray) -> Verdict:
        """The typical path over the target's rows (logits [1 + n, V]: the pass's estimates or float32 logits,
        draws [1 + n]: each row's noisy argmax, an exact draw from it), then the draw at the path's end. parents
        None: a chain."""
        path = typical_path(tokens, parents, lambda row: (row, self.terms(logits[row])),
                            lambda judged, token: self._typical(judged[1], logits[judged[0], token]))
        return Verdict(path, int(draws[path[-1] + 1 if path else 0]))

    def _typical(self, terms: RowTerms, logit) -> bool:
        x = np.float32(logit) * self._inverse - terms.shift  # as `terms` scaled the row, in float32
        return bool(x >= terms.floor and x > terms.bar)


def accept_by_graph_rule(prop, logits: np.ndarray, params, rng: np.random.Generator) -> Verdict:
    """The verify graph's sampled rule (speccompile.graphs) on the host, drawing from rng as the graph's caller
    does: one [rows, 2] table of uniforms."""
    parents = chain_parents(len(prop.tokens)) if prop.parents is None else prop.parents
    table = rng.random((len(prop.tokens) + 1, 2))
    return accept_sampled(prop.tokens, parents, probabilities(logits, params), from_table(table))


def accept_on_host(prop, logits: np.ndarray, argmax: np.ndarray, params, rng: np.random.Generator,
                   draws: PositionDraws | None = None, n: int = 0) -> Verdict:
    """The verdict on a proposal (runtime/drafters/base.Proposal) from the target's rows copied to the host (the
    pending token's row first): the rule `params` (runtime/sampling.SamplingParams) asks for. draws: the
    request's uniforms per position, row 0 predicting position n (deterministic candidates are then accepted
    where they equal the target's draws); else recursive rejection with uniforms from rng."""
    parents = chain_parents(len(prop.tokens)) if prop.parents is None else prop.parents
    if params.greedy:
        return accept_greedy(prop.tokens, parents, argmax)
    p = probabilities(logits, params)
    if params.typical:  # lossy, asked for: SamplingParams.acceptance
        return accept_typical(prop.tokens, parents, p, params.typical_epsilon, params.typical_alpha,
                              sequential(rng))
    if prop.q is None or prop.parents is not None:
        if draws is not None:
            ahead = np.concatenate([[0], depths(parents) + 1])  # how far past position n each row predicts
            return accept_drawn(prop.tokens, parents, p, lambda row: draws.uniform(n + int(ahead[row])))
        return accept_sampled(prop.tokens, parents, p, sequential(rng))
    q = prop.q[:len(prop.tokens)]
    if q.shape[1] < p.shape[1]:  # a draft vocabulary may be a prefix
        q = np.pad(q, ((0, 0), (0, p.shape[1] - q.shape[1])))
    return accept_chain_q(prop.tokens, q, p, sequential(rng))


@dataclasses.dataclass
class SpecDecodeStats:
    """What one request's passes did: verify passes, tokens proposed and committed, acceptance per draft depth,
    and where acceptance ran (in the target's graph or on the host)."""
    drafter: str | None
    tree: dict | None
    prompt_tokens: int
    prompt_cache_hit_tokens: int = 0  # prompt tokens whose K/V the context cache gave back
    prompt_cache_miss_tokens: int = 0  # prompt tokens the target ran
    verify_steps: int = 0  # decode passes after the prefill, with or without drafts
    committed: int = 0  # tokens those passes committed
    proposed: int = 0
    verified_in_graph: int = 0
    verified_on_host: int = 0
    committed_per_pass: dict[int, int] = dataclasses.field(default_factory=dict)
    accepted_per_depth: list[list[int]] = dataclasses.field(default_factory=list)  # per depth [accepted, tried]
    adapt: object = None  # the request's runtime/adaptive.AdaptiveDrafting, where it drafts adaptively: as_dict
    # gives its summary, its choices so far (once it planned a pass)
    logprobs: object = None  # runtime/logprobs.Logprobs where the request asks for them (not in as_dict)
    prompt_logprobs: object = None  # the same for the prompt's tokens after the first

    def record(self, proposed: int, accepted: int, deepest: int, in_graph: bool | None) -> None:
        """One pass: `proposed` draft nodes `deepest` deep, `accepted` of them taken (plus the target's token);
        in_graph None for a pass without drafts."""
        self.verify_steps += 1
        self.committed += accepted + 1
        self.committed_per_pass[accepted + 1] = self.committed_per_pass.get(accepted + 1, 0) + 1
        self.proposed += proposed
        if in_graph is not None:
            if in_graph:
                self.verified_in_graph += 1
            else:
                self.verified_on_host += 1
        while len(self.accepted_per_depth) < deepest:
            self.accepted_per_depth.append([0, 0])
        for depth in range(deepest):
            self.accepted_per_depth[depth][0] += depth < accepted
            self.accepted_per_depth[depth][1] += 1

    @property
    def mean_accepted_tokens(self) -> float:
        return self.committed / self.verify_steps if self.verify_steps else 1.0

    def as_dict(self, new_tokens: int, total_s: float, ttft_s: float | None, weight_bytes: int,
                prefill_passes: int) -> dict:
        """The stats dict of a GenerationResult (the CLI's --json, bench and the CI gate read these keys). ttft_s
        None: no token came (a request cancelled before its first)."""
        return dict(
            drafter=self.drafter, prompt_tokens=self.prompt_tokens,
            prompt_cache_hit_tokens=self.prompt_cache_hit_tokens,
            prompt_cache_miss_tokens=self.prompt_cache_miss_tokens, verify_steps=self.verify_steps,
            proposed=self.proposed, verified_in_graph=self.verified_in_graph,
            verified_on_host=self.verified_on_host, committed_per_pass=dict(self.committed_per_pass),
            tree=self.tree, new_tokens=new_tokens, total_s=total_s, ttft_s=ttft_s,
            tokens_per_second=new_tokens / total_s if total_s > 0 else 0.0,
            # the tokens after the first (none where a stop string cut the output before its first token)
            decode_tokens_per_second=max(new_tokens - 1, 0) / (total_s - ttft_s)
            if ttft_s is not None and total_s > ttft_s else 0.0,
            mean_accepted_tokens=self.mean_accepted_tokens,
            acceptance_rate_per_depth=[a / b for a, b in self.accepted_per_depth],
            target_weight_bytes=weight_bytes, prefill_passes=prefill_passes,
            adaptive=self.adapt.summary() if self.adapt is not None and self.adapt.passes else None,
            # bytes the target's weights cost per pass over the whole run: memory-bound decoding streams them all
            achieved_weight_bandwidth_gbps=weight_bytes * (self.verify_steps + prefill_passes) / total_s / 1e9
            if total_s > 0 else 0.0)
