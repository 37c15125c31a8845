"""Speculation's speedup per sampling setting: greedy, greedy with logprobs (the float32 head product each pass,
acceptance on the host), temperature alone (sampled by noise in the graph), min-p and top-p (sampled on the host from
the float32 logits). Plain and speculative sampling with the bundle's default drafter, the
two alternated per prompt with one seed each (the context cache off, so neither run finds the other's prompt),
paired per prompt; every answer checked against plain sampling's. --choices N then samples N answers of each
prompt (seeds s, s + 1, ...) at temperature 0.7 one after another and all at once (the server's `n`: every stream
queued before any is read, so they share passes where the bundle batches), and all at once with the context cache
on (emptied first), where the first choice runs the prompt and the others restore it. docs/results.md has the
figures.

    python tools/sampling_speed.py BUNDLE [--dataset question.jsonl] [--prompts 8] [--threads 2] [--choices 4]
        [--choices-only]
"""
import argparse
import statistics
import time

import speccompile
from speccompile.bench.prompts import default_dataset, load_questions, pick_prompts
from speccompile.cli.errors import one_line_errors
from speccompile.runtime.streams import drain

SETTINGS = {"greedy": dict(), "greedy, logprobs 5": dict(logprobs=5), "temperature 0.7": dict(temperature=0.7), "min-p 0.05": dict(temperature=0.7, min_p=0.05),
            "top-p 0.9": dict(temperature=0.7, top_p=0.9)}


def timed(g, ids, n, **kw):
    t0 = time.perf_counter()
    res = g.generate(ids, n, chat=False, **kw)
    return res, len(res.token_ids) / (time.perf_counter() - t0)


def choices(g, cached, prompts, n: int, new_tokens: int) -> None:
    """n answers of each prompt, one after another against all queued at once, and all at once with the context
    cache on (`cached`, emptied first): tokens/s of all n, paired."""
    modes = ["apart", "together", "prompt once"]
    ratios, once, same = [], [], 0
    for i, p in enumerate(prompts):
        out = {}
        for mode in modes[i % 3:] + modes[:i % 3]:
            t0 = time.perf_counter()
            kws = [dict(seed=100 * i + j, temperature=0.7, chat=False) for j in range(n)]
            if mode == "apart":
                rs = [g.generate(p["ids"], new_tokens, **kw) for kw in kws]
            else:
                gen = g if mode == "together" else cached
                if gen.context_cache:
                    gen.context_cache.clear()
                rs = [drain(s) for s in [gen.stream(p["ids"], new_tokens, **kw) for kw in kws]]
            out[mode] = (sum(len(r.token_ids) for r in rs) / (time.perf_counter() - t0), [r.token_ids for r in rs])
        ratios.append(out["together"][0] / out["apart"][0])
        once.append(out["prompt once"][0] / out["together"][0])
        same += out["together"][1] == out["apart"][1] == out["prompt once"][1]
    print(f"{n} choices at temperature 0.7: together against one after another, paired "
          f"{statistics.geometric_mean(ratios):.3f}x; together with the prompt run once (context cache) against "
          f"run by each choice, paired {statistics.geometric_mean(once):.3f}x; the same answers {same}/{len(prompts)}",
          flush=True)


@one_line_errors  # bad input (a bundle, a dataset line): one `error:` line, as the CLI gives
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--dataset", default=default_dataset())
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--choices", type=int, default=0)
    ap.add_argument("--choices-only", action="store_true", help="measure --choices alone, not each setting")
    a = ap.parse_args()
    g = speccompile.load(a.bundle, threads=a.threads, context_cache=False)
    prompts, _ = pick_prompts(load_questions(a.dataset), a.prompts, g.encode_chat, g.max_seq_len - a.new_tokens)
    g.generate(prompts[0]["ids"], 8, chat=False)  # the cost model and the first runs' allocations
    for name, kw in ({} if a.choices_only else SETTINGS).items():
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
    if a.choices > 1:
        choices(g, speccompile.load(a.bundle, threads=a.threads), prompts, a.choices, a.new_tokens)


if __name__ == "__main__":
    main()
