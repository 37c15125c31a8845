"""A quantized bundle against the float32 build of the same model: greedy agreement and logits error.

    python tools/quant_agreement.py QUANTIZED_BUNDLE FLOAT32_BUNDLE [--limit 20] [--max-new-tokens 64]

On Spec-Bench questions (the first of each category in turn, as tools/bench_decode.py picks them): each bundle's
plain greedy answer; prompts answered identically, and the share of answer tokens before the first difference.
Then, teacher-forced on the float32 answer, per position: the quantized target's argmax against the float32 one,
and the largest logit difference relative to the largest float32 logit.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

import speccompile
from speccompile.cli.errors import one_line_errors
from speccompile.runtime.engine import Engine

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_decode import QUESTIONS, pick_prompts  # noqa: E402


def teacher_forced_logits(gen, ids: list[int]) -> np.ndarray:
    eng = Engine(gen.bundle_dir, gen.manifest["models"]["target"], threads=2, max_rows=len(ids))
    out = []
    for start in range(0, len(ids), 64):
        chunk = np.array(ids[start:start + 64], np.int64)
        logits, _ = eng.forward(chunk, rows=np.arange(len(chunk)))
        out.append(logits.copy())
        eng.cache.truncate(start + len(chunk))
    return np.concatenate(out)


@one_line_errors  # bad input (a dataset line, a bundle): one `error:` line, as the CLI gives
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("quantized")
    ap.add_argument("float32")
    ap.add_argument("--dataset", default=QUESTIONS, help="Spec-Bench question.jsonl")
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()
    q, f = speccompile.load(args.quantized, threads=2), speccompile.load(args.float32, threads=2)
    # room for the answer in both compiled contexts (a prompt that left none failed the run)
    prompts = pick_prompts(args.dataset, args.limit, f.encode_chat, min(q.max_seq_len, f.max_seq_len) -
                           args.max_new_tokens)
    same, prefix, agree, positions, errors = 0, [], 0, 0, []
    for p in prompts:
        a = f.generate(p["ids"], args.max_new_tokens, speculate=False).token_ids
        b = q.generate(p["ids"], args.max_new_tokens, speculate=False).token_ids
        same += a == b
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix.append(first / max(len(a), 1))
        seq = p["ids"] + a
        lf, lq = teacher_forced_logits(f, seq), teacher_forced_logits(q, seq)
        rows = slice(len(p["ids"]) - 1, len(seq) - 1)
        agree += int((lf[rows].argmax(-1) == lq[rows].argmax(-1)).sum())
        positions += len(a)
        errors.append(float(np.abs(lf[rows] - lq[rows]).max() / np.abs(lf[rows]).max()))
    print(json.dumps({"prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
                      "identical_answers": same, "mean_answer_share_before_first_difference": float(np.mean(prefix)),
                      "teacher_forced_argmax_agreement": agree / positions, "positions": positions,
                      "max_relative_logit_error": max(errors), "median_relative_logit_error": float(np.median(errors))},
                     indent=1))


if __name__ == "__main__":
    main()
