"""Sampling settings and the distribution they define: temperature, top-k, top-p, and one draw from it."""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"invalid sampling parameters: temperature={self.temperature}, top_k={self.top_k}, "
                             f"top_p={self.top_p}")


def probabilities(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """logits [..., V] -> the distribution sampling draws from (float64), after temperature, top-k and top-p."""
    x = logits.astype(np.float64) / params.temperature
    x -= x.max(-1, keepdims=True)
    if params.top_k and params.top_k < x.shape[-1]:
        kth = np.partition(x, -params.top_k, axis=-1)[..., -params.top_k, None]
        x = np.where(x < kth, -np.inf, x)
    p = np.exp(x)
    p /= p.sum(-1, keepdims=True)
    if params.top_p < 1.0:
        order = np.argsort(-p, axis=-1)
        sorted_p = np.take_along_axis(p, order, -1)
        # keep the smallest set whose mass reaches top_p (the token that crosses it included)
        keep_sorted = np.cumsum(sorted_p, -1) - sorted_p < params.top_p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, -1)
        p = np.where(keep, p, 0.0)
        p /= p.sum(-1, keepdims=True)
    return p


def sample(p: np.ndarray, rng: np.random.Generator) -> int:
    """One draw from p [V] by inverse CDF (robust to tiny rounding in the sum)."""
    c = np.cumsum(p)
    return int(min(np.searchsorted(c, rng.random() * c[-1], side="right"), len(p) - 1))
