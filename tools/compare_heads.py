"""Two bundles of one target (say, the shipped head's and a newly trained one's), each decoding with its default
drafting, against plain decoding, in one process: per prompt the three runs interleaved (their order alternating),
the faster of `--repeats`; paired speedups (geometric means), per category, and tokens committed per pass.

    python tools/compare_heads.py OLD_BUNDLE NEW_BUNDLE [--dataset question.jsonl] [--limit 26]
        [--max-new-tokens 128] [--temperature 0] [--repeats 2] [--threads 2]

Greedy, every answer must equal plain decoding's: the tool exits 1 if one does not. Whether a head pays on this
machine is a question of speed, so only a comparison inside one run counts (docs/design.md, the gate's method).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import speccompile
from speccompile.bench.prompts import default_dataset, load_questions, pick_prompts
from speccompile.bench.stats import geometric_mean
from speccompile.cli.errors import one_line_errors


def timed(gen, ids: list[int], n: int, speculate: bool, temperature: float, repeats: int):
    """(tokens per second of the fastest of `repeats` runs, the last result)."""
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = gen.generate(ids, n, speculate=speculate, temperature=temperature, seed=1)
        best = min(best, time.perf_counter() - t0)
    return len(result.token_ids) / best, result


@one_line_errors  # bad input (a dataset line, a bundle): one `error:` line, as the CLI gives
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--dataset", default=default_dataset(), help="Spec-Bench-format question.jsonl")
    ap.add_argument("--limit", type=int, default=26)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    bundles = {"old": speccompile.load(a.old, threads=a.threads, context_cache=False),
               "new": speccompile.load(a.new, threads=a.threads, context_cache=False)}
    prompts, _ = pick_prompts(load_questions(a.dataset), a.limit, bundles["old"].encode_chat,
                              bundles["old"].max_seq_len - a.max_new_tokens)
    runs = {"plain": ("old", False), "old": ("old", True), "new": ("new", True)}
    speed = {m: [] for m in runs}
    per_pass = {m: [] for m in runs if runs[m][1]}
    categories, differ = [], 0
    for gen in bundles.values():  # warm-up (and each bundle's cost model, calibrated at first use)
        # no more tokens than asked of the runs: the prompts were picked to leave room for that many
        gen.generate(list(map(int, prompts[0]["ids"])), min(16, a.max_new_tokens))
    for i, p in enumerate(prompts):
        ids, outputs = list(map(int, p["ids"])), {}
        categories.append(p["category"])
        for m in (list(runs) if i % 2 == 0 else list(runs)[::-1]):
            bundle, speculate = runs[m]
            tps, result = timed(bundles[bundle], ids, a.max_new_tokens, speculate, a.temperature, a.repeats)
            speed[m].append(tps)
            outputs[m] = result.token_ids
            if speculate:
                per_pass[m].append(result.stats["mean_accepted_tokens"])
        differ += a.temperature == 0 and any(outputs[m] != outputs["plain"] for m in outputs)
        print(f"[{i + 1}/{len(prompts)}] {p['category']:<16} " +
              "  ".join(f"{m} {speed[m][-1]:.1f}" for m in runs) + " tok/s", flush=True)
    report(speed, per_pass, categories)
    if differ:
        print(f"error: {differ} greedy answers differ from plain decoding", file=sys.stderr)
        return 1
    return 0


def report(speed: dict, per_pass: dict, categories: list[str]) -> None:
    plain = speed["plain"]
    print(f"\nplain decoding: median {statistics.median(plain):.1f} tok/s")
    for m in per_pass:
        ratios = [s / b for s, b in zip(speed[m], plain)]
        by: dict[str, list[float]] = {}
        for c, r in zip(categories, ratios):
            by.setdefault(c, []).append(r)
        cats = "  ".join(f"{c} {geometric_mean(v):.2f}" for c, v in sorted(by.items()))
        print(f"{m}: paired {geometric_mean(ratios):.3f}x plain, {sum(per_pass[m]) / len(per_pass[m]):.2f} tokens "
              f"a pass\n    {cats}")
    print(f"new / old: paired {geometric_mean([n / o for n, o in zip(speed['new'], speed['old'])]):.3f}x")


if __name__ == "__main__":
    sys.exit(main())
