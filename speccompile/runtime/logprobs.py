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
        x = logits[np.asarray(rows, np.int64)].astype(np.float64)
        top = x.max(1, keepdims=True)
        logp = x - (top + np.log(np.exp(x - top).sum(1, keepdims=True)))
        for row, token in zip(logp, tokens):
            best = ()
            if self.top:
                best = np.argpartition(-row, self.top - 1)[:self.top]
                best = tuple((int(t), float(row[t])) for t in best[np.lexsort((best, -row[best]))])
            self.tokens.append(TokenLogprob(int(token), float(row[int(token)]), best))

    def add_pass(self, logits: np.ndarray, path, drafted: np.ndarray, token: int) -> None:
        """A verify pass's committed tokens: the accepted drafts (`drafted[path]`), each chosen at its parent's
        row (row 0, the pending token, for the first; 1 + the node's index for the token after it), then the
        target's own `token` at the last one's."""
        rows = [0, *(int(p) + 1 for p in path)]
        self.add(logits, rows, [*np.asarray(drafted)[list(path)].tolist(), int(token)])


def full_rows(params, logprobs) -> bool:
    """Whether a request's passes must fetch the target's float32 rows: sampled on the host, or logprobs asked for
    (greedy otherwise reads the exact greedy head's argmax alone)."""
    return not params.greedy or logprobs is not None
