"""Autoregressive against speculative decoding of one bundle on one device, paired per prompt (tools/gpu_check.sh).

    python tools/gpu_bench.py BUNDLE --device cuda [--prompts 8] [--max-new-tokens 128]

Prints one JSON line: medians of tokens/s, the median of each prompt's own speedup, mean accepted tokens, and
whether every speculative output equalled the autoregressive one (greedy: it must)."""
import argparse
import json
import statistics
import sys
import time

import speccompile
from speccompile.bench.prompts import default_dataset, load_questions


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    args = ap.parse_args()
    t0 = time.perf_counter()
    gen = speccompile.load(args.bundle, device=args.device)
    load_s = time.perf_counter() - t0
    questions = [q for qs in load_questions(default_dataset()).values() for q in qs][:args.prompts]
    gen.generate("Warm up the kernels.", max_new_tokens=16)  # first-call allocations, autotuning
    gen.generate("Warm up the kernels.", max_new_tokens=16, speculate=False)
    plain, spec, ratio, accepted, identical = [], [], [], [], True
    for q in questions:
        a = gen.generate(q["text"], max_new_tokens=args.max_new_tokens, speculate=False)
        b = gen.generate(q["text"], max_new_tokens=args.max_new_tokens)
        identical &= a.token_ids == b.token_ids
        plain.append(a.stats["tokens_per_second"])
        spec.append(b.stats["tokens_per_second"])
        ratio.append(spec[-1] / plain[-1])
        accepted.append(b.stats["mean_accepted_tokens"])
    print(json.dumps({"device": args.device, "prompts": len(questions), "max_new_tokens": args.max_new_tokens,
                      "load_s": round(load_s, 2), "autoregressive_tok_s": round(statistics.median(plain), 1),
                      "speculative_tok_s": round(statistics.median(spec), 1),
                      "paired_speedup": round(statistics.median(ratio), 2),
                      "mean_accepted_tokens": round(statistics.mean(accepted), 2), "identical": identical}))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
