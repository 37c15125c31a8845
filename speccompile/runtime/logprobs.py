"""The log-probabilities a request asks to see (OpenAI's and vLLM's `logprobs`): each committed token's under the
target, with the k likeliest tokens' at its position.

They are the log-softmax of the target's float32 logits at the row that chose the token, before temperature, top-k,
min-p or top-p (vLLM's default, its "raw" logprobs), so they do not depend on how the token was drawn. Greedy and
sampled by noise the passes then fetch float32 rows the exact greedy head would have skipped, and acceptance runs
on the host (the in-graph rule returns no rows): the tokens stay those a request without logprobs gets, at the
price of the full head product each pass.
"""
from __future__ import annotations

import dataclasses

import numpy as np

MAX_TOP_LOGPROBS = 20  # OpenAI's bound on top_logprobs


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # the k likeliest tokens and theirs, most likely first (ties: lower id)


class Logprobs:
    """A request's committed tokens' log-probabilities, appended pass by pass as the tokens are committed (before
    the tokens are handed to the reader, so a reader that has a token has its entry)."""

    def __init__(self, top: int):
        self.top, self.tokens = top, []

    def add(self, logits: np.ndarray, rows, tokens) -> None:
        """The entries of `tokens`, each chosen at its row of `logits` [R, V] (the target's float32 rows)."""
        for row, token in zip(rows, tokens):
            x = logits[int(row)].astype(np.float64)
            logp = x - (x.max() + np.log(np.exp(x - x.max()).sum()))
            top = ()
            if self.top:
                best = np.argpartition(-logp, self.top - 1)[:self.top]
                best = best[np.lexsort((best, -logp[best]))]
                top = tuple((int(t), float(logp[t])) for t in best)
            self.tokens.append(TokenLogprob(int(token), float(logp[int(token)]), top))


def verdict_rows(path) -> list[int]:
    """The rows that chose a verify pass's committed tokens: row 0 (the pending token) the first, then each
    accepted node's row (1 + its index) the token after it."""
    return [0, *(int(p) + 1 for p in path)]
