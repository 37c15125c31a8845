"""What a pass takes beyond the cost model's price for it, measured as requests run.

The cost model (runtime/cost_model.py) prices a pass as its drafting and its target pass. A pass that verifies draft
nodes costs more than that: the host's work around them (joining and cutting the tree, acceptance, compacting the
cache, the drafter's features) and a target pass slowed by a drafter's graph having just run (its weights through
the same CPU caches). The adaptive planner (runtime/adaptive.py) adds what such passes took beyond their price, less
what plain steps took beyond theirs, to the price of verifying any node: nodes that pay only on paper are not
verified, and a drafter level they would come from is not drafted. A pass that verifies also slows the few plain
steps after it (its larger working set, a drafter's graph, a break in the steady loop of steps; decaying over
AFTER steps, docs/results.md "A verify row's fixed costs"): what those steps take beyond a steady plain step's
excess is that pass's cost too. The means belong to the machine and the bundle, not to a request: one PassOverhead
per cost model, which every request's planner times its passes into (a new request starts from what earlier ones
measured).
"""
from __future__ import annotations

import time

DECAY = 0.9  # each pass weighs this much less on the next one
# one pass's excess is clipped to this share of its price either way: a stall elsewhere on the machine is not a
# cost of drafting
CLIP = 0.5
AFTER = 4  # plain steps after a verifying pass that it slows


class PassOverhead:
    """Decayed means of (a pass's wall time - its price), apart for passes that verified draft nodes and steady plain
    steps; and of how much more than a steady plain step each of the AFTER plain steps after a verifying pass took."""

    def __init__(self):
        self._sums = {True: [0.0, 1.0], False: [0.0, 1.0]}  # verified -> [decayed excess ms, decayed passes]
        self._after = [[0.0, 1.0] for _ in range(AFTER)]  # per step after: [decayed excess over plain ms, passes]

    def finish(self, start: float, price_ms: float, verified: bool, after: int | None = None) -> None:
        """A pass that began at `start` (time.perf_counter(), at its planning) ended now (its update): priced
        price_ms, draft nodes verified or not. after: a plain step that is the after-th (0: the first) since a
        pass that verified, where that is under AFTER; None: a steady one."""
        if price_ms <= 0:
            return
        excess = (time.perf_counter() - start) * 1e3 - price_ms
        excess = min(max(excess, -CLIP * price_ms), CLIP * price_ms)
        if verified or after is None:
            sums = self._sums[verified]
        else:  # a step slowed by the pass before: measured against steady steps
            sums, excess = self._after[after], excess - self.mean(False)
        sums[0], sums[1] = sums[0] * DECAY + excess, sums[1] * DECAY + 1.0

    def mean(self, verified: bool) -> float:
        total, passes = self._sums[verified]
        return total / passes

    def slowdown(self) -> float:
        """How much longer than steady plain steps the AFTER plain steps after a verifying pass take, together
        (ms)."""
        return sum(total / passes for total, passes in self._after)

    def verify_extra(self) -> float:
        """What a pass that verifies draft nodes takes beyond its price, more than a plain step does, with the
        steps after it that it slows (ms, >= 0)."""
        return max(0.0, self.mean(True) - self.mean(False) + self.slowdown())
