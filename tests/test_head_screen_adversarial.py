"""The exact greedy head against crafted heads (speccompile/compile/graph/head_screen.py): rows whose float32 argmax
the int8 screen ranks low, exact ties between a candidate and a token outside the candidates, certification in a
pass where only some rows can be certified, and top-k sets the candidates do not hold. Each is built so that a
bound a little too small, a candidate count off by one or a tie certified would give another token than numpy's
float32 argmax (the lowest token id on ties)."""
import functools
import json

import numpy as np
import pytest

from speccompile.compile.graph.head_screen import CANDIDATES, TOP_K_CANDIDATES
from speccompile.compile.quantize.int8 import BLOCK
from speccompile.plugins import q4_matmul
from test_head_screen import H, V, head_session, run, top_k_reference

HIGH = slice(BLOCK, 2 * BLOCK)


@pytest.fixture(params=[False, True], ids=["onnxruntime", "kernels"])
def screen(request):
    """head_session over onnxruntime's MatMulNBits (the bound from the stored norms), and over speccompile's
    MatMulQ8Bound (the bound from the codes) where its kernels run."""
    if request.param and q4_matmul.unavailable():
        pytest.skip(f"speccompile's kernels cannot run here: {q4_matmul.unavailable()}")
    return functools.partial(head_session, kernels=request.param)  # the second block of x and of the head's rows


def ones_row() -> np.ndarray:
    """x: zeros in the first block, ones in the second (each one an exact int8 code, 127 steps of 1/127)."""
    x = np.zeros(H, np.float32)
    x[HIGH] = 1
    return x


def single(values) -> np.ndarray:
    """Head rows [len(values), H] with one nonzero weight each, at the second block's first dim (on the int8 grid):
    against ones_row() each row's logit is its value, within about 1% bound."""
    rows = np.zeros((len(values), H), np.float32)
    rows[:, BLOCK] = values
    return rows


def fillers(n: int, spread: float, exact: float = 0.0) -> np.ndarray:
    """n rows whose logit against ones_row() is `exact` but whose bound is large: +spread and -spread cancel."""
    rows = single(np.full(n, exact))
    rows[:, BLOCK + 1], rows[:, BLOCK + 2] = spread, -spread
    return rows


def head_of(*parts, rest: float = -0.5) -> np.ndarray:
    """The parts' rows, in order from token id 0, then low rows (logits about `rest` and below) to V tokens."""
    head = np.concatenate(parts).astype(np.float32)
    low = single(np.linspace(rest, rest - 1, V - len(head)))
    return np.concatenate([head, low]).astype(np.float32)


def float32_argmax(head, x, noise=None):
    logits = x.astype(np.float32) @ head.T
    return (logits if noise is None else logits + noise).argmax(-1)


def test_a_winner_the_screen_underestimates_by_x_rounding(screen):
    """x's small dims lie below half an int8 step of their block, so the screen reads them as 0: the winner's
    logit comes from them alone, and only a bound of a whole step per element (the block's max |x| / 127, not its
    mean) keeps it among the candidates ahead of 63 rows with larger estimates and a leader below it."""
    x = np.zeros(H, np.float32)
    x[0], x[1:BLOCK] = 127, 0.49
    x[BLOCK] = 127
    winner = np.zeros((1, H), np.float32)
    winner[0, 1:BLOCK] = 1  # logit 31 * 0.49, estimated 0
    leader = np.zeros((1, H), np.float32)
    leader[0, BLOCK] = 0.1  # logit 12.7, estimated exactly
    crowd = np.zeros((CANDIDATES - 1, H), np.float32)
    crowd[:, 1:BLOCK], crowd[:, BLOCK] = -1, 0.05  # logit 6.35 - 15.19, estimated 6.35
    for head in (head_of(crowd, leader, winner), head_of(winner, leader, crowd)):
        _, tok = run(screen(head), x[None], True)
        assert tok[0] == float32_argmax(head, x[None])[0] == list(head[:, 1]).index(1)


def test_a_winner_the_screen_underestimates_by_the_heads_grid(screen):
    """A head off the int8 grid: the winner's small weights round to code 0, so its estimate misses them, and only
    the grid's error term (|x|_2 times the L2 norm of the rounding of the row) covers the gap."""
    x = ones_row()
    winner = single([1.27])
    winner[0, BLOCK + 1:] = 0.0049  # below half its block's step (0.01): code 0; logit 1.4219, estimated 1.27
    leader = single([1.37])
    crowd = single(np.full(CANDIDATES - 1, 1.33))
    head = head_of(crowd, leader, winner, rest=0.5)
    _, tok = run(screen(head), x[None], True)
    assert tok[0] == float32_argmax(head, x[None])[0] == CANDIDATES


def one_beyond_the_candidates():
    """A head where, against ones_row(), the winner is the (CANDIDATES + 1)-th largest upper bound: the candidates
    (63 cancelling rows and a leader, every bound above the winner's) all have smaller logits, and the next bound
    after the winner's is below the leader's logit. Only comparing the leader with the winner's own bound falls
    back; returns (head, the winner's id)."""
    crowd = fillers(CANDIDATES - 1, 60.0)
    leader = fillers(1, 20.0, exact=0.6)
    winner = single([0.9])
    return head_of(crowd, leader, winner), CANDIDATES


def test_the_token_right_after_the_candidates_is_compared(screen):
    head, winner = one_beyond_the_candidates()
    _, tok = run(screen(head), ones_row()[None], True)
    assert tok[0] == float32_argmax(head, ones_row()[None])[0] == winner


def test_a_row_that_cannot_be_certified_sends_the_whole_pass_to_the_float32_product(screen):
    """In a pass of two rows, one certified (a clear winner) and one not: neither takes the other's answer."""
    head, winner = one_beyond_the_candidates()
    head[-1, BLOCK] = -3  # the low rows' last: far ahead against -x
    x = np.stack([-ones_row(), ones_row()])
    _, tok = run(screen(head), x, True)
    assert np.array_equal(tok, float32_argmax(head, x)) and tok[1] == winner and tok[0] == V - 1


def test_an_exact_tie_with_a_token_outside_the_candidates_falls_back(screen):
    """Token 0 (zero weights: logit 0, bound 0) ties exactly with 64 candidates (logit 0 as well, x orthogonal to
    them, but a bound above 0): their best equals the next bound, so certifying would give token 1, where
    numpy's argmax (and onnxruntime's) gives the lowest id, 0."""
    x = np.zeros(H, np.float32)
    x[0] = 1
    head = np.zeros((V, H), np.float32)
    head[1:CANDIDATES + 1, 1] = 1  # logit 0, estimate 0, bound 1.01 / 127
    head[CANDIDATES + 1:, 0] = -1
    _, tok = run(screen(head), x[None], True)
    assert tok[0] == float32_argmax(head, x[None])[0] == 0


def noise_at(boosts: dict[int, float]) -> np.ndarray:
    """sample_noise [1, V]: zero but at the given tokens."""
    noise = np.zeros((1, V), np.float32)
    for token, value in boosts.items():
        noise[0, token] = value
    return noise


def check_top_k(screen, head, noise, top_k, expected):
    sess = screen(head, noise=True, top_k=True)
    logits, ref = run(sess, ones_row()[None], False, noise, [top_k])
    assert ref[0] == top_k_reference(logits, noise, [top_k])[0] == expected
    _, tok = run(sess, ones_row()[None], True, noise, [top_k])
    assert tok[0] == expected


def test_top_k_candidates_are_picked_by_the_plain_bounds(screen):
    """top_k 1 keeps the largest logit alone, whatever its noise: a very negative noise must not drop it from the
    candidates (it is picked by its plain bound), or the next largest would be certified as the top-1 set."""
    head = head_of(single([100.0, 90.0]), rest=10.0)
    check_top_k(screen, head, noise_at({0: -1e4}), 1, 0)


def test_a_top_k_set_reaching_beyond_the_candidates_falls_back(screen):
    """Token 1 is the second largest logit but is no candidate (511 cancelling rows with larger bounds fill the
    512 with token 0): the top-2 set {0, 1} is not certified (its 2nd logit is not among the candidates), even
    though the candidates' noisy best clears every other bound."""
    crowd = fillers(TOP_K_CANDIDATES - 1, 6000.0)
    head = head_of(single([100.0, 90.0]), crowd, rest=10.0)
    noise = noise_at({1: 50.0, **{2 + i: 1000.0 for i in range(len(crowd))}})
    check_top_k(screen, head, noise, 2, 1)


def test_a_top_k_larger_than_the_candidates_falls_back(screen):
    """top_k 600 over 512 candidates that all clear the next bound: the top-600 set holds tokens outside them
    (the 600th logit ties with every low row), so the pass is not certified."""
    head = head_of(single(np.full(TOP_K_CANDIDATES, 100.0)), rest=50.0)
    head[TOP_K_CANDIDATES:, BLOCK] = 50  # 488 rows tied at the 600th logit: all in the top-600 set
    check_top_k(screen, head, noise_at({V - 1: 1000.0}), 600, V - 1)


def test_a_top_k_beyond_the_plain_candidates_is_certified(tmp_path, screen):
    """A pass with a top-k row rescores TOP_K_CANDIDATES per row: a top-100 set of a confident row is certified
    without the float32 product."""
    head = head_of(single(np.linspace(100, 99, 150)), rest=10.0)
    sess = screen(head, tmp_path, noise=True, top_k=True)
    noise = np.random.default_rng(7).gumbel(size=(1, V)).astype(np.float32)
    _, tok = run(sess, ones_row()[None], True, noise, [100])
    assert tok[0] == top_k_reference(ones_row()[None] @ head.T, noise, [100])[0]
    events = json.load(open(sess.end_profiling()))
    assert "ArgMax" not in {e["args"]["op_name"] for e in events if e.get("cat") == "Node"}


def test_a_winner_off_by_more_than_half_the_bound(screen):
    """The bound's factor 2 is needed: x rounds up by nearly half a step where the head's weights round up by
    nearly half of theirs (and one weight per block, its largest, sits on the grid where x rounds to 0), so the
    winner's estimate is off by a little more than half its bound. A leader between the winner's estimate plus
    half its bound and its logit, and 63 rows with larger bounds, would then be certified in its place."""
    x = np.zeros(H, np.float32)
    x[0], x[1], x[2:BLOCK] = 0.49, -127, -126.51  # x's codes: 0, -127, -127 (step 1)
    winner = np.zeros((1, H), np.float32)
    winner[0, 0], winner[0, 1:BLOCK] = 1, 0.51 / 127  # codes 127 and 1: logit -15.261, estimate -31
    leader, crowd, low = np.zeros((3, 1, H), np.float32), np.zeros((CANDIDATES - 1, H)), np.zeros((V - 65, H))
    leader[:, 0, 1] = 15.28 / 127, 15.32 / 127, 16.5 / 127  # logits -15.28 (leader), -15.32, -16.5 (crowd, low)
    crowd[:, 1], low[:, 1] = leader[1, 0, 1], np.linspace(leader[2, 0, 1], 0.2, len(low))
    head = np.concatenate([crowd, leader[0], winner, low]).astype(np.float32)
    _, tok = run(screen(head), x[None], True)
    assert tok[0] == float32_argmax(head, x[None])[0] == CANDIDATES
