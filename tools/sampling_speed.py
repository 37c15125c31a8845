"""Speculation's speedup per sampling setting: greedy, greedy with logprobs (the float32 head product each pass,
acceptance on the host), temperature alone (sampled by noise in the graph), min-p and top-p (sampled on the host from
the float32 logits). Plain and speculative sampling with the bundle's default drafter, the
two alternated per prompt with one seed each (the context cache off, so neither run finds the other's prompt),
paired per prompt; every answer checked against plain sampling's. docs/results.md has the figures.

    python tools/sampling_speed.py BUNDLE [--dataset question.jsonl] [--prompts 8] [--threads 2]
"""
import argparse
import statistics
import time

import speccompile
from speccompile.bench.prompts import default_dataset, load_questions, pick_prompts
from speccompile.cli.errors import one_line_errors

SETTINGS = {"greedy": dict(), "greedy, logprobs 5": dict(logprobs=5), "temperature 0.7": dict(temperature=0.7), "min-p 0.05": dict(temperature=0.7, min_p=0.05),
            "top-p 0.9": dict(temperature=0.7, top_p=0.9)}


def timed(g, ids, n, **kw):
    t0 = time.perf_counter()
    res = g.generate(ids, n, chat=False, **kw)
    return res, len(res.token_ids) / (time.perf_counter() - t0)


@one_line_errors  # bad input (a bundle, a dataset line): one `error:` line, as the CLI gives
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--dataset", default=default_dataset())
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    g = speccompile.load(a.bundle, threads=a.threads, context_cache=False)
    prompts, _ = pick_prompts(load_questions(a.dataset), a.prompts, g.encode_chat, g.max_seq_len - a.new_tokens)
    g.generate(prompts[0]["ids"], 8, chat=False)  # the cost model and the first runs' allocations
    for name, kw in SETTINGS.items():
        ratios, plain_tps, spec_tps, per_pass, same = [], [], [], [], 0
        for seed, p in enumerate(prompts):
            runs = [("plain", False), ("spec", True)][::1 if seed % 2 == 0 else -1]
            out = {mode: timed(g, p["ids"], a.new_tokens, speculate=spec, seed=seed, **kw) for mode, spec in runs}
            ratios.append(out["spec"][1] / out["plain"][1])
            plain_tps.append(out["plain"][1]), spec_tps.append(out["spec"][1])
            per_pass.append(out["spec"][0].stats["mean_accepted_tokens"])
            same += out["spec"][0].token_ids == out["plain"][0].token_ids
        print(f"{name}: plain {statistics.median(plain_tps):.1f} tok/s, speculative {statistics.median(spec_tps):.1f}"
              f", paired {statistics.geometric_mean(ratios):.3f}x, {statistics.mean(per_pass):.2f} tokens a pass, "
              f"identical to plain sampling {same}/{len(prompts)}", flush=True)


if __name__ == "__main__":
    main()
