"""A request's place in the continuous-batching scheduler (runtime/scheduler.py): its caller's handle, and its
sequence slot's decode state."""
from __future__ import annotations

import dataclasses
import queue

import numpy as np

from speccompile.runtime.acceptance import SpecDecodeStats
from speccompile.runtime.adaptive import AdaptiveDrafting
from speccompile.runtime.drafters.base import Drafter, Proposal
from speccompile.runtime.drafters.lookup import LookupReach
from speccompile.runtime.kv_cache import KVCache
from speccompile.runtime.noise import GumbelNoise
from speccompile.runtime.request import Request
from speccompile.runtime.sampling import PositionDraws, SamplingParams

DONE = object()  # a request's queue ends with this


class Handle:
    """A request's link from the scheduler to its caller: the token lists of its passes, in order."""

    def __init__(self, scheduler, request: Request, stats: SpecDecodeStats):
        self.scheduler, self.request, self.stats = scheduler, request, stats
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.cancelled = False  # set by the caller (a closed stream): the slot is freed before the next pass

    def passes(self):
        """The token lists committed by each pass (the prefill's first token first). Closing it cancels."""
        try:
            while True:
                item = self.scheduler.next_item(self)
                if item is DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.cancel()

    def cancel(self) -> None:
        """The caller is gone: free the slot now, unless a round (which frees it first) is running."""
        self.cancelled = True
        self.scheduler.tidy()


@dataclasses.dataclass
class Slot:
    """One request in a sequence slot: its decode state, as Generator.steps keeps it in local variables."""
    index: int
    handle: Handle
    cache: KVCache
    drafter: Drafter | None
    rng: np.random.Generator
    context: np.ndarray
    reach: LookupReach | None
    adapt: AdaptiveDrafting | None = None  # adaptive drafting's per-request state (a tree "adaptive")
    params: SamplingParams | None = None  # what the slot decodes with: the request's, or greedy with `noise`
    noise: GumbelNoise | None = None  # a request sampled by noisy argmaxes (runtime/noise.py)
    draws: PositionDraws | None = None  # otherwise sampled: its uniforms per position (runtime/sampling.py)
    prefilled: int = 0  # prompt tokens in the cache so far
    n: int = 0  # committed tokens (the last, `token`, not yet in the cache)
    token: int = -1
    generated: int = 0
    prop: Proposal | None = None

    @property
    def req(self) -> Request:
        return self.handle.request

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.req.ids)
