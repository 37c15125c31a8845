"""What a benchmark run is asked to do (BenchSettings) and what it measures (Method), shared by every bench module."""
from __future__ import annotations

import dataclasses
from typing import Callable

SCHEMA_VERSION = 1  # of the result document (speccompile.bench.report)
AUTOREGRESSIVE = "autoregressive"
TRANSFORMERS = "transformers"


@dataclasses.dataclass
class BenchSettings:
    dataset: str | None = None  # Spec-Bench jsonl; None: the small set shipped with the package
    categories: tuple[str, ...] = ()  # empty: every category
    limit: int | None = None
    max_new_tokens: int = 128
    drafters: tuple[str, ...] = ()  # empty: every drafter of the bundle
    tree: str | None = None
    repeats: int = 1
    threads: int | None = None
    compare_transformers: bool = False
    warmup_tokens: int = 16
    streams: tuple[int, ...] = ()  # concurrency mode (bench/concurrency.py): these stream counts; empty: none
    stream_requests: int = 8  # requests the concurrency mode serves (the first prompts)
    stream_repeats: int | None = None  # rounds of the concurrency mode (None: `repeats`)
    temperature: float = 0.0  # 0: greedy; else every method samples, each run seeded by its prompt's position
    top_k: int = 0  # with a temperature: sample from the k likeliest tokens (0: off)


@dataclasses.dataclass
class Method:
    name: str
    engine: str  # "speccompile" | "transformers"
    drafter: str | None
    baseline: str  # the autoregressive method of the same engine
    counterpart: str | None  # for a transformers method: the speccompile method it mirrors
    run: Callable[[list[int], int], dict]  # (prompt ids, max new tokens) -> {token_ids, [generator stats]}

    def describe(self) -> dict:
        return {"name": self.name, "engine": self.engine, "drafter": self.drafter, "baseline": self.baseline,
                "counterpart": self.counterpart}


def decoding(settings: dict) -> str:
    """How a result's runs decoded, for its table and plot: greedy, or the temperature (and top-k)."""
    if not settings.get("temperature"):
        return "greedy"
    top_k = f", top-k {settings['top_k']}" if settings.get("top_k") else ""
    return f"temperature {settings['temperature']:g}{top_k}"
