"""Tree verification benchmark (token trees issue).

1. Verify-pass time of the compiled target for token trees of 1..64 nodes (a random tree shape over a committed
   context), for each TreeAttention lowering present (bundles built with --attention ort / reference): medians
   of repeated passes, with a PNG plot.
2. Mean accepted tokens per verify pass and tokens/s on Spec-Bench prompts for chains and trees of the same
   verify size (same number of rows through the target, hence about the same verify cost), per drafter.

    python tools/bench_tree.py --bundle B [--reference-bundle R] [--limit 10] [--json OUT] [--plot OUT.png]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

from speccompile.cli.errors import one_line_errors

QUESTIONS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "spec_bench",
                         "question.jsonl")
SIZES = [1, 2, 4, 8, 12, 16, 24, 32, 48, 64]


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def verify_times(bundle: str, committed: int, repeats: int, threads: int) -> dict[int, float]:
    from speccompile.format.bundle import read_manifest
    from speccompile.runtime.engine import Engine
    from speccompile.format.trees import depths
    m = read_manifest(bundle, verify_hashes=False)
    eng = Engine(bundle, m["models"]["target"], threads=threads, max_rows=64)
    rng = np.random.default_rng(0)
    ctx = rng.integers(100, 10000, committed)
    for s in range(0, committed, 128):
        eng.forward(ctx[s:s + 128])
        eng.cache.truncate(min(committed, s + 128))
    out = {}
    for n in SIZES:
        parents = np.array([-1] + [int(rng.integers(max(-1, i - 4), i)) for i in range(1, n)])
        tokens = rng.integers(100, 10000, n)
        pos = committed + depths(parents)
        ts = []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            eng.forward(tokens, pos, parents, rows=np.arange(n))
            ts.append(time.perf_counter() - t0)
        out[n] = statistics.median(ts[1:]) * 1000
        log(f"{os.path.basename(bundle)} tree of {n:2d} nodes: {out[n]:.1f} ms")
    return out


def acceptance(bundle: str, limit: int, max_new: int, threads: int, shapes: list[str]) -> dict:
    import speccompile
    g = speccompile.load(bundle, threads=threads, context_cache=False)
    qs = [json.loads(line) for line in open(QUESTIONS)]
    cats = sorted({q["category"] for q in qs})
    picked = [next(q for q in qs if q["category"] == c) for c in cats][:limit]
    res = {}
    for d in g.drafter_names:
        for shape in shapes:
            acc, rate = [], []
            for q in picked:
                ids = g.encode_chat(q["turns"][0])[-1500:]
                ar = g.generate(ids, max_new, speculate=False)
                r = g.generate(ids, max_new, drafter=d, tree=shape)
                assert r.token_ids == ar.token_ids, "speculative output differs from autoregressive output"
                acc.append(r.stats["mean_accepted_tokens"])
                rate.append(r.stats["tokens_per_second"] / ar.stats["tokens_per_second"])
            res[f"{d} {shape}"] = {"mean_accepted_tokens": statistics.mean(acc),
                                   "median_speedup": statistics.median(rate)}
            log(f"{d:12s} {shape:12s} accepted {statistics.mean(acc):.2f}  speedup {statistics.median(rate):.2f}x")
    return res


@one_line_errors  # bad input (a bundle, a dataset line): one `error:` line, as the CLI gives
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--reference-bundle", help="the same model built with --attention reference")
    ap.add_argument("--committed", type=int, default=512, help="context length before the verified tree")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--shapes", default="chain:4,dynamic:4,chain:8,dynamic:8,dynamic:16",
                    help="tree shapes to compare (chain:K vs dynamic:K have the same verify size)")
    ap.add_argument("--json")
    ap.add_argument("--plot")
    a = ap.parse_args()
    times = {"ort": verify_times(a.bundle, a.committed, a.repeats, a.threads)}
    if a.reference_bundle:
        times["reference"] = verify_times(a.reference_bundle, a.committed, a.repeats, a.threads)
    acc = acceptance(a.bundle, a.limit, a.max_new_tokens, a.threads, a.shapes.split(","))
    print(f"\nverify-pass time (ms, median of {a.repeats}) at {a.committed} committed tokens")
    print("nodes " + "".join(f"{k:>11s}" for k in times))
    for n in SIZES:
        print(f"{n:5d} " + "".join(f"{times[k][n]:11.1f}" for k in times))
    print("\nshape                      mean accepted   speedup vs AR (median)")
    for k, v in acc.items():
        print(f"{k:26s} {v['mean_accepted_tokens']:13.2f} {v['median_speedup']:12.2f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"verify_ms": times, "acceptance": acc, "args": vars(a)}, f, indent=1)
    if a.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        for k, t in times.items():
            ax.plot(SIZES, [t[n] for n in SIZES], marker="o", label=f"TreeAttention lowering: {k}")
        ax.set_xlabel("tree nodes verified in one pass")
        ax.set_ylabel("verify pass (ms)")
        ax.set_title(f"Target verify-pass time vs tree size ({a.committed} committed tokens)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(a.plot, dpi=120)


if __name__ == "__main__":
    main()
