"""Sampling by the argmax: the Gumbel-max trick, its noise drawn per position of the sequence.

With G_v independent standard Gumbel draws, argmax_v(logits_v + T * G_v) is an exact draw from
softmax(logits / T). A target graph with the exact greedy head adds such noise rows before its argmax (input
sample_noise, speccompile.graphs), so a sampled pass costs what a greedy one does: the int8 screen certifies the
noisy argmax as it does the plain one, no float32 head product, no softmax over the vocabulary. A request sampled
this way runs the greedy decode loop with its noise fed to the target: a draft is accepted when it equals the
target's draw, so a deterministic candidate x is taken with probability p(x), as the sampled rule takes it.

The noise for the token at position t depends only on the request's seed and t, not on how the passes were cut:
speculative decoding samples, token for token, what plain decoding samples with the same seed, as greedy
speculation gives greedy decoding's tokens. The rows come from speccompile's kernel library where the CPU has
AVX-512 (`speccompile_gumbel_row`: SplitMix64 and two vectorised logs, faster than numpy), else from numpy's
generator per position: both exact Gumbel noise, but a seed's samples differ between the two kinds of machine.
Top-k too, where the graphs take noise_top_k: the argmax is then
taken among the k largest logits only, an exact draw from the top-k distribution. Top-p requests are sampled on
the host (the nucleus needs the whole vocabulary's normaliser), with uniforms per position to the same effect
(runtime/sampling.py PositionDraws, runtime/acceptance.py accept_drawn).

Typical acceptance (lossy, opt-in) runs the same passes: its rule reads the verified rows' logits (the exact head's
screened estimates, float32 where the screen falls back) on the host, and the token after the typical path is the
argmax there, an exact draw; plain steps are plain sampling's (runtime/acceptance.py TypicalRule).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from speccompile.plugins import q4_matmul
from speccompile.runtime.acceptance import TypicalRule
from speccompile.runtime.sampling import NOISE_STREAM, SamplingParams, at_position, seed_key

GREEDY = SamplingParams()  # what the decode loop runs for a request sampled by noise


@dataclasses.dataclass(frozen=True)
class NoiseSupport:
    """What the target's graphs (the single-sequence one and its batched form) sample by noise: temperature
    (input sample_noise) and top-k (input noise_top_k). True when temperature is."""
    temperature: bool = False
    top_k: bool = False

    def __bool__(self) -> bool:
        return self.temperature


EVERYTHING = NoiseSupport(True, True)


def by_noise(params: SamplingParams, support: NoiseSupport = EVERYTHING) -> bool:
    """Whether these settings can be sampled by the argmax: temperature, top-k where the graphs take it, no top-p
    or min-p (typical acceptance too: its rule reads the pass's rows on the host, its draws are the argmaxes)."""
    return (support.temperature and not params.greedy and not params.filtered_on_host
            and (params.top_k == 0 or support.top_k))


def runs_greedy(params: SamplingParams, support: NoiseSupport) -> bool:
    """Whether the decode loop runs these settings as greedy passes (through the exact greedy head's screen)."""
    return params.greedy or by_noise(params, support)


class NoiseRows(list):
    """A pass's noise rows, one [V] float32 array per row, and the request's top_k (0: off), which the graph
    applies with them."""
    top_k = 0


class GumbelNoise:
    """temperature * G rows, one per position, for one request; a position's row is kept until the request
    moves past it (a verify pass's rejected positions are drawn again by the next pass). top_k (0: off): the
    request's, handed to the graph with each pass's rows. typical: the request's typical acceptance (lossy, asked
    for; None: exact), which the decode loop applies to the pass's rows in place of the argmax's."""

    typical: TypicalRule | None = None

    def __init__(self, seed: int | None, temperature: float, vocab_size: int, top_k: int = 0):
        self.key = seed_key(seed, NOISE_STREAM)
        self.temperature, self.vocab_size = temperature, vocab_size
        self.top_k = top_k if 0 < top_k < vocab_size else 0  # k >= V keeps every token, as sampling.py does
        self._rows: dict[int, np.ndarray] = {}
        self._spare: list[np.ndarray] = []  # rows of positions passed, drawn over again (no allocation a token)
        self._exponentials = np.empty(vocab_size)  # float64 scratch of each draw

    def rows(self, positions) -> NoiseRows:
        """The noise added to the logits of the token at each position: one [V] float32 row each, kept here (read
        them, do not write them); the engines copy them into their bound buffers."""
        positions = [int(p) for p in np.ravel(positions)]
        for p in [p for p in self._rows if p < min(positions)]:  # passed: never asked for again
            self._spare.append(self._rows.pop(p))
        out = NoiseRows(self._row(p) for p in positions)
        out.top_k = self.top_k
        return out

    def _row(self, position: int) -> np.ndarray:
        if position not in self._rows:
            self._rows[position] = self._draw(position)
        return self._rows[position]

    def perturbed(self, logits: np.ndarray, positions, token_map: np.ndarray | None = None) -> np.ndarray:
        """A drafter's logits [len(positions), V'] for the tokens at `positions`, plus this request's noise there
        (token_map: a reduced draft vocabulary's target ids): their argmax is the drafter's draw coupled to the
        target's (runtime/drafters/base.py Drafter.couple). Rows asked for ahead of the target are kept for it."""
        rows = [self._row(int(p)) for p in np.ravel(positions)]  # kept for the target's pass: none passed yet
        out = np.array(logits, np.float32).reshape(len(rows), -1)  # the one copy: the rows are added in place
        if self.top_k and self.top_k < out.shape[1]:  # the target draws among its top k: the drafter among its own
            below = np.argpartition(out, -self.top_k, axis=1)[:, :-self.top_k]
            np.put_along_axis(out, below, -np.inf, axis=1)
        for line, row in zip(out, rows):
            line += row if token_map is None else row[token_map]
        return out

    def _draw(self, position: int) -> np.ndarray:
        row = self._spare.pop() if self._spare else np.empty(self.vocab_size, np.float32)
        if q4_matmul.gumbel_row(self.key, position, self.temperature, row):
            return row
        # float64 exponentials: a float32 one is exactly 0 (infinite noise, a token forced) about once in 2**23
        # draws, every few hundred rows of a large vocabulary
        e = self._exponentials
        at_position(self.key, position).standard_exponential(out=e)
        row[:] = e
        np.log(row, out=row)
        row *= -self.temperature  # T * G, G = -log(E) for E ~ Exp(1)
        return row


def sampled_by_noise(params: SamplingParams, support: NoiseSupport, vocab_size: int
                     ) -> tuple[SamplingParams, GumbelNoise | None]:
    """(the settings the decode loop runs, the request's noise): greedy settings and the noise where the target
    graphs take it and the request can be sampled by the argmax; else the settings as they are and None."""
    if by_noise(params, support):
        noise = GumbelNoise(params.seed, params.temperature, vocab_size, params.top_k)
        if params.typical:
            noise.typical = TypicalRule(params.temperature, noise.top_k, params.typical_epsilon, params.typical_alpha)
        return GREEDY, noise
    return params, None


def coupling(noise: GumbelNoise | None) -> GumbelNoise | None:
    """What a request's drafters couple their drafts to (Drafter.couple): its noise, but none under typical
    acceptance, whose rule takes a drafter's likeliest tokens more often than its draws."""
    return None if noise is None or noise.typical else noise


def takes_noise(target, batch_entry: dict | None) -> NoiseSupport:
    """What the target's graph (an Engine) and its batched form (manifest entry, if any) sample by noise."""
    batched = {i["name"] for i in batch_entry["inputs"]} if batch_entry else {"sample_noise", "noise_top_k"}
    temperature = target.takes_noise and "sample_noise" in batched
    return NoiseSupport(temperature, temperature and target.takes_noise_top_k and "noise_top_k" in batched)
