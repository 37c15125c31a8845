"""The cost model's calibration (speccompile/runtime/calibration.py) times passes over text the target itself
expects: a screened greedy head (compile/graph/head_screen.py) costs what the text makes it cost, and over a
constant or random context it takes the float32 product on most passes, which decoding seldom does."""
import numpy as np

from speccompile.runtime import calibration
from speccompile.runtime.calibration import NO_REPEAT, TEXT_ANSWER, _grid_ms, _likely_text


class Cache:
    def __init__(self):
        self.tokens: list[int] = []

    @property
    def length(self) -> int:
        return len(self.tokens)

    def truncate(self, n: int) -> None:
        del self.tokens[n:]


class Target:
    """A target whose likeliest next token is the last one (greedy text from it would loop on one token), then
    the last one plus 1; it records what its cache holds."""
    vocab_size = 50

    def __init__(self):
        self.cache, self.passes = Cache(), []

    def forward(self, tokens, rows=None, full_logits=True):
        self.cache.tokens += [int(t) for t in tokens]
        self.passes.append((self.cache.length - len(tokens), len(tokens)))
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
    target.verifies, target.cache.tokens, seen = False, list(text), []
    monkeypatch.setattr(calibration, "_best_ms", lambda run, repeats: (run(), 1.0)[1])
    target.forward = lambda tokens, rows=None, full_logits=True: seen.append((target.cache.length, list(tokens)))
    _grid_ms(target, [1, 2], [40], True, text)
    assert sorted({n for n, _ in seen}) == list(range(40 - calibration.REPEATS + 1, 41))
    assert all(tokens == list(text[n:n + len(tokens)]) for n, tokens in seen)
