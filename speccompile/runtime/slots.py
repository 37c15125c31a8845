"""A request's place in the continuous-batching scheduler (runtime/scheduler.py): its caller's handle, and its
sequence slot's decode state."""
from __future__ import annotations

import collections
import dataclasses
import queue

import numpy as np

from speccompile.errors import SharedPassError
from speccompile.format.trees import depths
from speccompile.runtime.acceptance import SpecDecodeStats
from speccompile.runtime.adaptive import AdaptiveDrafting
from speccompile.runtime.batch_engine import SlotStep
from speccompile.runtime.drafters.base import Drafter, Proposal
from speccompile.runtime.drafters.lookup import LookupReach
from speccompile.runtime.kv_cache import KVCache
from speccompile.runtime.logprobs import full_rows
from speccompile.runtime.noise import GumbelNoise
from speccompile.runtime.request import Request
from speccompile.runtime.sampling import PositionDraws, SamplingParams
from speccompile.runtime.text_stream import TextStream

DONE = object()  # a request's queue ends with this


class Handle:
    """A request's link from the scheduler to its caller: the token lists of its passes, in order."""

    def __init__(self, scheduler, request: Request, stats: SpecDecodeStats):
        self.scheduler, self.request, self.stats = scheduler, request, stats
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.cancelled = False  # set by the caller (a closed stream): the slot is freed before the next pass
        self.produced_at: float | None = None  # when the pass that committed the last list yielded ran

    def passes(self):
        """The token lists committed by each pass (the prefill's first token first). Closing it cancels."""
        try:
            while True:
                item = self.scheduler.next_item(self)
                if item is DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                self.produced_at, new = item
                yield new
        finally:
            self.cancel()

    def cancel(self) -> None:
        """The caller is gone: free the slot now, unless a round (which frees it first) is running."""
        self.cancelled = True
        self.scheduler.tidy()


def without_cancelled(waiting: collections.deque[Handle]) -> collections.deque[Handle]:
    """The waiting requests whose callers are still there; the others end now (DONE): a request cancelled while
    every slot is busy leaves at once instead of waiting for a slot to run in, and requests dropped unread do not
    pile up until a slot frees. The same deque where none is cancelled: this runs every round."""
    if not any(handle.cancelled for handle in waiting):
        return waiting
    kept = collections.deque()
    for handle in waiting:
        if handle.cancelled:
            handle.queue.put(DONE)
        else:
            kept.append(handle)
    return kept


def round_failed(e: BaseException) -> SharedPassError:
    """The error a request gets when a round another caller ran for it failed: its own object (one exception raised
    in several threads would gather their tracebacks), naming the failure, which is its cause."""
    what = "was interrupted" if not isinstance(e, Exception) else "failed"
    detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
    error = SharedPassError(f"the shared decoding pass of this request {what} in another request's thread "
                             f"({type(e).__name__}{': ' + detail if detail else ''})")
    error.__cause__ = e
    return error


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
    stops: TextStream | None = None  # the request's stop strings, watched as its caller's stream watches them
    leader: Slot | None = None  # a joining slot whose prompt this one's waits to restore (prefix_leader)

    @property
    def req(self) -> Request:
        return self.handle.request

    def complete(self, new: list[int], eos) -> bool:
        """Count a pass's tokens; True once the request has all it asked for: max_new_tokens, an end-of-sequence
        token, or a stop string. Its caller may read the tokens much later (a list of prompts is read one by
        one), so the slot must not wait for the caller to find the stop string."""
        self.generated += len(new)
        return (self.generated >= self.req.max_new_tokens or any(t in eos for t in new)
                or self.stops is not None and any(self.stops.add(t) for t in new))

    @property
    def full_logits(self) -> bool:
        """Whether its passes need the target's float32 rows (logprobs.full_rows)."""
        return full_rows(self.params, self.handle.stats.logprobs)

    @property
    def fixed_output(self) -> bool:
        """Whether its tokens do not depend on its drafts: greedy, or sampled by noise with exact acceptance (the
        target's own draws). Typical acceptance keeps whichever drafts the target finds likely enough."""
        return self.params.greedy and not (self.noise is not None and self.noise.typical)

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.req.ids)

    def chunk(self, size: int) -> SlotStep:
        """The next `size` tokens at most of the prompt, as a step (the last chunk with the first token's noise)."""
        tokens = self.req.ids[self.prefilled:self.prefilled + size]
        last = len(tokens) + self.prefilled == len(self.req.ids)
        return SlotStep(self.index, tokens, self.prefilled,
                        noise=self.noise.rows([len(self.req.ids)]) if self.noise and last else None)

    def block(self) -> SlotStep:
        """The verify block: the pending token (row 0), then the draft nodes."""
        prop, n, noise = self.prop, self.n, self.noise
        block = np.concatenate([[self.token], prop.tokens]).astype(np.int64)
        rows = np.arange(len(block))
        if prop.parents is None:  # a chain
            return SlotStep(self.index, block, n - 1, rows=rows, noise=noise.rows(n + rows) if noise else None)
        parents = np.concatenate([[-1], prop.parents + 1])  # tree roots hang off the pending token
        depth = depths(parents)
        return SlotStep(self.index, block, n - 1, positions=n - 1 + depth, parents=parents, rows=rows,
                        noise=noise.rows(n + depth) if noise else None)


def prefix_leader(s: Slot, slots, block_tokens: int) -> Slot | None:
    """The joining slot, among `slots`, whose prompt shares the most whole context-cache blocks with s's beyond
    what s restored: s waits for it to finish its prompt (which saves those blocks) and restores them rather than
    running them a second time (the n choices of one request, parallel calls under one long system prompt). Only
    where the tokens s saves are at least what the leader has left to run beyond s's own: s's first token then
    comes no later than when the two prompts' chunks take turns (a short prompt under a chat template's system
    prompt does not wait for a long one). None where no slot qualifies. Only slots that wait for nobody lead, so
    waiting never goes round a circle."""
    own, best, reach = np.asarray(s.req.ids), None, s.prefilled + block_tokens
    for other in slots:
        if other is None or other is s or other.decoding or other.leader is not None:
            continue
        theirs = np.asarray(other.req.ids)
        n = min(len(own) - 1, len(theirs))  # a restore leaves s's last prompt token to run
        differ = np.flatnonzero(own[:n] != theirs[:n])
        shared = (int(differ[0]) if len(differ) else n) // block_tokens * block_tokens
        longer = (len(theirs) - other.prefilled) - (len(own) - s.prefilled)  # the leader's left, past s's own
        if shared >= reach and shared - s.prefilled >= longer:
            best, reach = other, shared + 1
    return best
