"""How often a feature-reading draft head (MTP, EAGLE) guesses the target's next greedy token, teacher-forced.

Over the target's own greedy answer, a head's first draft after each committed prefix is a function of the
sequence alone: the target's features at every position, then the head over every pair (f_t, x_{t+1}) in one go.
Greedy decoding with a chain of one draft accepts exactly these guesses where its passes fall, so this measures
the head itself, at every position and with no timing in it: what it could give a decoder on these prompts,
apart from any loss in the runtime's drafting path (tests/test_mtp.py holds the live drafts to these).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from speccompile.errors import SpeccompileError
from speccompile.graphs import MAX_STEP_TOKENS
from speccompile.runtime.drafters.mtp import MtpDrafter


def first_drafts(gen, drafter: str, ids: np.ndarray) -> np.ndarray:
    """Entry t: the head's first draft after ids[:t + 2], a guess at ids[t + 2] (len(ids) - 1 entries; the
    last guesses past the end). Uses the Generator's engines: not while it generates."""
    head = gen.drafters.get(drafter)
    if not isinstance(head, MtpDrafter):
        raise SpeccompileError(f"drafter {drafter!r} is not a head that reads the target's features "
                               f"(MTP, EAGLE); this bundle has {', '.join(gen.drafters) or 'none'}")
    ids = np.asarray(ids, np.int64)
    if len(ids) < 2 or len(ids) > gen.max_seq_len:
        raise SpeccompileError(f"a sequence of {len(ids)} tokens: needs 2 to {gen.max_seq_len}")
    target, eng = gen.target, head.engine
    target.cache.truncate(0)
    head.reset()
    for start in range(0, len(ids), MAX_STEP_TOKENS):  # the target's features, chunk by chunk
        chunk = ids[start:start + MAX_STEP_TOKENS]
        target.forward(chunk)
        head.observe(start, head.features(target, np.arange(len(chunk))))
        target.cache.truncate(start + len(chunk))
    target.cache.truncate(0)
    guesses, step = np.zeros(len(ids) - 1, np.int64), min(MAX_STEP_TOKENS, eng.max_rows)
    for t0 in range(0, len(ids) - 1, step):  # pair t = (f_t, x_{t+1}) at position t + 1
        t1 = min(t0 + step, len(ids) - 1)
        logits, _ = eng.forward(ids[t0 + 1:t1 + 1], positions=np.arange(t0 + 1, t1 + 1), hidden_in=head.h[t0:t1],
                                rows=np.arange(t1 - t0))
        best = np.argmax(logits, axis=-1)
        guesses[t0:t1] = best if head.d2t is None else head.d2t[best]
        eng.cache.truncate(t1)
    head.reset()
    return guesses


@dataclasses.dataclass
class Agreement:
    """Counts over answer positions: `hits` of `positions` first drafts equal the target's greedy token."""
    hits: int = 0
    positions: int = 0

    @property
    def rate(self) -> float:
        return self.hits / self.positions if self.positions else 0.0

    def add(self, other: "Agreement") -> None:
        self.hits, self.positions = self.hits + other.hits, self.positions + other.positions


def answer_agreement(gen, drafter: str, prompt_ids, max_new_tokens: int) -> Agreement:
    """The head's first drafts against the target's greedy answer to one prompt (token ids), over the answer's
    positions: every draft a decoder could make after the prompt, the one after the answer's last token aside."""
    prompt_ids = np.asarray(prompt_ids, np.int64)
    answer = gen.generate(prompt_ids, max_new_tokens, speculate=False, chat=False).token_ids
    seq = np.concatenate([prompt_ids, np.asarray(answer, np.int64)])
    guesses = first_drafts(gen, drafter, seq)
    at = np.arange(len(prompt_ids) - 1, len(seq) - 2)  # guess at[i] is for seq[at[i] + 2], an answer token
    return Agreement(int((guesses[at] == seq[at + 2]).sum()), len(at))
