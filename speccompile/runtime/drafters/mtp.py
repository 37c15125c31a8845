"""A multi-token-prediction (MTP) head as the drafter (DeepSeek-V3's MTP module, applied recursively as EAGLE does).

The head reads the target's own hidden state: at position t+1 it combines h_t (the target's residual stream
before its final norm; for DeepSeek-V3's own MTP layer its output after that norm: drafters/features.py) with the
embedding of token x_{t+1}, runs one decoder block over its own KV cache, and predicts x_{t+2} with the target's
output head. Its output hidden state stands in for h_{t+1} when it drafts further ahead.

The head's cache holds one slot per "true pair" (h_t, x_{t+1}) of the committed context; drafts are written after
them and dropped after each proposal, so acceptance needs no roll back here.
"""
from __future__ import annotations

import numpy as np

from speccompile.errors import BundleError
from speccompile.graphs import MAX_STEP_TOKENS
from speccompile.runtime.context_cache import Arrays, Part, kv_part, read_kv, write_kv
from speccompile.runtime.drafters.base import CaughtUp, Drafter, Proposal, RuntimeContext
from speccompile.runtime.drafters.draft_model import _TreeDraft, grow_tree
from speccompile.runtime.drafters.features import aux_columns
from speccompile.runtime.engine import Engine
from speccompile.runtime.sampling import probabilities, sample


def load(entry: dict, ctx: RuntimeContext) -> "MtpDrafter":
    model = ctx.model(entry)
    engine = Engine(ctx.bundle_dir, model, ctx.threads, ctx.device, max_rows=ctx.max_rows, cache=ctx.slot_cache(entry))
    return MtpDrafter(entry["name"], engine, model.get("draft_to_target"), ctx.target.vocab_size,
                      aux_columns(entry["name"], model, ctx.manifest["models"]["target"]))


def _token_map(name: str, draft_to_target: list[int] | None, head_vocab: int, target_vocab: int) -> np.ndarray | None:
    """The manifest's draft-to-target map, checked: one target token id per token the head scores, or no map for a
    head scoring the target's own vocabulary. No graph's signature covers the map, and an id past either
    vocabulary would index past an array mid-generation."""
    if draft_to_target is None:
        if head_vocab != target_vocab:
            raise BundleError(f"drafter {name!r} scores {head_vocab} tokens, the target {target_vocab}, and its "
                              "manifest entry maps none of them (draft_to_target); rebuild the bundle")
        return None
    d2t = np.asarray(draft_to_target, np.int64)
    if len(d2t) != head_vocab or not len(d2t) or not 0 <= d2t.min() <= d2t.max() < target_vocab:
        raise BundleError(f"drafter {name!r}: its draft_to_target map must give one token id below {target_vocab} "
                          f"(the target's vocabulary) for each of the {head_vocab} tokens it scores; it lists "
                          f"{len(d2t)}; rebuild the bundle")
    return d2t


class MtpDrafter(Drafter):
    wants_hidden = True

    def __init__(self, name: str, engine: Engine, draft_to_target: list[int] | None = None,
                 target_vocab: int | None = None, aux_columns: np.ndarray | None = None):
        """draft_to_target: the target token id of each entry of a reduced draft vocabulary (EAGLE-3 style: the
        head scores only frequent tokens, so its output matrix is a fraction of the target's); aux_columns: the
        columns of the target's aux_hidden_states it reads instead of its hidden states (drafters/features.py)."""
        self.name, self.engine, self.aux_columns = name, engine, aux_columns
        self.target_vocab = target_vocab or engine.vocab_size
        self.d2t = _token_map(name, draft_to_target, engine.vocab_size, self.target_vocab)
        self.h = np.zeros((engine.max_seq_len, engine.hidden.shape[1]), np.float32)  # target hidden per position
        self.known = 0  # self.h[:known] is valid
        self.caught = CaughtUp()  # the last pair's logits and hidden state, where a shared pass ran its catch-up

    def reset(self) -> None:
        self.engine.cache.truncate(0)
        self.known = 0
        self.caught.clear()

    def state_parts(self) -> dict[str, Part]:
        """features: what observe() kept per position (the head cannot catch up without them); kv: the head's
        cache, whose slot t holds the pair (h_t, x_{t+1}) (optional: _catch_up rebuilds it from the features)."""
        return {"features": Part({"h": ((self.h.shape[1],), self.h.dtype.name)}),
                "kv": kv_part(self.engine.cache, required=False)}

    def save_state(self, part, tokens, start, stop) -> Arrays | None:
        if part == "features" and self.known >= stop:
            return {"h": self.h[start:stop].copy()}
        if part == "kv" and self.engine.cache.length >= stop - 1:  # its slots hold this sequence's true pairs only
            # positions [start, stop) keep the slots whose token x_{t+1} is one of theirs: slots [start-1, stop-1)
            # (slot stop-1 pairs with the token after the block, which the block's key does not cover)
            rows = read_kv(self.engine.cache, max(start - 1, 0), stop - 1)
            return rows if start else {n: np.concatenate([np.zeros_like(a[:1]), a]) for n, a in rows.items()}
        return None

    def load_state(self, part, tokens, arrays) -> None:
        self.caught.clear()
        if part == "features":
            self.h[:len(arrays["h"])] = arrays["h"]
            self.known = len(arrays["h"])
        elif part == "kv":  # slots [-1, positions - 1): the first is block 0's padding
            write_kv(self.engine.cache, {n: a[1:] for n, a in arrays.items()})
            self.engine.cache.truncate(len(arrays["key"]) - 1)

    def features(self, target, rows) -> np.ndarray:
        return target.hidden[rows] if self.aux_columns is None else target.aux[rows][:, self.aux_columns]

    def observe(self, start: int, hidden: np.ndarray) -> None:
        """The target's hidden states of committed positions [start, start + len(hidden))."""
        self.h[start:start + len(hidden)] = hidden
        self.known = start + len(hidden)

    def _pending(self, context_len: int) -> tuple[int, int]:
        """(start, upto): the pairs t < upto have h_t known and x_{t+1} in the context; those from start on are
        not in the head's cache, or are the last one, re-run for its logits."""
        upto = min(self.known, context_len - 1)
        return min(self.engine.cache.length, upto - 1), upto

    def rows_behind(self, context_len: int) -> int:
        start, upto = self._pending(context_len)
        return max(1, upto - start)

    def catch_up_step(self, context: np.ndarray) -> tuple[int, np.ndarray, np.ndarray, np.ndarray] | None:
        """What _catch_up would run, for a pass of the head's batched form beside other slots' heads
        (runtime/shared_catch_up.py): (the first cache slot it writes, tokens, positions, features); None where nothing
        is to run or one pass cannot hold it."""
        start, upto = self._pending(len(context))
        if upto < 1 or upto - start > MAX_STEP_TOKENS or self.caught.holds(self._state(context, upto)):
            return None
        return start, context[start + 1:upto + 1], np.arange(start + 1, upto + 1), self.h[start:upto]

    def caught_up(self, context: np.ndarray, logits: np.ndarray, token: int, hidden: np.ndarray) -> None:
        """catch_up_step's pass ran elsewhere: its K/V are in this head's cache, its last row's logits and hidden
        state these."""
        _, upto = self._pending(len(context))
        self.engine.cache.truncate(upto)
        self.caught.put(self._state(context, upto), logits, hidden)

    def _state(self, context: np.ndarray, upto: int) -> tuple:
        """What a caught-up row is valid for: the pairs in the cache and the last one's token."""
        return upto, self.engine.cache.length, int(context[upto])

    def _catch_up(self, context: np.ndarray):
        """Run the head over the true pairs not yet in its cache; returns (logits, hidden) of the last pair,
        which predict the token after the context."""
        eng, cache = self.engine, self.engine.cache
        start, upto = self._pending(len(context))
        row = self.caught.take(self._state(context, upto))
        if row is not None:
            return row
        cache.truncate(start)
        while cache.length < upto:
            t0 = cache.length
            t1 = min(upto, t0 + MAX_STEP_TOKENS)
            logits, _ = eng.forward(context[t0 + 1:t1 + 1], positions=np.arange(t0 + 1, t1 + 1),
                                    hidden_in=self.h[t0:t1])
            cache.truncate(t1)
        return logits[0], eng.hidden[t1 - t0 - 1].copy()

    def _to_target(self, q: np.ndarray) -> np.ndarray:
        """A distribution over the draft vocabulary, as one over the target's."""
        if self.d2t is None:
            return q
        full = np.zeros(self.target_vocab)
        full[self.d2t] = q
        return full

    def propose(self, context, k, params, rng) -> Proposal:
        eng, cache = self.engine, self.engine.cache
        logits, hidden = self._catch_up(context)
        committed = cache.length
        k = min(k, eng.max_seq_len - committed - 1)
        tokens = np.zeros(max(k, 0), np.int64)
        q = None if params.greedy else np.zeros((len(tokens), self.target_vocab))
        for i in range(len(tokens)):
            if params.greedy:
                best = int(np.argmax(self.ranked(logits, len(context) + i, self.d2t)))
                tokens[i] = best if self.d2t is None else self.d2t[best]
            else:
                q[i] = self._to_target(probabilities(logits, params))
                tokens[i] = sample(q[i], rng)
            if i + 1 < len(tokens):  # feed the draft back with the head's own hidden state
                logits, _ = eng.forward(tokens[i:i + 1], positions=np.array([len(context) + i]),
                                        hidden_in=hidden[None])
                logits = logits[0]
                hidden = eng.hidden[0].copy()
                cache.truncate(cache.length + 1)
        cache.truncate(committed)
        return Proposal(tokens, q)

    def propose_tree(self, context, tree, params, rng) -> Proposal:
        eng, cache = self.engine, self.engine.cache
        logits, hidden = self._catch_up(context)
        committed = cache.length
        n = len(context)
        t = _TreeDraft(eng, committed, n - 1, logits, root_hidden=hidden, token_map=self.d2t, ranked=self.ranks)
        keep = grow_tree(t, tree, min(tree.size, eng.max_seq_len - committed - 1, eng.max_rows))
        cache.truncate(committed)
        return t.proposal(keep)
