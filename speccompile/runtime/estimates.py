"""What adaptive drafting (runtime/adaptive.py) keeps per request: decayed rates of how often drafted nodes were
accepted, the priors they start from, and a pass's plan and the tree it verified."""
from __future__ import annotations

import dataclasses

import numpy as np

DECAY = 0.85  # each pass's outcome weighs this much less on the next one: the estimates follow the request
DEPTHS = 16  # per-depth estimates (deeper nodes share the last)
NO_SCORE_PRIOR = 0.6  # the acceptance prior of a drafter node without a probability (e.g. a Medusa head)
# of a lookup node, given its parent was accepted, by the length of the n-gram its match shares with the end of
# the context (index 0: not known; lengths past the last share its prior and its estimates)
LOOKUP_PRIOR = (0.5, 0.2, 0.45, 0.75)
AGREED_PRIOR = (0.6, 0.6, 0.75, 0.9)  # of a drafter's node that prompt lookup proposes too, by the same index
HEAD_PRIOR = 0.55  # the accepted path starts with a drafter node


class Rate:
    """A ratio of two decayed sums (recent outcomes weigh most), starting from a prior worth `weight` passes."""
    __slots__ = ("num", "den")

    def __init__(self, prior: float = 0.0, weight: float = 0.0):
        self.num, self.den = prior * weight, weight

    def add(self, num: float, den: float) -> None:
        self.num, self.den = self.num * DECAY + num, self.den * DECAY + den

    @property
    def value(self) -> float:
        return self.num / self.den if self.den > 0 else 0.0


def shrunk(rate: Rate, toward: float) -> float:
    """rate's value shrunk toward `toward`, worth one observation."""
    return (rate.num + toward) / (rate.den + 1.0)


def by_depth(rates: list[Rate], first: float) -> list[float]:
    """Per-depth rates, each shrunk toward the one above it: a depth seldom drafted takes after the depth before,
    not after a fixed prior."""
    out, above = [], first
    for r in rates:
        above = shrunk(r, above)
        out.append(above)
    return out


def first_rate(rates: list[Rate], prior: float) -> float:
    """by_depth(rates, prior)[0]: a root child's rate."""
    return shrunk(rates[0], prior)


def match_index(match_len: int) -> int:
    """A prompt-lookup match length as an index into LOOKUP_PRIOR."""
    return min(match_len, len(LOOKUP_PRIOR) - 1)


@dataclasses.dataclass
class Plan:
    head_depth: int  # drafter levels to draft (0: none)
    head_nodes: int  # the drafter's node budget
    lookup_nodes: int  # prompt-lookup nodes (and depth) to join
    draft_ms: float  # predicted drafting time
    probe: bool = False  # one level deeper than the estimates say: verify at least one node, to learn from it


# a plain step's kept tree (update only reads it)
NO_NODES, NO_FLAGS, NO_PROBS = np.zeros(0, np.int64), np.zeros(0, bool), np.zeros(0)
for _empty in (NO_NODES, NO_FLAGS, NO_PROBS):
    _empty.setflags(write=False)


@dataclasses.dataclass
class Kept:
    """The nodes a pass verified, for the update after it."""
    parents: np.ndarray
    level: np.ndarray  # 0-based depth
    from_head: np.ndarray  # bool: a drafter node (else a prompt-lookup node)
    first: np.ndarray  # bool: a lookup node that is its parent's first lookup child (the most recent match)
    predicted: np.ndarray  # a drafter node's own conditional probability
    agreed: np.ndarray  # bool: a drafter node prompt lookup proposed too
    match: int  # the lookup nodes' match length, as an index into LOOKUP_PRIOR
    plan: Plan
    price_ms: float = 0.0  # the cost model's price of the pass: its drafting and its target pass
