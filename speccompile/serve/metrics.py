"""Prometheus metrics (prometheus-client, one registry per app) and the `usage` object of a response.

Names follow vLLM's with this project's prefix (`speccompile:` for `vllm:`): requests (finished, refused, failed),
prompt and generation tokens, requests running and waiting, TTFT / per-output-token / end-to-end latency histograms,
the speculative-decoding counters (`spec_decode_num_drafts`, `..._num_draft_tokens`, `..._num_accepted_tokens`, and
`..._num_accepted_tokens_per_pos` by position), and the prompt cache's hits and queries in tokens.
"""
from __future__ import annotations

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics, generate_latest)

PREFIX = "speccompile:"
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)


def prompt_cache_tokens(stats: dict, prompt_tokens: int) -> tuple[int, int]:
    """(hit, miss) prompt tokens of one request: the one place the context cache's figures are read. A runtime
    without a cache reports none: 0 hits, the whole prompt missed."""
    hit = int(stats.get("prompt_cache_hit_tokens", 0) or 0)
    return hit, max(0, prompt_tokens - hit)


def accepted_per_position(stats: dict) -> list[int]:
    """Accepted draft tokens at each position (depth) over a request's verify passes, from the histogram of tokens
    committed per pass (a pass that commits c tokens accepted drafts at positions 0 .. c - 2)."""
    per_pass = {int(c): int(n) for c, n in (stats.get("committed_per_pass") or {}).items()}
    deepest = max(per_pass, default=1) - 1
    return [sum(n for c, n in per_pass.items() if c - 1 > pos) for pos in range(deepest)]


def usage(prompt_tokens: int, completion_tokens: int, stats: dict) -> dict:
    """OpenAI's usage (its prompt_tokens_details.cached_tokens: the cache's hits, as OpenAI's and vLLM's report
    them), DeepSeek's cache fields, and the speculative figures of the request."""
    hit, miss = prompt_cache_tokens(stats, prompt_tokens)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": hit},
            "prompt_cache_hit_tokens": hit, "prompt_cache_miss_tokens": miss,
            "mean_accepted_tokens": round(float(stats.get("mean_accepted_tokens", 1.0)), 4),
            "verify_passes": int(stats.get("verify_steps", 0))}


def choices_usage(prompt_tokens: int, outcomes: list) -> dict:
    """`usage` of a request over its choices (each with token_ids and stats): the prompt counted once (its cache
    figures the first choice's), the choices' tokens and verify passes summed, the tokens committed per pass over
    all of them."""
    first = usage(prompt_tokens, 0, outcomes[0].stats)
    passes = [int(o.stats.get("verify_steps", 0)) for o in outcomes]
    committed = sum(float(o.stats.get("mean_accepted_tokens", 1.0)) * n for o, n in zip(outcomes, passes))
    tokens = sum(len(o.token_ids) for o in outcomes)
    mean = round(committed / sum(passes), 4) if sum(passes) else first["mean_accepted_tokens"]
    return {**first, "completion_tokens": tokens, "total_tokens": prompt_tokens + tokens,
            "mean_accepted_tokens": mean, "verify_passes": sum(passes)}


class Metrics:
    def __init__(self, model: str):
        disable_created_metrics()  # no `_created` twin of every counter (a process-wide setting; vLLM's too)
        self.registry = CollectorRegistry()
        label = dict(labelnames=["model_name"], registry=self.registry)
        c = lambda name, doc: Counter(PREFIX + name, doc, **label).labels(model)  # noqa: E731
        self.requests = Counter(PREFIX + "request_success", "Requests finished, by finish reason",
                                labelnames=["model_name", "finished_reason"], registry=self.registry)
        self.refused = Counter(PREFIX + "request_refused", "Requests refused, by HTTP status",
                               labelnames=["model_name", "status"], registry=self.registry)
        self.failed = Counter(PREFIX + "request_failure", "Admitted requests that ended in an error, by HTTP status",
                              labelnames=["model_name", "status"], registry=self.registry)
        self.prompt_tokens = c("prompt_tokens", "Prompt tokens of finished requests")
        self.generation_tokens = c("generation_tokens", "Tokens generated")
        self.running = Gauge(PREFIX + "num_requests_running", "Requests generating", **label).labels(model)
        self.waiting = Gauge(PREFIX + "num_requests_waiting", "Requests admitted, before their first token",
                             **label).labels(model)
        h = lambda name, doc, buckets: Histogram(PREFIX + name, doc, buckets=buckets, **label).labels(model)  # noqa: E731
        self.ttft = h("time_to_first_token_seconds", "Time from arrival to the first token", LATENCY_BUCKETS)
        self.tpot = h("time_per_output_token_seconds", "Per-token latency after the first token", TOKEN_BUCKETS)
        self.e2e = h("e2e_request_latency_seconds", "Arrival to the last token", LATENCY_BUCKETS)
        self.drafts = c("spec_decode_num_drafts", "Verify passes that checked drafted tokens")
        self.draft_tokens = c("spec_decode_num_draft_tokens", "Drafted tokens verified")
        self.accepted_tokens = c("spec_decode_num_accepted_tokens", "Drafted tokens accepted")
        self.accepted_per_pos = Counter(PREFIX + "spec_decode_num_accepted_tokens_per_pos",
                                        "Drafted tokens accepted, by position in the draft",
                                        labelnames=["model_name", "position"], registry=self.registry)
        self.cache_queries = c("prefix_cache_queries", "Prompt tokens looked up in the context cache")
        self.cache_hits = c("prefix_cache_hits", "Prompt tokens found in the context cache")
        self.model = model

    def finished(self, prompt_tokens: int, completion_tokens: int, stats: dict, reason: str,
                 ttft_s: float | None, total_s: float) -> None:
        """One request's figures, when it ends (cancelled requests count their tokens too)."""
        self.requests.labels(self.model, reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        self.e2e.observe(total_s)
        if ttft_s is not None and completion_tokens > 1:
            self.tpot.observe((total_s - ttft_s) / (completion_tokens - 1))
        passes = int(stats.get("verified_in_graph", 0)) + int(stats.get("verified_on_host", 0))
        committed = sum(int(c) * int(n) for c, n in (stats.get("committed_per_pass") or {}).items())
        self.drafts.inc(passes)
        self.draft_tokens.inc(int(stats.get("proposed", 0)))
        self.accepted_tokens.inc(max(0, committed - int(stats.get("verify_steps", 0))))
        for pos, n in enumerate(accepted_per_position(stats)):
            self.accepted_per_pos.labels(self.model, str(pos)).inc(n)
        hit, _ = prompt_cache_tokens(stats, prompt_tokens)
        self.cache_queries.inc(prompt_tokens)
        self.cache_hits.inc(hit)

    def failure(self, status: int) -> None:
        """An admitted request that ended in an error (a runtime refusal, a bug): counted, or the requests a server
        answered with errors would show in /metrics only as a first token (their TTFT) and nowhere else."""
        self.failed.labels(self.model, str(status)).inc()

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
