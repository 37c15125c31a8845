"""Sampling settings and the distribution they define: temperature, top-k, min-p, top-p, and one draw from it."""
from __future__ import annotations

import dataclasses
import math
import numbers

import numpy as np

from speccompile.errors import SpeccompileError, given, option


class SamplingParamsError(SpeccompileError, ValueError):
    """A sampling setting out of range (a ValueError too, for callers that caught those before)."""


class UnknownOptionError(SpeccompileError, TypeError):
    """A keyword the call does not take (a TypeError too, as Python's own refusal of it is)."""


# what vLLM's SamplingParams holds that is not a sampling setting here: generate, stream and chat take it
_PER_CALL = {"max_tokens": "give generate, stream or chat max_new_tokens",
             "max_new_tokens": "give it to generate, stream or chat", "stop": "give it to generate, stream or chat",
             "n": "give generate a list of prompts", **dict.fromkeys(("ignore_eos", "stop_token_ids", "logprobs"),
                                                                  "give it to generate, stream or chat")}


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen: temperature 0 is greedy (and so is any temperature below GREEDY_BELOW); top_k
    0, top_p 1 and min_p 0 are off; a seed makes sampled output reproducible (greedy needs none)."""
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None
    # "exact" keeps the target's distribution; "typical" (lossy, opt-in) accepts a sampled draft token whenever
    # the target gives it more than min(typical_epsilon, typical_alpha * exp(-entropy)) (Medusa's typical
    # acceptance): more tokens per pass, a distribution that is no longer exactly the target's. Greedy is exact.
    acceptance: str = "exact"
    typical_epsilon: float = 0.09
    typical_alpha: float = 0.3
    # keep the tokens at least min_p times as probable as the likeliest one, after temperature (vLLM's min-p;
    # llama.cpp's samplers apply it before temperature): last of the fields, so that positional calls written
    # before it keep their meaning
    min_p: float = 0.0

    def __new__(cls, *args, **kwargs):
        """Keywords it does not hold refused by name, as generate's are: vLLM's SamplingParams holds max_tokens,
        stop, n and penalties, and the dataclass's own refusal would be a bare TypeError."""
        held = {f.name for f in dataclasses.fields(cls)}
        unknown = [name for name in kwargs if name not in held]
        if unknown:
            named = [f"{n!r} ({_PER_CALL.get(n, 'not supported')})" for n in unknown]
            raise UnknownOptionError(f"SamplingParams takes no option {', '.join(named)}: it holds temperature, "
                                     "top_k, top_p, min_p, seed, acceptance, typical_epsilon and typical_alpha")
        return super().__new__(cls)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def filtered_on_host(self) -> bool:
        """Top-p or min-p in effect: the distribution needs whole probability rows on the host (the graphs apply
        temperature and top-k alone)."""
        return self.top_p < 1.0 or self.min_p > 0.0

    @property
    def typical(self) -> bool:
        """Typical acceptance in effect: asked for, and sampling (greedy acceptance stays exact)."""
        return self.acceptance == "typical" and not self.greedy

    def __post_init__(self):
        def bad(what: str):
            raise SamplingParamsError(f"invalid sampling parameters: {what} ({self._settings()})")
        # compared as floats: a float16's comparison with MAX_TEMPERATURE would overflow the bound to inf
        if not _real(self.temperature) or not 0.0 <= float(self.temperature) <= MAX_TEMPERATURE:
            bad(f"{option('temperature')} must be a number from 0 to {MAX_TEMPERATURE:g} (0 = greedy)")
        if self.temperature < GREEDY_BELOW:
            object.__setattr__(self, "temperature", 0.0)
        if not _whole(self.top_k) or self.top_k < 0:
            bad(f"{option('top_k')} must be a whole number >= 0 (0 = off)")
        if not _real(self.top_p) or not 0.0 < self.top_p <= 1.0:
            bad(f"{option('top_p')} must be in (0, 1] (1 = off)")
        if not _real(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            bad(f"{option('min_p')} must be in [0, 1] (0 = off)")
        if self.seed is not None and (not _whole(self.seed) or not 0 <= self.seed < 2**64):
            bad(f"{option('seed')} must be a whole number in [0, 2**64)")
        if not isinstance(self.acceptance, str) or self.acceptance not in ACCEPTANCE:  # an array compares by element
            bad(f"{option('acceptance')} must be one of {', '.join(ACCEPTANCE)}, not {self.acceptance!r}")
        if not _real(self.typical_epsilon) or not 0.0 < self.typical_epsilon <= 1.0:
            bad(f"{option('typical_epsilon', flag='--acceptance typical:EPS')} must be in (0, 1]")
        if not _real(self.typical_alpha) or not 0.0 < self.typical_alpha <= 1.0:
            bad(f"{option('typical_alpha', flag='--acceptance typical:EPS,ALPHA')} must be in (0, 1]")
        # a Fraction, a Decimal: floats
        for name in ("temperature", "top_p", "min_p", "typical_epsilon", "typical_alpha"):
            object.__setattr__(self, name, float(getattr(self, name)))
        # numpy integers as Python ints: an unsigned top_k would wrap around when negated (np.partition's -k)
        for name in ("top_k", "seed"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, int(getattr(self, name)))

    def _settings(self) -> str:
        """The settings a refusal was given, each named as the caller spells it (temperature=1.0 in Python,
        --temperature 1.0 on the command line); a seed only where one was given, as no command line spells it unset.
        Each value cut short: a long string would fill the line. min_p too where it is set."""
        names = ("temperature", "top_k", "top_p", "min_p", "seed")
        shown = [given(name, getattr(self, name), limit=24) for name in names
                 if not (name == "seed" and self.seed is None
                         or name == "min_p" and _real(self.min_p) and float(self.min_p) == 0.0)]
        return ", ".join(shown)


ACCEPTANCE = ("exact", "typical")
# Temperatures below this are greedy, as in vLLM: logits / T would overflow float32 in the graph (and float64 on
# the host) into NaN, and T * G would fall below the float32 spacing of the logits it is added to, so ties would go
# to the lower token id instead of either with equal chance.
GREEDY_BELOW = 1e-5
# Temperatures above this are refused: far beyond it T * G overflows float32 in the graph, and the argmax of the
# infinities it leaves is the lowest token id, not a uniform draw (at this cap sampling is already uniform)
MAX_TEMPERATURE = 1e6


def acceptance_option(spec: str | None) -> dict:
    """"exact" | "typical[:EPS[,ALPHA]]" (the CLI's --acceptance) -> SamplingParams' acceptance fields."""
    if spec is not None and not isinstance(spec, str):
        raise SamplingParamsError(f"{given('acceptance', spec)}: use 'exact' or 'typical[:EPS[,ALPHA]]'")
    if spec is None or spec == "exact":  # "" names no rule: refused below, as a typo would be
        return {"acceptance": "exact"}
    kind, _, args = spec.partition(":")
    fields = args.split(",") if args else []  # by position: "typical:,0.2" sets ALPHA alone
    if kind != "typical" or len(fields) > 2:
        raise SamplingParamsError(f"{given('acceptance', spec)}: use 'exact' or 'typical[:EPS[,ALPHA]]'")
    try:
        values = {name: float(v) for name, v in zip(("typical_epsilon", "typical_alpha"), fields) if v.strip()}
    except ValueError:
        raise SamplingParamsError(f"{given('acceptance', spec)}: EPS and ALPHA are numbers") from None
    return {"acceptance": "typical", **values}


def _real(x) -> bool:
    """A finite real number, as a float too (an int such as 10**400 is not: float() overflows)."""
    if not isinstance(x, numbers.Real) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(float(x))
    except OverflowError:
        return False


def _whole(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def probabilities(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """logits [..., V] -> the distribution sampling draws from (float64), after temperature, top-k, min-p and top-p
    (vLLM's order: min-p before top-p; top-k and min-p keep the same tokens in either order)."""
    x = logits.astype(np.float64)
    x /= params.temperature
    x -= x.max(-1, keepdims=True)
    if params.top_k and params.top_k < x.shape[-1]:
        kth = np.partition(x, -params.top_k, axis=-1)[..., -params.top_k, None]
        x[x < kth] = -np.inf
    if params.min_p > 0.0:  # p >= min_p * p_max, in logits: x - x_max >= log(min_p), x_max being 0 here
        x[x < math.log(params.min_p)] = -np.inf
    p = np.exp(x, out=x)
    p /= p.sum(-1, keepdims=True)
    if params.top_p < 1.0:
        rows = p.reshape(-1, p.shape[-1])
        for row in rows:
            kept = nucleus(row, params.top_p)
            mass = row[kept]
            row[:] = 0.0
            row[kept] = mass / mass.sum()
    return p


# the nucleus is sought first among the tokens at least this share of the likeliest one's probability, then the next
NUCLEUS_SHARES = (1e-2, 1e-4, 1e-7)


def nucleus(p: np.ndarray, top_p: float) -> np.ndarray:
    """The tokens top-p sampling keeps from p [V], most probable first (ties by lower token id): the smallest such
    set whose mass reaches top_p, the token that crosses it included. Sought first among the tokens at least a
    share of the likeliest one's probability (NUCLEUS_SHARES): each such set is a top of the row's order (every
    token outside it strictly less probable), so its sorted sums are the whole row's first ones, and once they
    reach top_p the nucleus lies within it; else the whole row is sorted."""
    likeliest = p.max()
    for share in NUCLEUS_SHARES:
        kept = _nucleus(p, np.flatnonzero(p >= likeliest * share), top_p)
        if kept is not None:
            return kept
    return _nucleus(p, np.arange(len(p)), top_p, whole=True)


def _nucleus(p: np.ndarray, tokens: np.ndarray, top_p: float, whole: bool = False) -> np.ndarray | None:
    """The top-p nucleus within `tokens` (ascending ids, a top of the row's order), most probable first; None where
    their mass falls short of top_p (the nucleus reaches past them) and they are not the whole row."""
    order = tokens[np.argsort(-p[tokens], kind="stable")]  # stable over ascending ids: ties by lower id
    sorted_p = p[order]
    before = np.cumsum(sorted_p)
    if not whole and before[-1] < top_p:
        return None
    before -= sorted_p
    return order[:int(np.count_nonzero(before < top_p))]


NOISE_STREAM, DRAWS_STREAM = 0, 1  # a seed's two keyed streams: Gumbel noise (runtime/noise.py), PositionDraws


def seed_key(seed: int | None, stream: int) -> np.ndarray:
    """A request's key for one of its per-position streams (seed None: fresh entropy)."""
    return np.random.SeedSequence(seed).generate_state(2 * (stream + 1), np.uint64)[2 * stream:]


def at_position(key: np.ndarray, position: int) -> np.random.Generator:
    """One position's own generator in a keyed stream: any position's draws without the ones before it, and
    independent of every other position's. (A Philox counter set to the position would not do: a position's
    draws run through the counters of the positions after it, so a noise row would repeat the previous
    position's, shifted by four tokens.)"""
    return np.random.Generator(np.random.SFC64(np.random.SeedSequence([*key.tolist(), int(position)])))


class PositionDraws:
    """One uniform per position of a request's sequence, from its seed alone: the token at a position is drawn
    with that position's uniform however the passes were cut, so speculation that accepts the drafts equal to
    the target's draws (acceptance.accept_drawn) samples what plain sampling samples with the same seed."""

    def __init__(self, seed: int | None):
        self.key = seed_key(seed, DRAWS_STREAM)

    def uniform(self, position: int) -> float:
        return float(at_position(self.key, position).random())

    def token(self, logits: np.ndarray, params: SamplingParams, position: int) -> int:
        """The token at `position` drawn from one row of the target's logits [V], as `params` sample it."""
        return draw(probabilities(logits, params), self.uniform(position))


def sample(p: np.ndarray, rng: np.random.Generator) -> int:
    """One draw from p [V] by inverse CDF (robust to tiny rounding in the sum)."""
    return draw(p, rng.random())


def draw(p: np.ndarray, u: float) -> int:
    """The token at quantile u of p [V] (unnormalised is fine): what `sample` returns for the uniform u. Over a
    filtered row (top-k, top-p, min-p) the sums run over its kept tokens alone: the same sums, zeros adding
    nothing."""
    positive = p > 0
    kept = np.flatnonzero(positive) if np.count_nonzero(positive) * 4 < len(p) else None
    c = np.cumsum(p if kept is None else p[kept])
    at = int(min(np.searchsorted(c, u * c[-1], side="right"), len(c) - 1))
    return at if kept is None else int(kept[at])
