"""`speccompile bench`: Spec-Bench-style decode benchmark of a bundle, speculative against autoregressive.

One process; after an untimed warm-up, every method (plain autoregressive decoding of the compiled target, then
each chosen drafter) decodes each prompt greedily, methods interleaved prompt by prompt with the order rotated, so
no method always runs right after the same other one. With `repeats` R each prompt is decoded R times per method
and the fastest run is kept (best-of-R: noise on a shared machine only ever slows a run down). A run's time covers
prompt ids to the last token, prefill included, measured outside the method the same way for every method.
`compare_transformers` then runs the same target (and, where transformers has one, the same drafting) through
transformers `generate`, in a second phase, so that the peak memory of the first phase is speccompile's alone.

JSON result, schema_version 1 (all times in seconds, rates in tokens/s, bandwidths in GB/s = 1e9 bytes/s):

    schema_version    1
    created           ISO 8601 UTC time of the run
    machine           {platform, processor, cpu_count, loadavg_1min_before, memory_bandwidth_gbps}
                      memory_bandwidth_gbps: best of a few numpy copies of a 256 MiB array split over the
                      benchmark's threads, counting bytes read plus bytes written (STREAM "copy"), measured in a
                      child process at the start of the run
    versions          {speccompile, python, numpy, onnxruntime, tokenizers[, torch, transformers]}
    bundle            {path, source {kind, path, sha256}, max_seq_len,
                       target {model_type, num_layers, hidden_size, vocab_size, weight_bytes},
                       drafters [{name, kind, num_draft[, model]}]}
    settings          {dataset, dataset_sha256, categories, limit, max_new_tokens, drafters, tree, repeats, threads,
                       compare_transformers, warmup_tokens, skipped_questions}
                      skipped_questions: ids of questions too long for the compiled context (not decoded)
    methods           [{name, engine: "speccompile"|"transformers", drafter: str|null, baseline: str,
                        counterpart: str|null}]
                      baseline: the autoregressive method of the same engine (speedups are over it);
                      counterpart: for a transformers method, the speccompile method it mirrors
    peak_rss_mib      {speccompile: MiB after the speccompile phase, total: MiB at the end} (getrusage ru_maxrss)
    prompts           [{question_id, category, prompt_tokens, runs {method: RUN}}]
        RUN           {seconds, new_tokens, tokens_per_second, identical_to_autoregressive: bool,
                       ttft_s, mean_accepted_tokens, verify_steps, committed_per_pass {"n": passes},
                       acceptance_rate_per_depth [float], achieved_weight_bandwidth_gbps,
                       repeated_ngram_share: share of output tokens completing a 4-gram seen before in prompt +
                       output (how much the answer repeats itself)}
                      (the fields after identical_to_autoregressive are null for transformers methods)
    summary           {overall: GROUP, by_category: {category: GROUP}}
        GROUP         {method: {prompts, median_tokens_per_second, speedup, paired_speedup, mean_accepted_tokens,
                                 acceptance_rate_per_depth, committed_per_pass, median_ttft_s,
                                 median_achieved_bandwidth_gbps, bandwidth_fraction, identical_to_autoregressive,
                                 repeated_ngram_share (mean over prompts), speed_vs_transformers}}
                      speedup: median tokens/s over the baseline's median in the same group (ratio of medians);
                      paired_speedup: the geometric mean over prompts of each prompt's tokens/s over the
                      baseline's on the same prompt (what `speccompile gate` gates: steadier and more sensitive);
                      mean_accepted_tokens: tokens committed per verify pass, bonus token included, pooled over
                      the group's passes (1.0 for autoregressive); acceptance_rate_per_depth: the mean over prompts;
                      bandwidth_fraction: achieved weight bandwidth over machine.memory_bandwidth_gbps;
                      identical_to_autoregressive: the share of prompts whose tokens equal the baseline's;
                      speed_vs_transformers: median tokens/s over the transformers counterpart's (else null)
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib.resources
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable

from speccompile.errors import SpeccompileError
from speccompile.format.trees import TreeSpec

SCHEMA_VERSION = 1
AUTOREGRESSIVE = "autoregressive"
TRANSFORMERS = "transformers"
BANDWIDTH_ARRAY_MIB = 256


def default_dataset() -> str:
    return str(importlib.resources.files("speccompile") / "data" / "bench_prompts.jsonl")


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


# ---- prompts -------------------------------------------------------------------------------------------------------
def load_questions(path: str, categories: tuple[str, ...] = ()) -> dict[str, list[dict]]:
    """Spec-Bench questions by category, in file order, each as {question_id, category, text (first turn)}."""
    by_category: dict[str, list[dict]] = {}
    try:
        with open(path) as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                q = json.loads(line)
                if not isinstance(q, dict) or not isinstance(q.get("turns"), list) or not q["turns"] \
                        or "category" not in q:
                    raise SpeccompileError(f"{path}:{line_no}: not a Spec-Bench question (needs category, turns)")
                if not categories or q["category"] in categories:
                    by_category.setdefault(q["category"], []).append(
                        {"question_id": q.get("question_id"), "category": q["category"], "text": q["turns"][0]})
    except OSError as e:
        raise SpeccompileError(f"cannot read dataset {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise SpeccompileError(f"{path}: not JSON lines ({e})") from None
    missing = [c for c in categories if c not in by_category]
    if missing:
        raise SpeccompileError(f"no questions of category {', '.join(missing)} in {path}")
    return by_category


def pick_prompts(by_category: dict[str, list[dict]], limit: int | None, encode, max_prompt_tokens: int
                 ) -> tuple[list[dict], list]:
    """Round-robin over the categories, so that a few prompts still cover every category; a question whose prompt
    leaves no room for the answer in the compiled context is skipped. Returns (prompts with their ids, skipped
    question ids)."""
    picked, skipped = [], []
    queues = [list(q) for q in by_category.values()]
    while any(queues) and (limit is None or len(picked) < limit):
        for queue in queues:
            while queue and (limit is None or len(picked) < limit):
                q = queue.pop(0)
                q["ids"] = encode(q["text"])
                if len(q["ids"]) <= max_prompt_tokens:
                    picked.append(q)
                    break
                skipped.append(q["question_id"])
    if not picked:
        raise SpeccompileError(f"no prompt fits the compiled context with room for {max_prompt_tokens} prompt tokens")
    return picked, skipped


def sha256_of(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# ---- the machine ---------------------------------------------------------------------------------------------------
def copy_bandwidth_gbps(threads: int = 1, mib: int = BANDWIDTH_ARRAY_MIB, tries: int = 5) -> float:
    """Best of a few copies of a large array, split over `threads` (numpy releases the GIL while it copies); bytes
    read + bytes written over time, as STREAM's copy counts them."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    src = np.ones(mib * 2**20 // 8)
    dst = np.empty_like(src)
    bounds = np.linspace(0, len(src), threads + 1).astype(int)
    chunks = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(tries):
            t0 = time.perf_counter()
            list(pool.map(lambda chunk: np.copyto(dst[chunk], src[chunk]), chunks))
            best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best / 1e9


def measure_machine_bandwidth(threads: int) -> float:
    """In a child process: the probe's 512 MiB of arrays must not count in this process's peak memory."""
    code = f"from speccompile.bench.benchmark import copy_bandwidth_gbps; print(copy_bandwidth_gbps({int(threads)}))"
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if probe.returncode != 0:
        raise SpeccompileError(f"the memory bandwidth probe failed: {probe.stderr.strip()[-500:]}")
    return float(probe.stdout)


def peak_rss_mib() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def machine_info(bandwidth_gbps: float, loadavg: float) -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "loadavg_1min_before": loadavg, "memory_bandwidth_gbps": bandwidth_gbps}


def versions() -> dict:
    import numpy
    import onnxruntime
    import tokenizers
    from speccompile import __version__
    out = {"speccompile": __version__, "python": platform.python_version(), "numpy": numpy.__version__,
           "onnxruntime": onnxruntime.__version__, "tokenizers": tokenizers.__version__}
    for module in ("torch", "transformers"):  # only when --compare-transformers imported them
        if module in sys.modules:
            out[module] = sys.modules[module].__version__
    return out


def bundle_summary(bundle_dir: str, gen) -> dict:
    m = gen.manifest
    cfg = m["models"]["target"]["config"]
    return {"path": os.path.abspath(bundle_dir), "source": m["source"], "max_seq_len": m["max_seq_len"],
            "target": {"model_type": cfg["model_type"], "num_layers": m["models"]["target"]["num_layers"],
                       "hidden_size": cfg["hidden_size"], "vocab_size": cfg["vocab_size"],
                       "weight_bytes": gen.target.weight_bytes},
            "drafters": [{k: d[k] for k in ("name", "kind", "num_draft", "model") if k in d} for d in m["drafters"]]}


# ---- methods -------------------------------------------------------------------------------------------------------
def split_method(spec: str) -> tuple[str, str | None]:
    """"NAME@TREE" -> (drafter NAME, its tree for this method); "NAME" -> (NAME, None). One run may so measure a
    drafter through several trees against the same autoregressive runs."""
    name, _, tree = spec.partition("@")
    return name, tree or None


def speccompile_methods(gen, drafters: list[str], tree: str | None) -> list[Method]:
    def runner(drafter, tree):
        def run(ids, max_new_tokens):
            r = gen.generate(ids, max_new_tokens, drafter=drafter, speculate=drafter is not None, tree=tree)
            return {"token_ids": r.token_ids, "stats": r.stats}
        return run
    methods = [Method(AUTOREGRESSIVE, "speccompile", None, AUTOREGRESSIVE, None, runner(None, None))]
    for spec in drafters:
        name, own_tree = split_method(spec)
        methods.append(Method(spec, "speccompile", name, AUTOREGRESSIVE, None, runner(name, own_tree or tree)))
    return methods


def choose_drafters(gen, wanted: tuple[str, ...]) -> list[str]:
    """The methods to measure: drafter names, each optionally NAME@TREE (default: every drafter of the bundle)."""
    unknown = [d for d in wanted if split_method(d)[0] not in gen.drafter_names]
    if unknown:
        raise SpeccompileError(f"drafter {split_method(unknown[0])[0]!r} is not in this bundle (it has: "
                               f"{', '.join(gen.drafter_names) or 'none'})")
    for d in wanted:
        if split_method(d)[1]:
            TreeSpec.parse(split_method(d)[1])  # a bad tree fails here, before anything is timed
    if len(set(wanted)) != len(wanted):
        raise SpeccompileError("the same drafter (and tree) is named twice")
    return list(wanted) or gen.drafter_names


# ---- timing --------------------------------------------------------------------------------------------------------
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
            "achieved_weight_bandwidth_gbps": stats.get("achieved_weight_bandwidth_gbps"),
            "repeated_ngram_share": repeated_ngram_share(ids, tokens)}


def measure(methods: list[Method], prompts: list[dict], settings: BenchSettings, eos: set[int],
            on_run: Callable[[str], None]) -> None:
    """Fill each prompt's `runs` with the best of `repeats` runs per method, methods interleaved and rotated."""
    for m in methods:  # warm-up: first runs allocate arenas and page in weights
        timed_run(m, prompts[0]["ids"], min(settings.warmup_tokens, settings.max_new_tokens), eos)
    turn = 0
    for p in prompts:
        best: dict[str, dict] = {}
        for _ in range(settings.repeats):
            order = methods[turn % len(methods):] + methods[:turn % len(methods)]
            turn += 1
            for m in order:
                run = timed_run(m, p["ids"], settings.max_new_tokens, eos)
                if m.name not in best or run["seconds"] < best[m.name]["seconds"]:
                    best[m.name] = run
                on_run(f"{p['category']} {m.name}")
        for m in methods:
            run = best[m.name]
            run["identical_to_autoregressive"] = run["token_ids"] == best[m.baseline]["token_ids"]
        p.setdefault("runs", {}).update(best)


# ---- summary -------------------------------------------------------------------------------------------------------
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


def mean_rate_per_depth(runs: list[dict]) -> list[float] | None:
    rates = [r["acceptance_rate_per_depth"] for r in runs if r["acceptance_rate_per_depth"] is not None]
    if not rates:
        return None
    depth = max((len(r) for r in rates), default=0)
    return [statistics.mean(r[d] for r in rates if len(r) > d) for d in range(depth)]


def paired_speedup(prompts: list[dict], method: Method) -> float:
    """Geometric mean over prompts of each prompt's speedup. Each prompt is compared with itself, decoded close in
    time, so prompt lengths and slow drifts of the machine cancel; every prompt counts, where a ratio of medians
    rests on the one or two prompts in the middle (over 12 runs on a busy machine that varied 1.6 times as much)."""
    logs = [math.log(p["runs"][method.name]["tokens_per_second"] / p["runs"][method.baseline]["tokens_per_second"])
            for p in prompts]
    return math.exp(statistics.mean(logs))


def summarize_group(methods: list[Method], prompts: list[dict], bandwidth_gbps: float) -> dict:
    out = {}
    for m in methods:
        runs = [p["runs"][m.name] for p in prompts]
        hist = pooled_histogram(runs) if m.drafter else None
        bw = _median(r["achieved_weight_bandwidth_gbps"] for r in runs)
        out[m.name] = {
            "prompts": len(runs),
            "median_tokens_per_second": _median(r["tokens_per_second"] for r in runs),
            "mean_accepted_tokens": 1.0 if m.drafter is None else pooled_mean_accepted(hist),
            "acceptance_rate_per_depth": mean_rate_per_depth(runs) if m.drafter else None,
            "committed_per_pass": hist,
            "median_ttft_s": _median(r["ttft_s"] for r in runs),
            "median_achieved_bandwidth_gbps": bw,
            "bandwidth_fraction": _ratio(bw, bandwidth_gbps),
            "identical_to_autoregressive": sum(r["identical_to_autoregressive"] for r in runs) / len(runs),
            "repeated_ngram_share": _mean(r.get("repeated_ngram_share") for r in runs),
        }
    for m in methods:  # ratios once every method's median is known
        s = out[m.name]
        s["speedup"] = _ratio(s["median_tokens_per_second"], out[m.baseline]["median_tokens_per_second"])
        s["paired_speedup"] = paired_speedup(prompts, m)
        theirs = next((t for t in methods if t.counterpart == m.name), None)
        s["speed_vs_transformers"] = (_ratio(s["median_tokens_per_second"],
                                             out[theirs.name]["median_tokens_per_second"]) if theirs else None)
    return out


def summarize(methods: list[Method], prompts: list[dict], bandwidth_gbps: float) -> dict:
    categories = list(dict.fromkeys(p["category"] for p in prompts))
    return {"overall": summarize_group(methods, prompts, bandwidth_gbps),
            "by_category": {c: summarize_group(methods, [p for p in prompts if p["category"] == c], bandwidth_gbps)
                            for c in categories}}


# ---- the run -------------------------------------------------------------------------------------------------------
class Benchmark:
    """A prepared benchmark: the constructor loads the prompts and every method (and measures the machine), so
    that `total_runs` is known before `run` times anything."""

    def __init__(self, bundle_dir: str, settings: BenchSettings, log: Callable[[str], None] = lambda msg: None):
        if settings.repeats < 1:
            raise SpeccompileError(f"--repeats {settings.repeats}: must be at least 1")
        self.bundle_dir, self.settings = bundle_dir, settings
        self.dataset = settings.dataset or default_dataset()
        questions = load_questions(self.dataset, settings.categories)
        self.loadavg = os.getloadavg()[0]  # before our own load: a busy machine is worth knowing about
        log("measuring the machine's memory bandwidth")
        self.bandwidth = measure_machine_bandwidth(settings.threads or os.cpu_count() or 1)

        from speccompile import load
        self.gen = load(bundle_dir, threads=settings.threads)
        self.prompts, self.skipped = pick_prompts(questions, settings.limit, self.gen.encode_chat,
                                                  self.gen.max_seq_len - settings.max_new_tokens)
        if self.skipped:
            log(f"skipped {len(self.skipped)} questions too long for the compiled context of "
                f"{self.gen.max_seq_len} tokens: {', '.join(map(str, self.skipped))}")
        self.drafters = choose_drafters(self.gen, settings.drafters)
        self.ours = speccompile_methods(self.gen, self.drafters, settings.tree)
        self.theirs: list[Method] = []
        self.workdir = tempfile.TemporaryDirectory(prefix="speccompile-bench-")
        if settings.compare_transformers:
            log("loading the target in transformers")
            self.theirs = transformers_methods(self.gen, self.drafters, settings.threads, self.workdir.name, log)

    @property
    def total_runs(self) -> int:
        return len(self.prompts) * self.settings.repeats * (len(self.ours) + len(self.theirs))

    def run(self, on_run: Callable[[str], None] = lambda label: None) -> dict:
        """Time every method (`on_run` is called after each timed run); return the result document."""
        eos = set(self.gen.tokenizer.eos_token_ids)
        try:
            measure(self.ours, self.prompts, self.settings, eos, on_run)
            rss_ours = peak_rss_mib()
            if self.theirs:
                measure(self.theirs, self.prompts, self.settings, eos, on_run)
        finally:
            self.workdir.cleanup()
        return self.result(rss_ours)

    def result(self, rss_ours: float) -> dict:
        methods = self.ours + self.theirs
        return {
            "schema_version": SCHEMA_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(self.bandwidth, self.loadavg),
            "versions": versions(),
            "bundle": bundle_summary(self.bundle_dir, self.gen),
            "settings": {**dataclasses.asdict(self.settings), "dataset": self.dataset,
                         "dataset_sha256": sha256_of(self.dataset), "drafters": self.drafters,
                         "skipped_questions": self.skipped},
            "methods": [m.describe() for m in methods],
            "peak_rss_mib": {"speccompile": rss_ours, "total": peak_rss_mib()},
            "prompts": [{"question_id": p["question_id"], "category": p["category"], "prompt_tokens": len(p["ids"]),
                         "runs": {name: {k: v for k, v in r.items() if k != "token_ids"}
                                  for name, r in p["runs"].items()}}
                        for p in self.prompts],
            "summary": summarize(methods, self.prompts, self.bandwidth),
        }


def run_bench(bundle_dir: str, settings: BenchSettings, log: Callable[[str], None] = lambda msg: None) -> dict:
    return Benchmark(bundle_dir, settings, log).run()


def _make_parent(path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)


def write_json(result: dict, path: str) -> None:
    _make_parent(path)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")


# ---- transformers, for --compare-transformers (torch and transformers are imported only here) -------------------
def _hf_model_dir(source: dict, workdir: str) -> tuple[str, dict]:
    """Where transformers loads a bundle's model source from: (directory, from_pretrained extra kwargs)."""
    kind, path = source["kind"], source["path"]
    if kind == "gguf":
        return os.path.dirname(path), {"gguf_file": os.path.basename(path)}
    if kind == "hf":
        return path, {}
    if kind == "tiny":  # random-weight presets exist only in speccompile: write them out as an HF directory
        from speccompile.compile.sources import load_checkpoint, save_hf_dir
        out = os.path.join(workdir, path.replace(":", "_"))
        save_hf_dir(load_checkpoint(path, progress=lambda msg: None), out)
        return out, {}
    raise SpeccompileError(f"--compare-transformers: cannot load a model source of kind {kind!r}")


def load_hf_model(source: dict, workdir: str):
    import torch
    from transformers import AutoModelForCausalLM
    directory, extra = _hf_model_dir(source, workdir)
    if not os.path.exists(os.path.join(directory, extra.get("gguf_file", "config.json"))):
        raise SpeccompileError(f"--compare-transformers: the bundle's source {source['path']} is not on this machine")
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **extra).eval()


def _draft_the_same_way(model, num_draft: int) -> None:
    """transformers reads an assistant's draft length from the assistant's generation config; pin it to ours (a
    constant chain of num_draft tokens, no confidence cut-off) so both sides draft alike."""
    model.generation_config.num_assistant_tokens = num_draft
    model.generation_config.num_assistant_tokens_schedule = "constant"
    model.generation_config.assistant_confidence_threshold = 0.0


def transformers_drafting(gen, drafter: str, target, workdir: str) -> dict | None:
    """generate() kwargs that draft as the bundle's drafter does, or None where transformers has no counterpart."""
    d = next(d for d in gen.manifest["drafters"] if d["name"] == drafter)
    if d["kind"] == "lookup":
        return {"prompt_lookup_num_tokens": d["num_draft"], "max_matching_ngram_size": d.get("max_ngram", 3)}
    if d["kind"] == "layerskip":  # transformers' early-exit assistant: the target's first L layers + its head
        _draft_the_same_way(target, d["num_draft"])
        return {"assistant_early_exit": gen.manifest["models"][d["model"]]["num_layers"]}
    if d["kind"] == "model":
        assistant = load_hf_model(gen.manifest["models"][d["model"]]["source"], workdir)
        _draft_the_same_way(assistant, d["num_draft"])
        return {"assistant_model": assistant}
    return None


def transformers_methods(gen, drafters: list[str], threads: int | None, workdir: str, log) -> list[Method]:
    import torch
    import transformers
    transformers.logging.set_verbosity_error()  # its deprecation chatter would garble the progress bar
    transformers.logging.disable_progress_bar()
    if threads:
        torch.set_num_threads(threads)  # process-wide; the same core count as ours
    target = load_hf_model(gen.manifest["source"], workdir)
    eos = list(gen.tokenizer.eos_token_ids)

    def runner(drafting: dict):
        def run(ids, max_new_tokens):
            with torch.inference_mode():
                x = torch.tensor([ids], dtype=torch.long)
                out = target.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                      do_sample=False, eos_token_id=eos, pad_token_id=eos[0], **drafting)
            return {"token_ids": out[0, len(ids):].tolist()}
        return run

    base = f"{TRANSFORMERS}:{AUTOREGRESSIVE}"
    methods = [Method(base, TRANSFORMERS, None, base, AUTOREGRESSIVE, runner({}))]
    for d in drafters:
        drafting = None if split_method(d)[1] else transformers_drafting(gen, d, target, workdir)
        if drafting is None:
            log(f"transformers has no counterpart of drafter {d}; not compared")
            continue
        methods.append(Method(f"{TRANSFORMERS}:{d}", TRANSFORMERS, d, base, d, runner(drafting)))
    return methods


# ---- reporting -----------------------------------------------------------------------------------------------------
def _fmt(value, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if value is None else format(value, spec) + suffix


def format_table(result: dict) -> str:
    s, machine = result["settings"], result["machine"]
    lines = [f"{len(result['prompts'])} prompts, max_new_tokens {s['max_new_tokens']}, best of {s['repeats']}, "
             f"threads {s['threads'] or 'all'}, greedy; machine memory bandwidth "
             f"{machine['memory_bandwidth_gbps']:.1f} GB/s; peak RSS {result['peak_rss_mib']['speccompile']:.0f} MiB",
             ""]
    head = (f"{'category':16s} {'method':28s} {'tok/s':>7s} {'speedup':>7s} {'paired':>7s} {'acc.tok':>7s} "
            f"{'ttft ms':>7s} "
            f"{'GB/s':>6s} {'of peak':>7s} {'same':>5s} {'vs HF':>6s}")
    lines += [head, "-" * len(head)]
    groups = {"overall": result["summary"]["overall"], **result["summary"]["by_category"]}
    for group, figures in groups.items():
        for name, f in figures.items():
            ttft = f["median_ttft_s"] * 1000 if f["median_ttft_s"] is not None else None
            same = f["identical_to_autoregressive"]
            lines.append(f"{group:16s} {name:28s} {_fmt(f['median_tokens_per_second'], '.1f'):>7s} "
                         f"{_fmt(f['speedup'], '.2f', 'x'):>7s} {_fmt(f['paired_speedup'], '.2f', 'x'):>7s} "
                         f"{_fmt(f['mean_accepted_tokens']):>7s} "
                         f"{_fmt(ttft, '.0f'):>7s} {_fmt(f['median_achieved_bandwidth_gbps'], '.1f'):>6s} "
                         f"{_fmt(f['bandwidth_fraction'], '.0%'):>7s} {_fmt(same, '.0%'):>5s} "
                         f"{_fmt(f['speed_vs_transformers'], '.2f', 'x'):>6s}")
    lines.append("")
    for name, f in result["summary"]["overall"].items():
        if f["acceptance_rate_per_depth"]:
            rates = " ".join(f"{r:.2f}" for r in f["acceptance_rate_per_depth"])
            lines.append(f"acceptance rate per draft depth, {name}: {rates}")
    share = {g: f[AUTOREGRESSIVE].get("repeated_ngram_share") for g, f in groups.items() if AUTOREGRESSIVE in f}
    if any(v is not None for v in share.values()):
        lines.append(f"output repeating itself (tokens completing a {REPEAT_NGRAM}-gram seen before, autoregressive): "
                     + ", ".join(f"{g} {v:.0%}" for g, v in share.items() if v is not None))
    lines.append("speedup: ratio of medians over the same engine's autoregressive decoding; paired: geometric mean "
                 "of per-prompt speedups; acc.tok: tokens committed per verify pass; "
                 "GB/s: target weights streamed per second; of peak: share of the machine's copy bandwidth; "
                 "same: output identical to autoregressive; vs HF: over the transformers counterpart")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """Three panels: committed tokens per verify pass, speedup per category, tokens/s of each method."""
    try:
        import matplotlib
    except ImportError as e:
        raise SpeccompileError("--plot needs matplotlib: pip install 'speccompile[bench]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    overall, by_category = result["summary"]["overall"], result["summary"]["by_category"]
    speculative = [m["name"] for m in result["methods"] if m["drafter"] and m["engine"] == "speccompile"]
    many = len(speculative) > 3  # grouped bars stop being readable: the speedups become a table of colours
    fig, (ax_hist, ax_cat, ax_speed) = plt.subplots(
        1, 3, figsize=(22, 5.5) if many else (16, 4.5), gridspec_kw={"width_ratios": [1, 2.2, 1] if many else [1, 1, 1]})

    width = 0.8 / max(len(speculative), 1)
    for i, name in enumerate(speculative):
        hist = overall[name]["committed_per_pass"] or {}
        passes = sum(hist.values()) or 1
        xs = [int(n) + (i - (len(speculative) - 1) / 2) * width for n in hist]
        ax_hist.bar(xs, [c / passes for c in hist.values()], width, label=name)
    ax_hist.set(title="Tokens committed per verify pass", xlabel="tokens (accepted drafts + 1)",
                ylabel="share of passes")

    groups = {**by_category, "overall": overall}
    if many:
        _speedup_table(ax_cat, groups, speculative)
    else:
        for i, name in enumerate(speculative):
            xs = [j + (i - (len(speculative) - 1) / 2) * width for j in range(len(groups))]
            ax_cat.bar(xs, [g[name]["speedup"] or 0 for g in groups.values()], width, label=name)
        ax_cat.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax_cat.set_xticks(range(len(groups)), groups, rotation=30, ha="right")
        ax_cat.set(title="Speedup over autoregressive", ylabel="ratio of median tokens/s")

    names = [m["name"] for m in result["methods"]]
    colors = ["tab:blue" if m["engine"] == "speccompile" else "tab:gray" for m in result["methods"]]
    ax_speed.barh(names, [overall[n]["median_tokens_per_second"] or 0 for n in names], color=colors)
    ax_speed.invert_yaxis()
    ax_speed.set(title="Median tokens/s", xlabel="tokens/s")
    for ax in (ax_hist,) if many else (ax_hist, ax_cat):
        if speculative:
            ax.legend(fontsize=8)
    fig.tight_layout()
    _make_parent(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _speedup_table(ax, groups: dict, methods: list[str]) -> None:
    """Methods x categories, coloured by speedup (red below 1, green above), each cell's speedup over its mean
    accepted tokens per pass."""
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm
    speed = np.array([[g[m]["speedup"] or 0.0 for g in groups.values()] for m in methods])
    ax.imshow(speed, cmap="RdYlGn", norm=TwoSlopeNorm(1.0, min(0.5, speed.min()), max(2.0, speed.max())),
              aspect="auto")
    for i, m in enumerate(methods):
        for j, g in enumerate(groups.values()):
            ax.text(j, i, f"{speed[i, j]:.2f}x\n{g[m]['mean_accepted_tokens']:.2f}", ha="center", va="center",
                    fontsize=6.5)
    ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right")
    ax.set_yticks(range(len(methods)), methods, fontsize=8)
    ax.set_title("Speedup over autoregressive (cells: speedup, then tokens per verify pass)")
