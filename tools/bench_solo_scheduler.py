"""A request alone must not get slower with the scheduler: the same Generator decodes each prompt through the
scheduler (slot 0, the single-sequence graph, run by the calling thread) and through the serialized path
(Generator.steps under the lock, the code before batching), alternating which goes first; prints the median of the
per-prompt time ratios (serialized / scheduler: above 1, the scheduler is faster).

    python tools/bench_solo_scheduler.py BUNDLE N_PROMPTS MAX_NEW_TOKENS {spec,ar} [QUESTIONS]
"""
import argparse
import json
import statistics
import time

import speccompile
from speccompile.bench.prompts import default_dataset
from speccompile.cli.errors import one_line_errors
from speccompile.errors import SpeccompileError


@one_line_errors  # bad input (a bundle, a dataset line): one `error:` line, as the CLI gives
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("prompts", type=int, help="how many prompts, spread over the questions file")
    ap.add_argument("max_new_tokens", type=int)
    ap.add_argument("mode", choices=["spec", "ar"], help="speculative decoding or plain")
    ap.add_argument("questions", nargs="?", default=None, help="a Spec-Bench-style question.jsonl (default: shipped)")
    args = ap.parse_args()
    if args.prompts < 1 or args.max_new_tokens < 1:
        raise SpeccompileError("N_PROMPTS and MAX_NEW_TOKENS: each at least 1")
    g = speccompile.load(args.bundle, threads=2, context_cache=False)
    with open(args.questions or default_dataset()) as f:
        questions = [json.loads(line) for line in f if line.strip()]
    prompts = [q["turns"][0] for q in questions[::max(1, len(questions) // args.prompts)]][:args.prompts]
    spec, sched = args.mode == "spec", g.scheduler

    def run(prompt, use_scheduler):
        g.scheduler = sched if use_scheduler else None
        t0 = time.perf_counter()
        r = g.generate(prompt, args.max_new_tokens, speculate=spec)
        return time.perf_counter() - t0, r.token_ids

    run(prompts[0], True), run(prompts[0], False)  # warm both paths
    ratios, same = [], True
    for i, p in enumerate(prompts):
        res = {use: run(p, use) for use in ([True, False] if i % 2 else [False, True])}
        ratios.append(res[False][0] / res[True][0])
        same &= res[True][1] == res[False][1]
    print(f"{'spec' if spec else 'autoregressive'}: {len(prompts)} prompts x {args.max_new_tokens} tokens: "
          f"serialized/scheduler time ratio median {statistics.median(ratios):.3f} "
          f"(per prompt {[round(r, 3) for r in ratios]}), identical {same}")


if __name__ == "__main__":
    main()
