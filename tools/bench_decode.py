"""Decode-speed benchmark: speccompile's compiled decoding (autoregressive and each bundled drafter) against the same
target run by transformers `generate`, by onnxruntime-genai (greedy, and its n-gram speculative decoding) and by
llama.cpp on the bundle's own GGUF file (greedy, and its prompt-lookup decoding); with --float32-bundle also the
float32 build of the same model. Also printed: one target pass's time for 1-16 rows, and peak RSS.

    python tools/bench_decode.py --bundle /tmp/smol_bundle --json bench.json --plot bench.png

Fairness: one process; every method gets the same prompt token ids (speccompile's chat template), greedy decoding,
the same max_new_tokens and EOS, the same thread count; one untimed warm-up per method; then methods interleaved
prompt by prompt in a fresh seeded shuffle each prompt (a rotation would keep every method right after the same
other one, e.g. right after another engine whose threads are still spinning down). A run's
tokens/s is new tokens / wall time from prompt ids to the last token (prefill included), timed the same way
outside every method; EOS is not counted (transformers and speccompile return it, genai does not).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import statistics
import sys
import time

from speccompile.bench import peers
from speccompile.bench.prompts import load_questions, pick_prompts as pick_questions
from speccompile.cli.errors import one_line_errors
from speccompile.errors import SpeccompileError

QUESTIONS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "spec_bench",
                         "question.jsonl")
BASELINE = "ours:ar"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pick_prompts(path: str, limit: int, encode, max_prompt_tokens: int) -> list[dict]:
    """Round-robin over the categories (file order), each category's questions in file order: deterministic and
    spread (speccompile bench's pick, on its reader of the dataset). Questions whose prompt would not leave room for
    the answer in the compiled context are skipped."""
    picked, _ = pick_questions(load_questions(path), limit, encode, max_prompt_tokens)
    return [{"question_id": q["question_id"], "category": q["category"], "ids": q["ids"]} for q in picked]


def make_methods(args, gen) -> tuple[dict, list[str]]:
    """name -> run(ids, max_new) returning (token ids, extra stats); plus notes for the report."""
    methods, notes = {}, []

    def ours(drafter, tree=None):
        def run(ids, n):
            r = gen.generate(ids, max_new_tokens=n, drafter=drafter, speculate=drafter is not None, temperature=0.0,
                             tree=tree)
            return r.token_ids, {"mean_accepted_tokens": r.stats.get("mean_accepted_tokens"),
                                 "self_reported_tok_s": r.stats.get("tokens_per_second")}
        return run

    methods[BASELINE] = ours(None)
    for name in gen.drafter_names:
        methods[f"ours:{name}"] = ours(name)
        for tree in args.tree:
            methods[f"ours:{name}+{tree}"] = ours(name, tree)
    if not args.no_llama_cpp:
        llama_cpp_methods(args, gen, methods, notes)
    if args.no_transformers and args.no_genai:
        return methods, notes

    hf_dir = peers.export_hf_dir(None, os.path.join(args.work_dir, "hf"))
    if not args.no_transformers:
        hf = peers.TransformersPeer(hf_dir, threads=args.threads)
        methods["transformers"] = lambda ids, n: (hf.generate(ids, n)[0], {})
        methods["transformers:prompt_lookup"] = lambda ids, n: (hf.generate(ids, n, args.pld_tokens)[0], {})
        notes.append(f"transformers prompt lookup: prompt_lookup_num_tokens={args.pld_tokens}")
    if not args.no_genai:
        g = peers.GenAIPeer(hf_dir, os.path.join(args.work_dir, "genai-fp32-cpu"), threads=args.threads,
                            ngram_size=args.ngram_size, max_draft_tokens=args.ngram_draft)
        methods["genai"] = lambda ids, n: (g.generate(ids, n)[0], {})
        if g.ngram_error:
            notes.append(f"onnxruntime-genai n-gram decoding NOT measured: unsupported here ({g.ngram_error})")
        else:
            def genai_ngram(ids, n):
                out = g.generate(ids, n, ngram=True)[0]
                return out, {"mean_accepted_tokens": g.last_stats.get("mean_emitted_tokens_per_round")}
            methods["genai:ngram"] = genai_ngram
            notes.append(f"onnxruntime-genai n-gram: set_speculative_options(ngram_size={args.ngram_size}, "
                         f"max_draft_tokens={args.ngram_draft})")
    return methods, notes


def llama_cpp_methods(args, gen, methods: dict, notes: list) -> None:
    """llama.cpp on the bundle's own GGUF file (a bundle built from safetensors has none: skipped, said)."""
    source = gen.manifest["source"]
    if source["kind"] != "gguf":
        notes.append("llama.cpp NOT measured: the bundle was not built from a GGUF file")
        return
    if importlib.util.find_spec("llama_cpp") is None:  # an optional peer: say how to get it or skip it
        raise SpeccompileError("llama.cpp is measured through llama-cpp-python, which is not installed: "
                               "pip install llama-cpp-python, or pass --no-llama-cpp")
    eos = gen.tokenizer.eos_token_ids  # where every other method stops
    greedy = peers.LlamaCppPeer(source["path"], threads=args.threads, eos=eos)
    lookup = peers.LlamaCppPeer(source["path"], threads=args.threads, prompt_lookup=args.llama_lookup_tokens, eos=eos)
    methods["llama.cpp"] = lambda ids, n: (greedy.generate(ids, n)[0], {})
    methods["llama.cpp:prompt_lookup"] = lambda ids, n: (lookup.generate(ids, n)[0], {})
    notes.append(f"llama.cpp: llama-cpp-python on {os.path.basename(source['path'])}, {args.threads} threads, "
                 f"greedy; prompt lookup: LlamaPromptLookupDecoding(num_pred_tokens={args.llama_lookup_tokens})")


def float32_methods(args, methods: dict, notes: list) -> None:
    """The float32 build of the same model (--float32-bundle): plain decoding and its first drafter."""
    import speccompile
    f32 = speccompile.load(args.float32_bundle, threads=args.threads, context_cache=False)
    for drafter in (None, *f32.drafter_names[:1]):
        def run(ids, n, drafter=drafter):
            r = f32.generate(ids, max_new_tokens=n, drafter=drafter, speculate=drafter is not None)
            return r.token_ids, {"mean_accepted_tokens": r.stats.get("mean_accepted_tokens")}
        methods[f"float32:{drafter or 'ar'}"] = run
    notes.append(f"float32:*: the float32 build {args.float32_bundle}")


def verify_pass_ms(gen, rows=(1, 2, 4, 8, 16), repeats=15) -> dict:
    """Median milliseconds of one target pass over R chain rows after a 64-token prefill (greedy head)."""
    import numpy as np
    eng, rng, out = gen.target, np.random.default_rng(0), {}
    vocab = gen.manifest["models"]["target"]["config"]["vocab_size"]  # ids past it fail the embedding's Gather
    eng.cache.truncate(0)
    eng.forward(rng.integers(0, vocab, 64))
    for r in rows:
        times = []
        for _ in range(repeats):
            eng.cache.truncate(64)
            t0 = time.perf_counter()
            eng.forward(rng.integers(0, vocab, r), full_logits=False)
            times.append(time.perf_counter() - t0)
        out[str(r)] = 1e3 * statistics.median(times)
    eng.cache.truncate(0)
    return out


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (VmHWM)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def timed(run, ids, n, eos) -> dict:
    t0 = time.perf_counter()
    tokens, extra = run(ids, n)
    seconds = time.perf_counter() - t0
    tokens = [int(t) for t in tokens]
    cut = next((i for i, t in enumerate(tokens) if t in eos), len(tokens))
    tokens = tokens[:cut]
    return {"tokens": tokens, "seconds": seconds, "tok_s": len(tokens) / seconds, **extra}


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def summarize(names, runs) -> dict:
    summary = {}
    for m in names:
        ok = [r for r in runs if "error" not in r[m]]
        pairs = [(r[m]["tokens"], r[BASELINE]["tokens"]) for r in ok if "error" not in r[BASELINE]]
        rates = [r[m]["tok_s"] for r in ok]
        acc = [r[m]["mean_accepted_tokens"] for r in ok if r[m].get("mean_accepted_tokens") is not None]
        q = statistics.quantiles(rates, n=4) if len(rates) > 1 else rates * 3 or [None] * 3
        summary[m] = {
            "runs": len(ok), "errors": len(runs) - len(ok),
            "median_tok_s": statistics.median(rates) if rates else None, "p25_tok_s": q[0], "p75_tok_s": q[2],
            "pooled_tok_s": sum(len(r[m]["tokens"]) for r in ok) / sum(r[m]["seconds"] for r in ok) if ok else None,
            "agreement_with_ours_ar": sum(a == b for a, b in pairs) / len(pairs) if pairs else None,
            "mean_common_prefix_frac": statistics.mean(common_prefix(a, b) / max(len(b), 1) for a, b in pairs)
            if pairs else None,
            "median_tokens_per_step": statistics.median(acc) if acc else None}
    base = summary[BASELINE]["median_tok_s"]
    for s in summary.values():
        s["x_ours_ar"] = s["median_tok_s"] / base if s["median_tok_s"] and base else None
    return summary


def ratio_matrix(summary, runs) -> dict:
    """Every speccompile method against every peer: the ratio of their medians ("of_medians"), and the median over
    prompts of the per-prompt ratio ("paired": each prompt's two runs were measured moments apart, so a slow
    stretch of the machine hits both)."""
    ours = [m for m in summary if m.startswith("ours:")]
    others = [m for m in summary if not m.startswith("ours:")]

    def paired(o, p):
        r = [x[o]["tok_s"] / x[p]["tok_s"] for x in runs if "error" not in x[o] and "error" not in x[p]]
        return statistics.median(r) if r else None
    return {"of_medians": {o: {p: summary[o]["median_tok_s"] / summary[p]["median_tok_s"]
                               for p in others if summary[o]["median_tok_s"] and summary[p]["median_tok_s"]}
                           for o in ours},
            "paired": {o: {p: paired(o, p) for p in others} for o in ours}}


def fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def print_report(summary, ratios, notes, n_prompts, args) -> None:
    print(f"\n{n_prompts} Spec-Bench prompts, max_new_tokens={args.max_new_tokens}, threads={args.threads}, greedy; "
          f"medians over prompts")
    head = (f"{'method':28s} {'tok/s':>7s} {'p25-p75':>13s} {'x ours:ar':>9s} {'tok/step':>8s} "
            f"{'same as ar':>10s} {'prefix':>6s}")
    print(head + "\n" + "-" * len(head))
    for m, s in summary.items():
        iqr = f"{fmt(s['p25_tok_s'], '.1f')}-{fmt(s['p75_tok_s'], '.1f')}"
        print(f"{m:28s} {fmt(s['median_tok_s'], '.1f'):>7s} {iqr:>13s} {fmt(s['x_ours_ar']):>9s} "
              f"{fmt(s['median_tokens_per_step']):>8s} {fmt(s['agreement_with_ours_ar'], '.0%'):>10s} "
              f"{fmt(s['mean_common_prefix_frac'], '.0%'):>6s}" + (f"  ({s['errors']} errors)" if s["errors"] else ""))
    for kind, title in (("of_medians", "ratio of medians"), ("paired", "paired ratio: median over prompts of")):
        table = ratios[kind]
        if not any(table.values()):
            continue
        cols = list(next(iter(table.values())))
        w = max(map(len, cols)) + 2
        print(f"\n{title} (row / column):")
        print(f"{'':28s}" + "".join(f"{c:>{w}s}" for c in cols))
        for o, row in table.items():
            print(f"{o:28s}" + "".join(f"{fmt(row.get(c)):>{w}s}" for c in cols))
    for n in notes:
        print("note: " + n)
    print("'same as ar': share of prompts whose greedy tokens equal ours:ar exactly; "
          "'prefix': mean share of ours:ar's tokens matched before the first difference")


def plot(summary, path, settings: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [m for m in summary if summary[m]["median_tok_s"]]
    med = [summary[m]["median_tok_s"] for m in names]
    err = [[med[i] - summary[m]["p25_tok_s"] for i, m in enumerate(names)],
           [summary[m]["p75_tok_s"] - med[i] for i, m in enumerate(names)]]
    colors = ["tab:blue" if m.startswith("ours") else "tab:orange" if m.startswith("genai") else "tab:gray"
              for m in names]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(names) + 1.5))
    ax.barh(names, med, xerr=err, color=colors, capsize=3)
    for i, m in enumerate(names):
        ax.text(med[i], i, f" {med[i]:.1f}  (x{summary[m]['x_ours_ar']:.2f})", va="bottom", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("median tokens/s (bars: p25-p75 over prompts); x = ratio to ours:ar")
    ax.set_title(f"Decode speed, same target, greedy\n{settings}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


@one_line_errors  # bad input (a dataset line, a bundle): one `error:` line, as the CLI gives
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True, help="speccompile bundle of the default model (SmolLM2-135M-Instruct)")
    ap.add_argument("--limit", type=int, default=20, help="number of prompts")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads for every method")
    ap.add_argument("--questions", default=QUESTIONS, help="Spec-Bench question.jsonl")
    ap.add_argument("--tree", action="append", default=[],
                    help="also run each drafter verifying this token tree (chain:K, static:FILE, dynamic:N)")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--no-genai", action="store_true")
    ap.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp (needs llama-cpp-python)")
    ap.add_argument("--float32-bundle", help="also decode with this float32 build of the same model")
    ap.add_argument("--llama-lookup-tokens", type=int, default=10,
                    help="llama.cpp LlamaPromptLookupDecoding num_pred_tokens")
    ap.add_argument("--pld-tokens", type=int, default=10, help="transformers prompt_lookup_num_tokens")
    ap.add_argument("--ngram-size", type=int, default=2, help="onnxruntime-genai ngram_size")
    ap.add_argument("--ngram-draft", type=int, default=4, help="onnxruntime-genai max_draft_tokens")
    ap.add_argument("--json", dest="json_out", help="write the results here")
    ap.add_argument("--plot", help="write a bar plot (PNG) here")
    ap.add_argument("--work-dir", default=os.path.expanduser("~/.cache/speccompile-bench"),
                    help="cache for the HF export and the genai build")
    args = ap.parse_args()

    load = os.getloadavg()[0]
    if load > 0.5:  # timings share the CPU with whatever else runs: say so rather than publish skewed numbers
        log(f"warning: 1-min load average is {load:.2f} before the benchmark; timings will be noisy")
    import speccompile
    gen = speccompile.load(args.bundle, threads=args.threads, context_cache=False)
    eos = set(gen.tokenizer.eos_token_ids)
    prompts = pick_prompts(args.questions, args.limit, gen.encode_chat, gen.max_seq_len - args.max_new_tokens)
    gen.generate(prompts[0]["ids"], max_new_tokens=args.max_new_tokens)  # ours alone in the process so far
    memory = {"ours_peak_rss_mib": peak_rss_mib()}
    verify_ms = verify_pass_ms(gen)
    log("target pass ms by rows: " + ", ".join(f"{r}: {ms:.2f}" for r, ms in verify_ms.items()) +
        f"; peak RSS {memory['ours_peak_rss_mib']:.0f} MiB")
    methods, notes = make_methods(args, gen)
    if args.float32_bundle:
        float32_methods(args, methods, notes)
    names = list(methods)

    log(f"warm-up: {len(names)} methods")
    for m in names:
        timed(methods[m], prompts[0]["ids"], min(32, args.max_new_tokens), eos)

    runs: list[dict] = []
    for i, p in enumerate(prompts):
        runs.append({})
        order = list(names)
        random.Random(i).shuffle(order)
        for m in order:
            try:
                r = timed(methods[m], p["ids"], args.max_new_tokens, eos)
                log(f"[{i + 1}/{len(prompts)}] q{p['question_id']} {p['category']:14s} {m:28s} "
                    f"{len(r['tokens']):4d} tok {r['seconds']:6.2f} s {r['tok_s']:6.1f} tok/s")
            except Exception as e:  # one failing method must not lose the others' numbers; it is reported
                r = {"error": f"{type(e).__name__}: {e}"}
                log(f"[{i + 1}/{len(prompts)}] q{p['question_id']} {m}: ERROR {r['error']}")
            runs[i][m] = r
        base = runs[i][BASELINE].get("tokens")
        diff = [m for m in names if base is not None and runs[i][m].get("tokens", base) != base]
        if diff:
            log(f"    tokens differ from {BASELINE}: {', '.join(diff)}")

    summary = summarize(names, runs)
    ratios = ratio_matrix(summary, runs)
    print_report(summary, ratios, notes, len(prompts), args)
    print("target pass ms by rows (R chain rows after a 64-token prefill): " +
          ", ".join(f"{r}: {ms:.2f}" for r, ms in verify_ms.items()))
    print(f"peak RSS with only our bundle loaded: {memory['ours_peak_rss_mib']:.0f} MiB "
          f"(whole run: {peak_rss_mib():.0f} MiB, every method in one process)")
    if args.json_out:
        import onnxruntime
        env = {"python": platform.python_version(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
               "loadavg_1min_before": load,
               "onnxruntime": onnxruntime.__version__, "speccompile": speccompile.__version__}
        for mod in ("torch", "transformers", "onnxruntime_genai"):
            if mod in sys.modules:
                env[mod] = sys.modules[mod].__version__
        with open(args.json_out, "w") as f:
            json.dump({"args": vars(args), "env": env, "notes": notes, "summary": summary, "ratios": ratios,
                       "target_pass_ms_by_rows": verify_ms, "memory": memory | {"run_peak_rss_mib": peak_rss_mib()},
                       "prompts": [{k: v for k, v in p.items() if k != "ids"} | {"prompt_tokens": len(p["ids"])}
                                   for p in prompts],
                       # token ids stay out (agreement is in the summary): the file is a record, not a dump
                       "runs": [{m: {k: v for k, v in r.items() if k != "tokens"} for m, r in run.items()}
                                for run in runs]}, f, indent=1)
    if args.plot:
        # the prompts decoded: --limit is at most, fewer where the dataset has fewer or some do not fit
        plot(summary, args.plot, f"{os.path.basename(os.path.normpath(args.bundle))}, {len(prompts)} Spec-Bench "
             f"prompts, {args.max_new_tokens} new tokens, prefill included, {args.threads} threads, "
             f"{time.strftime('%Y-%m-%d')}")


if __name__ == "__main__":
    main()
