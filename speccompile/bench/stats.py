"""The figures of a benchmark: medians, paired speedups, acceptance pooled over passes, how much answers repeat."""
from __future__ import annotations

import math
import statistics

import numpy as np

from speccompile.bench.settings import Method

REPEAT_NGRAM = 4


def repeated_ngram_share(prompt: list[int], output: list[int], n: int = REPEAT_NGRAM) -> float | None:
    """The share of the output's tokens that complete an n-gram seen earlier in prompt + output: how much an answer
    repeats itself or its prompt -- what prompt lookup and joined trees feed on, and what a small model's long
    greedy answers do a lot of. A speedup is worth reading next to it."""
    seq = list(prompt) + list(output)
    seen, hits = set(), 0
    for i in range(n - 1, len(seq)):
        gram = tuple(seq[i - n + 1:i + 1])
        hits += i >= len(prompt) and gram in seen
        seen.add(gram)
    return hits / len(output) if output else None


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def _ratio(a, b):
    return a / b if a is not None and b else None


def pooled_histogram(runs: list[dict]) -> dict[str, int] | None:
    hists = [r["committed_per_pass"] for r in runs if r["committed_per_pass"] is not None]
    if not hists:
        return None
    total: dict[int, int] = {}
    for h in hists:
        for n, c in h.items():
            total[int(n)] = total.get(int(n), 0) + c
    return {str(n): total[n] for n in sorted(total)}


def pooled_mean_accepted(hist: dict[str, int] | None) -> float | None:
    if hist is None:
        return None
    passes = sum(hist.values())
    return sum(int(n) * c for n, c in hist.items()) / passes if passes else 1.0  # no verify pass: plain decoding


def pooled_per_drafting_pass(runs: list[dict], hist: dict[str, int] | None) -> float | None:
    """Mean tokens committed by the passes that verified drafts, pooled over every run's passes (adaptive
    drafting's plain steps, which commit one token each, left out); None where a run does not count them."""
    if hist is None or any(r.get("plain_passes") is None for r in runs):
        return None
    passes, plain = sum(hist.values()), sum(r["plain_passes"] for r in runs)
    committed = sum(int(n) * c for n, c in hist.items())
    return 1.0 if passes <= plain else (committed - plain) / (passes - plain)


def mean_rate_per_depth(runs: list[dict]) -> list[float] | None:
    rates = [r["acceptance_rate_per_depth"] for r in runs if r["acceptance_rate_per_depth"] is not None]
    if not rates:
        return None
    depth = max((len(r) for r in rates), default=0)
    return [statistics.mean(r[d] for r in rates if len(r) > d) for d in range(depth)]


def prompt_speedups(prompts: list[dict], name: str, baseline: str) -> list[float]:
    """Each prompt's tokens/s under method `name` over its tokens/s under `baseline` (prompts as the runner fills
    them or as the result document lists them: both carry runs {method: {tokens_per_second}})."""
    return [p["runs"][name]["tokens_per_second"] / p["runs"][baseline]["tokens_per_second"] for p in prompts]


def geometric_mean(ratios: list[float]) -> float:
    return math.exp(statistics.mean(math.log(r) for r in ratios))


def paired_speedup(prompts: list[dict], method: Method) -> float:
    """Geometric mean over prompts of each prompt's speedup. Each prompt is compared with itself, decoded close in
    time, so prompt lengths and slow drifts of the machine cancel; every prompt counts, where a ratio of medians
    rests on the one or two prompts in the middle (and varies more from run to run on a busy machine)."""
    return geometric_mean(prompt_speedups(prompts, method.name, method.baseline))


def paired_interval(ratios: list[float], level: float = 0.95, draws: int = 4000) -> list[float] | None:
    """A bootstrap interval of the paired speedup over the prompts (resampled with replacement, a fixed seed):
    how far the geometric mean rests on which prompts were picked. It does not cover the machine's drift from
    one run to the next, which only another run measures. None under 3 prompts."""
    if len(ratios) < 3:
        return None
    logs = np.log(np.asarray(ratios, float))
    picks = np.random.default_rng(0).integers(0, len(logs), (draws, len(logs)))
    means = logs[picks].mean(axis=1)
    tail = (1 - level) / 2 * 100
    return [float(np.exp(np.percentile(means, tail))), float(np.exp(np.percentile(means, 100 - tail)))]


def _group_figures(method: Method, runs: list[dict], bandwidth_gbps: float) -> dict:
    hist = pooled_histogram(runs) if method.drafter else None
    bw = _median(r["achieved_weight_bandwidth_gbps"] for r in runs)
    return {
        "prompts": len(runs),
        "median_tokens_per_second": _median(r["tokens_per_second"] for r in runs),
        "mean_accepted_tokens": 1.0 if method.drafter is None else pooled_mean_accepted(hist),
        "acceptance_rate_per_depth": mean_rate_per_depth(runs) if method.drafter else None,
        "committed_per_pass": hist,
        "median_ttft_s": _median(r["ttft_s"] for r in runs),
        "median_achieved_bandwidth_gbps": bw,
        "bandwidth_fraction": _ratio(bw, bandwidth_gbps),
        "identical_to_autoregressive": sum(r["identical_to_autoregressive"] for r in runs) / len(runs),
        "repeated_ngram_share": _mean(r.get("repeated_ngram_share") for r in runs),
        "draft_nodes_per_pass": _mean(r.get("draft_nodes_per_pass") for r in runs) if method.drafter else None,
        "plain_pass_share": _mean(r.get("plain_pass_share") for r in runs),
        "mean_accepted_per_drafting_pass": pooled_per_drafting_pass(runs, hist) if method.drafter else None,
        "time_shares": mean_time_shares(runs),
    }


def mean_time_shares(runs: list[dict]) -> dict | None:
    """The runs' time shares (target graph, drafter graph, host), pooled by seconds: long runs weigh more."""
    timed = [r for r in runs if r.get("time_shares")]
    seconds = sum(r["seconds"] for r in timed)
    if not timed or seconds <= 0:
        return None
    return {k: sum(r["time_shares"][k] * r["seconds"] for r in timed) / seconds for k in timed[0]["time_shares"]}


def summarize_group(methods: list[Method], prompts: list[dict], bandwidth_gbps: float) -> dict:
    out = {m.name: _group_figures(m, [p["runs"][m.name] for p in prompts], bandwidth_gbps) for m in methods}
    for m in methods:  # ratios once every method's median is known
        s = out[m.name]
        s["speedup"] = _ratio(s["median_tokens_per_second"], out[m.baseline]["median_tokens_per_second"])
        s["paired_speedup"] = paired_speedup(prompts, m)
        s["paired_speedup_interval"] = paired_interval(prompt_speedups(prompts, m.name, m.baseline))
        theirs = next((t for t in methods if t.counterpart == m.name), None)
        s["speed_vs_transformers"] = (_ratio(s["median_tokens_per_second"],
                                             out[theirs.name]["median_tokens_per_second"]) if theirs else None)
    return out


def summarize(methods: list[Method], prompts: list[dict], bandwidth_gbps: float) -> dict:
    categories = list(dict.fromkeys(p["category"] for p in prompts))
    return {"overall": summarize_group(methods, prompts, bandwidth_gbps),
            "by_category": {c: summarize_group(methods, [p for p in prompts if p["category"] == c], bandwidth_gbps)
                            for c in categories}}
