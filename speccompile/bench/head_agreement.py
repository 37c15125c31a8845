"""How often a feature-reading draft head (MTP, EAGLE) guesses the target's next greedy token, teacher-forced.

Over the target's own greedy answer, a head's first draft after each committed prefix is a function of the
sequence alone: the target's features at every position, then the head over every pair (f_t, x_{t+1}) in one go.
Greedy decoding with a chain of one draft accepts exactly these guesses where its passes fall, so this measures
the head itself, at every position and with no timing in it: what it could give a decoder on these prompts,
apart from any loss in the runtime's drafting path (tests/test_mtp.py holds the live drafts to these). Prompt
lookup's first draft at each position is counted beside it, by the length of its match, and the two together:
over a target that verifies one path a pass, adaptive drafting (runtime/adaptive.py) picks between them.
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
    """Counts over answer positions: `hits` of `positions` first drafts of the head equal the target's greedy token;
    prompt lookup's first draft there (the most recent match's next token), by the length of the n-gram matched
    (`lookup[n]` = [positions with such a match, lookup right, head right]); and the two together: `either` right,
    `agreed` positions where lookup proposes the head's draft, `agreed_hits` of them right."""
    hits: int = 0
    positions: int = 0
    either: int = 0
    agreed: int = 0
    agreed_hits: int = 0
    lookup: dict[int, list[int]] = dataclasses.field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.hits / self.positions if self.positions else 0.0

    def add(self, other: "Agreement") -> None:
        for name in ("hits", "positions", "either", "agreed", "agreed_hits"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for n, counts in other.lookup.items():
            mine = self.lookup.setdefault(n, [0, 0, 0])
            mine[:] = [a + b for a, b in zip(mine, counts)]


def answer_agreement(gen, drafter: str, prompt_ids, max_new_tokens: int) -> Agreement:
    """The head's and prompt lookup's first drafts against the target's greedy answer to one prompt (token ids),
    over the answer's positions: every draft a decoder could make after the prompt, the one after the answer's last
    token aside."""
    prompt_ids = np.asarray(prompt_ids, np.int64)
    answer = gen.generate(prompt_ids, max_new_tokens, speculate=False, chat=False).token_ids
    seq = np.concatenate([prompt_ids, np.asarray(answer, np.int64)])
    guesses = first_drafts(gen, drafter, seq)
    out = Agreement()
    for t in range(len(prompt_ids) + 1, len(seq)):  # guesses[t - 2] is for seq[t], an answer token past the first
        truth, head = int(seq[t]), int(guesses[t - 2])
        starts, n = gen.lookup.matches(seq[:t])
        look = int(seq[starts[0]]) if n else -1
        out.positions += 1
        out.hits += head == truth
        out.either += truth in (head, look)
        out.agreed += look == head
        out.agreed_hits += look == head == truth
        if n:
            counts = out.lookup.setdefault(n, [0, 0, 0])
            counts[0], counts[1], counts[2] = counts[0] + 1, counts[1] + (look == truth), counts[2] + (head == truth)
    return out
