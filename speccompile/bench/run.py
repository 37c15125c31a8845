"""`speccompile bench`: Spec-Bench-style decode benchmark of a bundle, speculative against autoregressive.

One process; after an untimed warm-up, every method (plain autoregressive decoding of the compiled target, then
each chosen drafter) decodes each prompt greedily, methods interleaved prompt by prompt in an order shuffled afresh
each round (seeded), so no method keeps running right after the same other one. With `repeats` R each prompt is
decoded R times per method and the fastest run is kept (best-of-R: noise on a shared machine only ever slows a run
down). A run's time covers
prompt ids to the last token, prefill included, measured outside the method the same way for every method.
`compare_transformers` then runs the same target (and, where transformers has one, the same drafting) through
transformers `generate`, in a second phase, so that the peak memory of the first phase is speccompile's alone.
The result document is described in speccompile.bench.report.
"""
from __future__ import annotations

import os
import random
import tempfile
import time
from typing import Callable

from speccompile import load
from speccompile.bench.concurrency import check_stream_counts, measure_concurrency
from speccompile.bench.machine import measure_machine_bandwidth, peak_rss_mib
from speccompile.bench.methods import (check_parts_named, choose_drafters, named_as_drafter, speccompile_methods,
                                       split_acceptance, split_method)
from speccompile.bench.peers import transformers_methods
from speccompile.bench.prompts import default_dataset, load_questions, pick_prompts
from speccompile.bench.report import result_document
from speccompile.bench.settings import BenchSettings, Method
from speccompile.bench.stats import repeated_ngram_share
from speccompile.errors import SpeccompileError
from speccompile.format.trees import TreeSpec
from speccompile.runtime.sampling import GREEDY_BELOW, SamplingParams, acceptance_option
from speccompile.runtime.sessions import check_threads


def timed_run(method: Method, ids: list[int], max_new_tokens: int, eos: set[int]) -> dict:
    t0 = time.perf_counter()
    out = method.run(ids, max_new_tokens)
    seconds = time.perf_counter() - t0
    tokens = [int(t) for t in out["token_ids"]]
    end = next((i + 1 for i, t in enumerate(tokens) if t in eos), len(tokens))  # EOS counts, as ours counts it
    tokens = tokens[:end]
    stats = out.get("stats") or {}
    return {"token_ids": tokens, "seconds": seconds, "new_tokens": len(tokens),
            "tokens_per_second": len(tokens) / seconds,
            "ttft_s": stats.get("ttft_s"), "mean_accepted_tokens": stats.get("mean_accepted_tokens"),
            "verify_steps": stats.get("verify_steps"),
            "committed_per_pass": {str(n): c for n, c in sorted(stats["committed_per_pass"].items())}
            if "committed_per_pass" in stats else None,
            "acceptance_rate_per_depth": stats.get("acceptance_rate_per_depth"),
            "draft_nodes_per_pass": stats["proposed"] / stats["verify_steps"] if stats.get("verify_steps") else None,
            "plain_pass_share": (stats["adaptive"]["plain_passes"] / stats["adaptive"]["passes"]
                                 if (stats.get("adaptive") or {}).get("passes") else None),
            "plain_passes": (stats.get("adaptive") or {}).get("plain_passes"),
            "achieved_weight_bandwidth_gbps": stats.get("achieved_weight_bandwidth_gbps"),
            "time_shares": time_shares(out.get("graph_s"), seconds),
            "repeated_ngram_share": repeated_ngram_share(ids, tokens)}


def time_shares(graph_s: dict | None, seconds: float) -> dict | None:
    """Where a run's wall time went: the target's graph, the drafters' graphs, and the host (everything else:
    tokenizing, planning, binding, acceptance on the host)."""
    if graph_s is None or seconds <= 0:
        return None
    target, drafter = graph_s["target"] / seconds, graph_s["drafter"] / seconds
    return {"target": target, "drafter": drafter, "host": max(0.0, 1.0 - target - drafter)}


def measure(methods: list[Method], prompts: list[dict], settings: BenchSettings, eos: set[int],
            on_run: Callable[[str], None]) -> None:
    """Fill each prompt's `runs` with the best of `repeats` runs per method, methods interleaved and shuffled."""
    for m in methods:  # warm-up: first runs allocate arenas and page in weights
        timed_run(m, prompts[0]["ids"], min(settings.warmup_tokens, settings.max_new_tokens), eos)
    shuffle = random.Random(0).shuffle
    for p in prompts:
        best: dict[str, dict] = {}
        for _ in range(settings.repeats):
            order = list(methods)
            shuffle(order)  # a fresh order every round: no method keeps the same neighbour (cache, clock, heat)
            for m in order:
                run = timed_run(m, p["ids"], settings.max_new_tokens, eos)
                if m.name not in best or run["seconds"] < best[m.name]["seconds"]:
                    best[m.name] = run
                on_run(f"{p['category']} {m.name}")
        for m in methods:
            run = best[m.name]
            run["identical_to_autoregressive"] = run["token_ids"] == best[m.baseline]["token_ids"]
        p.setdefault("runs", {}).update(best)


def check_settings(settings: BenchSettings) -> None:
    """Refuse settings that could not run, or that a run would ignore, before anything is loaded or timed."""
    if settings.repeats < 1:
        raise SpeccompileError(f"--repeats {settings.repeats}: must be at least 1")
    if settings.stream_repeats is not None and settings.stream_repeats < 1:
        raise SpeccompileError(f"--stream-repeats {settings.stream_repeats}: must be at least 1")
    if settings.limit is not None and settings.limit < 1:
        raise SpeccompileError(f"--limit {settings.limit}: must be at least 1")
    if settings.max_new_tokens < 1:
        raise SpeccompileError(f"--max-new-tokens {settings.max_new_tokens}: must be at least 1")
    check_threads(settings.threads)  # before the bandwidth probe's worker processes get it
    check_stream_counts(settings.streams)
    if settings.streams and settings.stream_requests < 1:
        raise SpeccompileError(f"--stream-requests {settings.stream_requests}: must be at least 1")
    # values out of range: their own error; a temperature below sampling.GREEDY_BELOW decodes greedily, as 0 does
    if settings.top_k and SamplingParams(settings.temperature, settings.top_k).greedy:
        raise SpeccompileError(f"--top-k {settings.top_k}: samples, so it needs a --temperature of at least "
                               f"{GREEDY_BELOW:g} (greedy decoding has no top-k)")
    for spec in settings.drafters:  # values out of range: their own error, before the machine is measured
        check_parts_named(spec)
        acceptance = split_acceptance(spec)[1]
        with named_as_drafter(spec):  # the acceptance and tree a method names come inside its --drafter
            params = SamplingParams(settings.temperature, settings.top_k, **acceptance_option(acceptance))
            own_tree = split_method(spec)[1]
            if own_tree:
                TreeSpec.parse(own_tree)
        if acceptance not in (None, "exact") and params.greedy:  # greedy acceptance is exact whatever it asks for
            raise SpeccompileError(f"--drafter {spec}: typical acceptance is for sampling (give --temperature); "
                                   "greedy decoding is exact")
    SamplingParams(settings.temperature, settings.top_k)


class Benchmark:
    """A prepared benchmark: the constructor loads the prompts and every method (and measures the machine), so
    that `total_runs` is known before `run` times anything."""

    def __init__(self, bundle_dir: str, settings: BenchSettings, log: Callable[[str], None] = lambda msg: None):
        check_settings(settings)
        self.bundle_dir, self.settings = bundle_dir, settings
        self.dataset = settings.dataset or default_dataset()
        questions = load_questions(self.dataset, settings.categories)
        self.loadavg = os.getloadavg()[0]  # before our own load: a busy machine is worth knowing about
        log("measuring the machine's memory bandwidth")
        self.bandwidth = measure_machine_bandwidth(settings.threads or os.cpu_count() or 1)

        # without the context cache: every method prefills each prompt itself, as the runs it is compared with do
        self.gen = load(bundle_dir, threads=settings.threads, context_cache=False)
        if settings.max_new_tokens >= self.gen.max_seq_len:
            raise SpeccompileError(f"--max-new-tokens {settings.max_new_tokens}: leaves no room for a prompt in the "
                                   f"compiled context of {self.gen.max_seq_len} tokens")
        self.prompts, self.skipped = pick_prompts(questions, settings.limit, self.gen.encode_chat,
                                                  self.gen.max_seq_len - settings.max_new_tokens)
        if self.skipped:
            log(f"skipped {len(self.skipped)} questions too long for the compiled context of "
                f"{self.gen.max_seq_len} tokens: {', '.join(map(str, self.skipped))}")
        self.drafters = choose_drafters(self.gen, settings.drafters, settings.tree)
        self.ours = speccompile_methods(self.gen, self.drafters, settings.tree, settings.temperature,
                                        settings.top_k)
        self.theirs: list[Method] = []
        self.workdir = tempfile.TemporaryDirectory(prefix="speccompile-bench-")
        if settings.compare_transformers:  # checked now, loaded after our phase (see transformers_methods)
            self.theirs = transformers_methods(self.gen, self.drafters, settings.threads, self.workdir.name, log,
                                               settings.temperature, settings.top_k, settings.tree)
        self.log = log

    @property
    def total_runs(self) -> int:
        s = self.settings
        serving = (s.stream_repeats or s.repeats) * (len(s.streams) + 1) if s.streams else 0  # concurrency runs
        return len(self.prompts) * s.repeats * (len(self.ours) + len(self.theirs)) + serving

    def run(self, on_run: Callable[[str], None] = lambda label: None) -> dict:
        """Time every method (`on_run` is called after each timed run); return the result document."""
        eos = set(self.gen.tokenizer.eos_token_ids)
        s = self.settings
        try:
            measure(self.ours, self.prompts, s, eos, on_run)
            concurrency = measure_concurrency(self.gen, self.prompts, s.max_new_tokens, s.streams, s.stream_requests,
                                              self.concurrency_method(), s.stream_repeats or s.repeats, self.log,
                                              on_run) if s.streams else None
            rss_ours = peak_rss_mib()  # speccompile's phases, the concurrency mode's sequence slots included
            if self.theirs:
                self.log("loading the target in transformers")
                measure(self.theirs, self.prompts, s, eos, on_run)
        finally:
            self.workdir.cleanup()
        doc = result_document(self, rss_ours)
        if concurrency:
            doc["concurrency"] = concurrency
        return doc


    def concurrency_method(self) -> str | None:
        """The first chosen drafter as the concurrency mode runs it: NAME[@TREE], the tree --tree gives unless
        the method names its own (greedy, so an acceptance suffix would change nothing and is left off)."""
        if not self.drafters:
            return None
        name, tree = split_method(self.drafters[0])
        tree = tree or self.settings.tree
        return f"{name}@{tree}" if tree else name


def run_bench(bundle_dir: str, settings: BenchSettings, log: Callable[[str], None] = lambda msg: None) -> dict:
    return Benchmark(bundle_dir, settings, log).run()
