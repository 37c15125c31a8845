"""What a pass takes beyond the cost model's price for it, measured per request.

The cost model (runtime/cost_model.py) prices a pass as its drafting and its target pass. A pass that runs a drafter
level costs more than that: the host's work around it (growing and cutting the tree, compacting the cache, the
drafter's features) and a target pass slowed by the drafter's graph having just run (its weights through the same
CPU caches). The adaptive planner (runtime/adaptive.py) adds what such passes took beyond their price, less what
plain passes took beyond theirs, to a drafter level's price: a level that pays only on paper is not drafted. The
means belong to the machine and the bundle, not to a request: one PassOverhead per cost model, which every
request's planner times its passes into (a new request starts from what earlier ones measured).
"""
from __future__ import annotations

import time

DECAY = 0.9  # each pass weighs this much less on the next one
# one pass's excess is clipped to this share of its price either way: a stall elsewhere on the machine is not a
# cost of drafting
CLIP = 0.5


class PassOverhead:
    """Decayed means of (a pass's wall time - its price), apart for passes that ran a drafter level and the rest."""

    def __init__(self):
        self._sums = {True: [0.0, 1.0], False: [0.0, 1.0]}  # drafted -> [decayed excess ms, decayed passes]

    def finish(self, start: float, price_ms: float, drafted: bool) -> None:
        """A pass that began at `start` (time.perf_counter(), at its planning) ended now (its update): priced
        price_ms, a drafter level run or not."""
        if price_ms <= 0:
            return
        excess = (time.perf_counter() - start) * 1e3 - price_ms
        excess = min(max(excess, -CLIP * price_ms), CLIP * price_ms)
        sums = self._sums[drafted]
        sums[0], sums[1] = sums[0] * DECAY + excess, sums[1] * DECAY + 1.0

    def mean(self, drafted: bool) -> float:
        total, passes = self._sums[drafted]
        return total / passes

    def drafting_extra(self) -> float:
        """What a pass that runs a drafter level takes beyond its price, more than a plain pass does (ms, >= 0)."""
        return max(0.0, self.mean(True) - self.mean(False))
