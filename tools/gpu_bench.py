"""Autoregressive against speculative decoding of one bundle on one device, paired per prompt (tools/gpu_check.sh).

    python tools/gpu_bench.py BUNDLE --device cuda [--prompts 8] [--max-new-tokens 128]

Prints one JSON line: medians of tokens/s (with the weight bandwidth autoregressive steps achieve: a GPU far under
its memory bandwidth is bound by launches and the host), the paired speedup (the geometric mean of each prompt's own
speedup, as `speccompile bench` gives it), mean accepted tokens over every verify pass, and whether every
speculative output equalled the autoregressive one (greedy: it must, up to the kernels' rounding). Where one did
not, `divergences` gives, per such prompt, the first differing position and the target's own margin there: its logit
for the token autoregressive decoding chose minus its logit for the one speculation committed, both from the same
one-token decode step. A margin within the bundle dtype's rounding (NEAR_TIE_ULPS units in the last place of the
largest |logit|) is a near-tie that a verify block's other kernel tiling may flip: reported, and passed; a larger
one is a bug, and the exit status is 1."""
import argparse
import json
import statistics
import sys
import time

import numpy as np

import speccompile
from speccompile.bench.prompts import default_dataset, load_questions
from speccompile.bench.stats import geometric_mean
from speccompile.cli.errors import one_line_errors
from speccompile.format.bundle import read_manifest


NEAR_TIE_ULPS = 2
MANTISSA_BITS = {"float32": 23, "float16": 10, "bfloat16": 7}


def near_tie(d: dict, dtype: str = "float16") -> bool:
    """Whether a divergence (decode_margin's) is within the bundle dtype's rounding of the target's own logits:
    NEAR_TIE_ULPS units in the last place of the largest |logit|."""
    if d.get("prefix_only"):
        return False
    ulp = 2.0 ** (np.floor(np.log2(d["max_abs_logit"])) - MANTISSA_BITS[dtype])
    return abs(d["margin"]) <= NEAR_TIE_ULPS * ulp


def decode_margin(gen, text: str, chosen: list[int], position: int, other: int) -> dict:
    """Decode `chosen[:position]` after the prompt one token at a time (the autoregressive kernels) and compare
    the target's logits at `position`: the chosen token's minus `other`'s, and the largest |logit| for scale."""
    if position >= len(chosen) or other < 0:  # one output is a prefix of the other: an end token's near-tie
        return {"position": position, "prefix_only": True}
    target, ids = gen.target, gen.encode_chat(text)
    target.cache.truncate(0)
    for start in range(0, len(ids), 64):
        logits, argmax = target.forward(np.asarray(ids[start:start + 64], np.int64))
        target.cache.truncate(start + len(ids[start:start + 64]))
    for token in chosen[:position]:
        logits, argmax = target.forward(np.array([token], np.int64))
        target.cache.truncate(target.cache.length + 1)
    row = logits[0].astype(np.float64)
    return {"position": position, "margin": round(float(row[chosen[position]] - row[other]), 4),
            "max_abs_logit": round(float(np.abs(row).max()), 2), "argmax_is_chosen": int(argmax[0]) == chosen[position]}


@one_line_errors  # bad input (a bundle, a dataset line): one `error:` line, as the CLI gives
def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    args = ap.parse_args()
    t0 = time.perf_counter()
    gen = speccompile.load(args.bundle, device=args.device, context_cache=False)
    load_s = time.perf_counter() - t0
    questions = [q for qs in load_questions(default_dataset()).values() for q in qs][:args.prompts]
    gen.generate("Warm up the kernels.", max_new_tokens=16)  # first-call allocations, autotuning
    gen.generate("Warm up the kernels.", max_new_tokens=16, speculate=False)
    plain, spec, ratio, committed, passes, differing = [], [], [], 0, 0, []
    for q in questions:
        a = gen.generate(q["text"], max_new_tokens=args.max_new_tokens, speculate=False)
        b = gen.generate(q["text"], max_new_tokens=args.max_new_tokens)
        if a.token_ids != b.token_ids:
            differing.append((q["text"], a.token_ids, b.token_ids))
        plain.append(a.stats["tokens_per_second"])
        spec.append(b.stats["tokens_per_second"])
        ratio.append(spec[-1] / plain[-1])
        committed += b.stats["mean_accepted_tokens"] * b.stats["verify_steps"]
        passes += b.stats["verify_steps"]
    divergences = [decode_margin(gen, text, a, *first_difference(a, b)) for text, a, b in differing]
    dtype = read_manifest(args.bundle).get("dtype", "float32")
    ties = all(near_tie(d, dtype) for d in divergences)
    print(json.dumps({"device": args.device, "prompts": len(questions), "max_new_tokens": args.max_new_tokens,
                      "load_s": round(load_s, 2), "autoregressive_tok_s": round(statistics.median(plain), 1),
                      # every autoregressive step reads the target's weights once: what the step rate achieves
                      "autoregressive_weight_GB_s": round(statistics.median(plain) * gen.target.weight_bytes / 1e9, 1),
                      "speculative_tok_s": round(statistics.median(spec), 1),
                      "paired_speedup": round(geometric_mean(ratio), 2),  # as bench pairs them
                      "mean_accepted_tokens": round(committed / passes, 2) if passes else 1.0,  # over every pass
                      "identical_prompts": len(questions) - len(differing), "identical": not differing,
                      "dtype": dtype, "divergences": divergences, "all_near_ties": ties}))
    return 0 if ties else 1


def first_difference(a: list[int], b: list[int]) -> tuple[int, int]:
    """The first position where b departs from a, and b's token there."""
    i = next(i for i in range(min(len(a), len(b)) + 1) if i == min(len(a), len(b)) or a[i] != b[i])
    return i, b[i] if i < len(b) else -1


if __name__ == "__main__":
    sys.exit(main())
