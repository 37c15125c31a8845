"""The result of `speccompile bench`: the JSON document and the table printed for it.

JSON result, schema_version 1 (all times in seconds, rates in tokens/s, bandwidths in GB/s = 1e9 bytes/s):

    schema_version    1
    created           ISO 8601 UTC time of the run
    machine           {platform, processor, cpu: {model, kernel_flags}, one_row_pad, cpu_count, loadavg_1min_before,
                       memory_bandwidth_gbps}
                      memory_bandwidth_gbps: best of a few numpy copies of a 256 MiB array split over the
                      benchmark's threads, counting bytes read plus bytes written (STREAM "copy"), measured in a
                      child process at the start of the run
    versions          {speccompile, python, numpy, onnxruntime, tokenizers[, torch, transformers]}
    bundle            {path, source {kind, path, sha256}, max_seq_len,
                       target {model_type, num_layers, hidden_size, vocab_size, weight_bytes,
                               weights (build's --weights), dtype},
                       drafters [{name, kind, num_draft[, model][, tree]}]}
                      tree: the tree the drafter drafts, as inspect spells it (its num_draft is then unused)
    settings          {dataset, dataset_sha256, categories, limit, max_new_tokens, drafters, tree, repeats, threads,
                       temperature, top_k, compare_transformers, warmup_tokens, streams, stream_requests,
                       stream_repeats, skipped_questions}
                      skipped_questions: ids of questions too long for the compiled context (not decoded)
    methods           [{name, engine: "speccompile"|"transformers", drafter: str|null, baseline: str,
                        counterpart: str|null}]
                      baseline: the autoregressive method of the same engine (speedups are over it);
                      counterpart: for a transformers method, the speccompile method it mirrors
    peak_rss_mib      {speccompile: MiB after speccompile's phases (concurrency mode included; transformers loads after
                       them), total: MiB at the end}: this process's high-water mark (getrusage ru_maxrss)
    prompts           [{question_id, category, prompt_tokens, runs {method: RUN}}]
        RUN           {seconds, new_tokens, tokens_per_second, identical_to_autoregressive: bool,
                       ttft_s, mean_accepted_tokens, verify_steps, committed_per_pass {"n": passes},
                       acceptance_rate_per_depth [float], draft_nodes_per_pass (draft nodes verified per pass),
                       plain_pass_share (adaptive drafting: the share of passes it drafted nothing for, else null),
                       plain_passes (adaptive drafting: how many, else null),
                       achieved_weight_bandwidth_gbps,
                       time_shares {target, drafter, host}: the run's wall time inside the target's graph, inside
                       the drafters' graphs, and the rest (the host's own work), as shares (null where unknown),
                       repeated_ngram_share: share of output tokens completing a 4-gram seen before in prompt +
                       output (how much the answer repeats itself)}
                      (the fields after identical_to_autoregressive are null for transformers methods)
    summary           {overall: GROUP, by_category: {category: GROUP}}
        GROUP         {method: {prompts, median_tokens_per_second, speedup, paired_speedup,
                                 paired_speedup_interval, mean_accepted_tokens,
                                 acceptance_rate_per_depth, committed_per_pass, median_ttft_s,
                                 median_achieved_bandwidth_gbps, bandwidth_fraction, identical_to_autoregressive,
                                 repeated_ngram_share, draft_nodes_per_pass, plain_pass_share (means over
                                 prompts), mean_accepted_per_drafting_pass (pooled over the passes that
                                 verified drafts; null without adaptive drafting), time_shares (pooled by
                                 seconds), speed_vs_transformers}}
                      speedup: median tokens/s over the baseline's median in the same group (ratio of medians);
                      paired_speedup: the geometric mean over prompts of each prompt's tokens/s over the
                      baseline's on the same prompt (what `speccompile gate` gates: steadier and more sensitive);
                      paired_speedup_interval: its 95% bootstrap interval over the group's prompts [low, high]
                      (null under 3 prompts; run-to-run drift of the machine is not in it);
                      mean_accepted_tokens: tokens committed per verify pass, bonus token included, pooled over
                      the group's passes (1.0 for autoregressive); acceptance_rate_per_depth: the mean over prompts;
                      bandwidth_fraction: achieved weight bandwidth over machine.memory_bandwidth_gbps;
                      identical_to_autoregressive: the share of prompts whose tokens equal the baseline's;
                      speed_vs_transformers: median tokens/s over the transformers counterpart's (else null)
    concurrency       (--streams only) {drafter, requests, max_new_tokens, repeats, batched_graph, sequential,
                       streams {N: ...}}: bench/concurrency.py
"""
from __future__ import annotations

import dataclasses
import datetime
import json

from speccompile.format.atomic import write_atomically
from speccompile.bench.machine import bundle_summary, machine_info, peak_rss_mib, versions
from speccompile.bench.methods import split_acceptance
from speccompile.bench.prompts import sha256_of
from speccompile.bench.settings import AUTOREGRESSIVE, SCHEMA_VERSION, decoding as describe_decoding
from speccompile.bench.stats import REPEAT_NGRAM, summarize


def result_document(bench, rss_ours: float) -> dict:
    """The JSON document (schema above) of a finished `speccompile.bench.run.Benchmark`."""
    methods = bench.ours + bench.theirs
    return {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(bench.bandwidth, bench.loadavg, getattr(bench.gen.target, "min_rows", 1) > 1),
        "versions": versions(),
        "bundle": bundle_summary(bench.bundle_dir, bench.gen),
        "settings": {**dataclasses.asdict(bench.settings), "dataset": bench.dataset,
                     "dataset_sha256": sha256_of(bench.dataset), "drafters": bench.drafters,
                     "skipped_questions": bench.skipped},
        "methods": [m.describe() for m in methods],
        "peak_rss_mib": {"speccompile": rss_ours, "total": peak_rss_mib()},
        "prompts": [{"question_id": p["question_id"], "category": p["category"], "prompt_tokens": len(p["ids"]),
                     "runs": {name: {k: v for k, v in r.items() if k != "token_ids"}
                              for name, r in p["runs"].items()}}
                    for p in bench.prompts],
        "summary": summarize(methods, bench.prompts, bench.bandwidth),
    }


def write_json(result: dict, path: str) -> None:
    write_atomically(path, lambda f: f.write((json.dumps(result, indent=1) + "\n").encode()))


def _fmt(value, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if value is None else format(value, spec) + suffix


def lossy_quality(result: dict) -> list[str]:
    """Beside each lossy method (typical acceptance), what its answers are like against autoregressive decoding's:
    how much they repeat themselves and how long they run, over the same prompts."""
    overall = result["summary"]["overall"]
    base = overall.get(AUTOREGRESSIVE, {}).get("repeated_ngram_share")
    lossy = [n for n in overall if split_acceptance(n)[1] not in (None, "exact")]
    if base is None or not lossy:
        return []

    def mean_length(name: str) -> float:
        runs = [p["runs"][name]["new_tokens"] for p in result["prompts"] if name in p["runs"]]
        return sum(runs) / len(runs) if runs else float("nan")

    return [f"lossy {name}: output repeating itself {overall[name]['repeated_ngram_share']:.0%} (autoregressive "
            f"{base:.0%}), {mean_length(name):.1f} tokens an answer ({mean_length(AUTOREGRESSIVE):.1f})"
            for name in lossy if overall[name].get("repeated_ngram_share") is not None]


def format_table(result: dict) -> str:
    s, machine = result["settings"], result["machine"]
    lines = [f"{len(result['prompts'])} prompts, max_new_tokens {s['max_new_tokens']}, best of {s['repeats']}, "
             f"threads {s['threads'] or 'all'}, "
             f"{describe_decoding(s)}; machine memory bandwidth "
             f"{machine['memory_bandwidth_gbps']:.1f} GB/s; peak RSS {result['peak_rss_mib']['speccompile']:.0f} MiB",
             ""]
    head = (f"{'category':16s} {'method':28s} {'tok/s':>7s} {'speedup':>7s} {'paired':>7s} {'acc.tok':>7s} "
            f"{'nodes':>5s} {'plain':>5s} {'ttft ms':>7s} "
            f"{'GB/s':>6s} {'of peak':>7s} {'same':>5s} {'vs HF':>6s}")
    lines += [head, "-" * len(head)]
    groups = {"overall": result["summary"]["overall"], **result["summary"]["by_category"]}
    for group, figures in groups.items():
        for name, f in figures.items():
            ttft = f["median_ttft_s"] * 1000 if f["median_ttft_s"] is not None else None
            same = f["identical_to_autoregressive"]
            lines.append(f"{group:16s} {name:28s} {_fmt(f['median_tokens_per_second'], '.1f'):>7s} "
                         f"{_fmt(f['speedup'], '.2f', 'x'):>7s} {_fmt(f['paired_speedup'], '.2f', 'x'):>7s} "
                         f"{_fmt(f['mean_accepted_tokens']):>7s} {_fmt(f.get('draft_nodes_per_pass'), '.1f'):>5s} "
                         f"{_fmt(f.get('plain_pass_share'), '.0%'):>5s} "
                         f"{_fmt(ttft, '.0f'):>7s} {_fmt(f['median_achieved_bandwidth_gbps'], '.1f'):>6s} "
                         f"{_fmt(f['bandwidth_fraction'], '.0%'):>7s} {_fmt(same, '.0%'):>5s} "
                         f"{_fmt(f['speed_vs_transformers'], '.2f', 'x'):>6s}")
    lines.append("")
    for name, f in result["summary"]["overall"].items():
        if f["acceptance_rate_per_depth"]:
            rates = " ".join(f"{r:.2f}" for r in f["acceptance_rate_per_depth"])
            lines.append(f"acceptance rate per draft depth, {name}: {rates}")
    baselines = {m["baseline"] for m in result["methods"]}
    spread = [f"{name} {f['paired_speedup']:.2f}x [{f['paired_speedup_interval'][0]:.2f}, "
              f"{f['paired_speedup_interval'][1]:.2f}]" for name, f in result["summary"]["overall"].items()
              if f.get("paired_speedup_interval") and name not in baselines]
    if spread:
        lines.append("paired speedup, 95% bootstrap interval over these prompts: " + ", ".join(spread))
    for name, f in result["summary"]["overall"].items():
        if f.get("time_shares"):
            t = f["time_shares"]
            lines.append(f"where the time went, {name}: target graph {t['target']:.0%}, drafter graph "
                         f"{t['drafter']:.0%}, host {t['host']:.0%}")
    share = {g: f[AUTOREGRESSIVE].get("repeated_ngram_share") for g, f in groups.items() if AUTOREGRESSIVE in f}
    if any(v is not None for v in share.values()):
        lines.append(f"output repeating itself (tokens completing a {REPEAT_NGRAM}-gram seen before, autoregressive): "
                     + ", ".join(f"{g} {v:.0%}" for g, v in share.items() if v is not None))
    lines += lossy_quality(result)
    lines.append("speedup: ratio of medians over the same engine's autoregressive decoding; paired: geometric mean "
                 "of per-prompt speedups; acc.tok: tokens committed per verify pass; nodes: draft nodes verified per "
                 "pass; plain: share of passes adaptive drafting drafted nothing for; "
                 "GB/s: target weights streamed per second; of peak: share of the machine's copy bandwidth; "
                 "same: output identical to autoregressive; vs HF: over the transformers counterpart")
    return "\n".join(lines)
