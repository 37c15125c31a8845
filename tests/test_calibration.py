"""The cost model's calibration (speccompile/runtime/calibration.py) times passes over text the target itself
expects: a screened greedy head (compile/graph/head_screen.py) costs what the text makes it cost, and over a
constant or random context it takes the float32 product on most passes, which decoding seldom does."""
import numpy as np

from speccompile.runtime import calibration
from speccompile.runtime.calibration import NO_REPEAT, TEXT_ANSWER, _grid_ms, _likely_text


class Cache:
    """As the engines' caches: a pass writes its tokens' slots from `length` on, and the caller sets the length."""
    def __init__(self):
        self.slots, self.length = [None] * 1024, 0

    @property
    def tokens(self) -> list[int]:
        return self.slots[:self.length]

    def truncate(self, n: int) -> None:
        self.length = n


class Target:
    """A target whose likeliest next token is the last one (greedy text from it would loop on one token), then
    the last one plus 1; it records what its cache holds."""
    vocab_size = 50

    def __init__(self):
        self.cache, self.passes = Cache(), []

    def forward(self, tokens, rows=None, full_logits=True):
        n = self.cache.length
        self.cache.slots[n:n + len(tokens)] = [int(t) for t in tokens]
        self.passes.append((n, len(tokens)))
        logits = np.zeros((1, self.vocab_size), np.float32)
        last = int(tokens[-1])
        logits[0, last], logits[0, (last + 1) % self.vocab_size] = 2.0, 1.0
        return logits, logits.argmax(-1)


def test_the_calibration_text_is_the_targets_answer_to_the_prompt_repeated():
    target, prompt = Target(), [7, 3, 9]
    text = _likely_text(target, 500, prompt)
    answer = text[len(prompt):len(prompt) + TEXT_ANSWER]
    assert list(text[:len(prompt)]) == prompt
    # greedy would repeat the last token; its last NO_REPEAT tokens are skipped, so the runner-up follows
    assert all(b == (a + 1) % Target.vocab_size for a, b in zip(np.concatenate([[9], answer[:-1]]), answer))
    assert all(t not in text[i - NO_REPEAT:i] for i, t in enumerate(text[:len(prompt) + TEXT_ANSWER]) if i >= NO_REPEAT)
    period = len(prompt) + TEXT_ANSWER
    assert np.array_equal(text[period:2 * period], text[:period]) and len(text) == 500
    assert target.cache.tokens == list(text)  # the cache holds the text the timed passes continue


def test_a_short_context_takes_a_shorter_text():
    target = Target()
    text = _likely_text(target, 10, list(range(30)))
    assert len(text) == 10 and list(text[:5]) == list(range(5)) and target.cache.tokens == list(text)


def test_each_round_times_a_point_a_token_earlier(monkeypatch):
    """A screened pass's price comes with its position (a row the screen cannot certify takes the float32
    product): REPEATS rounds at REPEATS positions, so one such position cannot price a point; each pass runs the
    text's own continuation there."""
    target, text = Target(), np.arange(100) % 50
    target.verifies, target.cache.slots[:100], seen = False, list(text), []
    monkeypatch.setattr(calibration, "_best_ms", lambda run, repeats: (run(), 1.0)[1])
    target.forward = lambda tokens, rows=None, full_logits=True: seen.append((target.cache.length, list(tokens)))
    _grid_ms(target, [1, 2], [40], True, text)
    assert sorted({n for n, _ in seen}) == list(range(40 - calibration.REPEATS + 1, 41))
    assert all(tokens == list(text[n:n + len(tokens)]) for n, tokens in seen)


def test_each_length_is_timed_after_one_row_steps_there_from_the_fewest_rows_up(monkeypatch):
    """A pass right after a much larger one runs slower for a few passes: each length's points follow SETTLE
    untimed one-row steps at that length, and run from the fewest rows up."""
    target, text, timed = Target(), np.arange(200) % 50, []
    target.verifies, target.cache.slots[:200] = False, list(text)
    monkeypatch.setattr(calibration, "_best_ms", lambda run, repeats: (timed.append(len(target.passes)), run(), 1.0)[2])
    _grid_ms(target, [1, 2, 4], [16, 120], True, text)
    passes = target.passes
    for k in range(calibration.REPEATS):
        for j, n in enumerate((16, 120)):
            first = timed[(k * 2 + j) * 3]  # the index of this length's first timed pass
            assert passes[first - calibration.SETTLE:first] == [(n - k, 1)] * calibration.SETTLE
            assert [passes[i] for i in timed[(k * 2 + j) * 3:(k * 2 + j + 1) * 3]] == [(n - k, r) for r in (1, 2, 4)]
