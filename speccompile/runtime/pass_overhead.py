"""What a pass takes beyond the cost model's price for it, measured as requests run.

The cost model (runtime/cost_model.py) prices a pass as its drafting and its target pass. A pass that verifies draft
nodes costs more than that: the host's work around them (joining and cutting the tree, acceptance, compacting the
cache, the drafter's features) and a target pass slowed by a drafter's graph having just run (its weights through
the same CPU caches). The adaptive planner (runtime/adaptive.py) adds what such passes took beyond their price, less
what plain steps took beyond theirs, to the price of verifying any node: nodes that pay only on paper are not
verified, and a drafter level they would come from is not drafted. The means belong to the machine and the
bundle, not to a request: one PassOverhead per cost model, which every request's planner times its passes into (a
new request starts from what earlier ones measured).
"""
from __future__ import annotations

import time

DECAY = 0.9  # each pass weighs this much less on the next one
# one pass's excess is clipped to this share of its price either way: a stall elsewhere on the machine is not a
# cost of drafting
CLIP = 0.5


class PassOverhead:
    """Decayed means of (a pass's wall time - its price), apart for passes that verified draft nodes and plain
    steps."""

    def __init__(self):
        self._sums = {True: [0.0, 1.0], False: [0.0, 1.0]}  # verified -> [decayed excess ms, decayed passes]

    def finish(self, start: float, price_ms: float, verified: bool) -> None:
        """A pass that began at `start` (time.perf_counter(), at its planning) ended now (its update): priced
        price_ms, draft nodes verified or not."""
        if price_ms <= 0:
            return
        excess = (time.perf_counter() - start) * 1e3 - price_ms
        excess = min(max(excess, -CLIP * price_ms), CLIP * price_ms)
        sums = self._sums[verified]
        sums[0], sums[1] = sums[0] * DECAY + excess, sums[1] * DECAY + 1.0

    def mean(self, verified: bool) -> float:
        total, passes = self._sums[verified]
        return total / passes

    def verify_extra(self) -> float:
        """What a pass that verifies draft nodes takes beyond its price, more than a plain step does (ms, >= 0)."""
        return max(0.0, self.mean(True) - self.mean(False))
