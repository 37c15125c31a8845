"""The cost model's calibration (runtime/cost_model.py): the target's passes on a grid of rows x committed lengths
over text the target finds likely, each drafter engine's pass, and prompt lookup's host time. A few seconds, on the
loaded engines."""
from __future__ import annotations

import time

import numpy as np

from speccompile.errors import SpeccompileError
from speccompile.graphs import MAX_STEP_TOKENS
from speccompile.runtime.cost_model import HEAD_ROWS, ROWS, CostModel, machine_key

REPEATS = 4  # the fastest of this many runs per point: noise on a shared machine only slows a run down
SETTLE = 4  # untimed one-row steps before a length's points (_grid_ms)
# the calibration's context (_likely_text): the target's greedy answer of this many tokens to a prompt, repeated
CALIBRATION_PROMPT = "Explain how a lighthouse keeps ships safe at night."
TEXT_ANSWER, NO_REPEAT = 64, 4


def _best_ms(run, repeats: int = REPEATS, before=None) -> float:
    """The fastest of `repeats` runs; `before` (untimed) runs ahead of each."""
    best = np.inf
    for _ in range(repeats):
        if before is not None:
            before()
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return best * 1000


def _target_pass(target, rows: int, length: int, greedy: bool, text: np.ndarray):
    """A pass as the decode loop runs it: a plain step for one row, else a verify pass over a chain. `text`: the
    tokens the cache holds (_likely_text), whose continuation the pass runs."""
    tokens = text[length:length + rows]
    parents = np.arange(rows, dtype=np.int64) - 1

    def run():
        target.cache.truncate(length)
        if rows == 1 or not target.verifies:
            target.forward(tokens, rows=np.arange(rows), full_logits=not greedy)
        else:
            target.verify(tokens, None, parents, 0.0 if greedy else 1.0, 0,
                          None if greedy else np.full((rows, 2), 0.5))
    return run


def _likely_text(target, n: int, prompt_ids=None) -> np.ndarray:
    """n tokens the target finds likely, written into its cache: a prompt (default: a few random tokens) and the
    target's greedy answer, never repeating one of its last few tokens (greedy text from a poor start soon loops on
    one), repeated. A screened head (compile/graph/head_screen.py) costs what the text makes it cost: over a
    constant or random context the distributions are flat, rows go uncertified and the pass takes the float32
    head, several times a real pass's price. Over text the target expects, it certifies as it does while decoding."""
    seed = (np.random.default_rng(0).integers(0, target.vocab_size, 4) if prompt_ids is None
            else np.asarray(prompt_ids, np.int64))
    period = [int(t) for t in seed[:max(1, n // 2)]]  # a short compiled context holds less
    size = min(n, len(period) + TEXT_ANSWER)
    logits = _prefill(target, np.array(period, np.int64))
    while len(period) < size:
        scores = logits[-1].copy()
        scores[period[-NO_REPEAT:]] = -np.inf
        period.append(int(np.argmax(scores)))
        logits = _prefill(target, np.array(period[-1:], np.int64), len(period) - 1)
    text = np.resize(np.array(period, np.int64), n)
    _prefill(target, text)
    return text


def _prefill(target, tokens: np.ndarray, start: int = 0) -> np.ndarray:
    """Run `tokens` into the target's cache after its first `start` slots, a chunk at a time (a pass writes its
    K/V but leaves the cache's length to the caller); returns the last token's logits."""
    target.cache.truncate(start)
    for at in range(0, len(tokens), MAX_STEP_TOKENS):
        chunk = tokens[at:at + MAX_STEP_TOKENS]
        logits = target.forward(chunk)[0]
        target.cache.truncate(start + at + len(chunk))
    return logits


def _grid_ms(target, rows: list[int], lengths: list[int], greedy: bool, text: np.ndarray) -> list[list[float]]:
    """The fastest of REPEATS rounds per (rows, length) point, the rounds interleaved over the grid so that a
    burst of load elsewhere spoils one round of several points rather than every run of one; then made monotone
    (a pass over more rows or a longer context is never faster: a slower reading is noise). Each round runs a
    point one token earlier in `text`: a screened head's float32 fallback, rare while decoding, comes with the
    position, and would otherwise price every round of a point. Within a round, each length's rows run from the
    fewest up, after SETTLE one-row steps there: a pass right after a much larger one (many rows, a long context)
    runs slower for a few passes, and decoding seldom follows one."""
    t = np.full((len(rows), len(lengths)), np.inf)
    for k in range(REPEATS):
        for j, n in enumerate(lengths):
            settle = _target_pass(target, 1, max(n - k, 0), greedy, text)
            for _ in range(SETTLE):
                settle()
            for i, r in enumerate(rows):
                t[i, j] = min(t[i, j], _best_ms(_target_pass(target, r, max(n - k, 0), greedy, text), 1))
    t = np.minimum.accumulate(t[::-1], axis=0)[::-1]  # rows
    t = np.minimum.accumulate(t[:, ::-1], axis=1)[:, ::-1]  # lengths
    return t.round(3).tolist()


def calibrate(target, drafters: dict, threads: int | None, lookup=None, prompt_ids=None) -> CostModel:
    """Measure the target's passes on a grid of rows x committed lengths, and each drafter engine's pass, over the
    target's answer to `prompt_ids` (CALIBRATION_PROMPT as the bundle's tokenizer encodes it; default: random
    tokens)."""
    # a short context measures the rows it can hold (a pass never holds more)
    rows = [r for r in ROWS if r <= min(target.max_rows, target.max_seq_len - 2)]
    if not rows:
        raise SpeccompileError("the compiled context is too short to calibrate the cost model")
    top = target.max_seq_len - rows[-1] - 1
    lengths = sorted({min(top, n) for n in (16, max(1, top // 4), top)})
    target.cache.truncate(0)  # a previous request's context may fill the cache
    target.forward(np.ones(rows[-1], np.int64), rows=np.arange(rows[-1]))  # first runs allocate: not timed
    text = _likely_text(target, lengths[-1] + rows[-1], prompt_ids)
    verify = {mode: _grid_ms(target, rows, lengths, mode == "greedy", text) for mode in ("greedy", "sampled")}
    # each drafter pass after a target pass, as while decoding: the target's weights have just pushed the
    # drafter's out of the CPU's caches
    evict = _target_pass(target, 1, lengths[0], True, text)
    drafter_ms = {name: _drafter_pass_ms(d, lengths[len(lengths) // 2], evict) for name, d in drafters.items()}
    target.cache.truncate(0)
    lookup_ms = 0.0
    if lookup is not None:
        context = np.random.default_rng(0).integers(0, target.vocab_size, lengths[len(lengths) // 2])
        lookup_ms = _best_ms(lambda: lookup.matches(context)[0])
    key = {**machine_key(threads, getattr(target, "device", "cpu")),
           "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "one_row_pad": getattr(target, "min_rows", 1) > 1}
    return CostModel(rows, lengths, verify, drafter_ms, lookup_ms, key)


def _drafter_pass_ms(drafter, length: int, before=None) -> list[float]:
    """Times of one pass of the drafter's own graph over HEAD_ROWS rows (an empty list: no graph of its own);
    `before` (untimed) runs ahead of each timed pass."""
    eng = getattr(drafter, "engine", None)
    if eng is None:
        return []
    out = []
    for r in HEAD_ROWS:
        run = _drafter_pass(eng, r, length)
        run()  # first runs allocate: not timed
        out.append(_best_ms(run, before=before))
    out = np.minimum.accumulate(np.array(out)[::-1])[::-1].round(3).tolist()
    drafter.reset()
    return out


def _drafter_pass(eng, rows: int, length: int):
    """One pass of a drafter engine over `rows` rows after about `length` committed tokens."""
    length = min(length, eng.max_seq_len - HEAD_ROWS[-1] - 1)
    hidden = np.zeros((rows, eng.hidden.shape[1]), np.float32) if "hidden_in" in eng.input_names else None

    def run():
        eng.cache.truncate(length)
        eng.forward(np.ones(rows, np.int64), positions=np.arange(length, length + rows),
                    parents=np.arange(rows) - 1 if rows > 1 else None, rows=np.arange(rows), committed=length,
                    hidden_in=hidden)
    return run
