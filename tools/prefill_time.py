"""How long a prompt takes to its first token (prefill), plain decoding, the context cache off: per prompt the best of
--repeats runs, then the prompts' total and milliseconds per prompt token. Prints whether speccompile's 4-bit
products run on AMX here; SPECCOMPILE_Q4_ISA=avx512 times the VNNI kernel alone, so alternating runs with and
without it compare the two (docs/results.md, "AMX for prefill").

    python tools/prefill_time.py BUNDLE [--dataset question.jsonl] [--limit 26] [--repeats 3] [--threads 2]
"""
import argparse
import time

import numpy as np

import speccompile
from speccompile.bench.prompts import default_dataset, load_questions, pick_prompts
from speccompile.cli.errors import one_line_errors
from speccompile.errors import SpeccompileError
from speccompile.plugins import q4_matmul


@one_line_errors  # bad input (a bundle, a dataset line): one `error:` line, as the CLI gives
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--dataset", default=None, help="Spec-Bench-style question.jsonl (default: the shipped prompts)")
    ap.add_argument("--limit", type=int, default=26, help="prompts, picked round-robin over categories")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.repeats < 1:
        raise SpeccompileError("--repeats: must be at least 1")
    g = speccompile.load(args.bundle, threads=args.threads, context_cache=False)
    prompts, _ = pick_prompts(load_questions(args.dataset or default_dataset()), args.limit, g.encode_chat,
                              g.max_seq_len - 1)
    g.generate(prompts[0]["ids"], 1, speculate=False, chat=False)  # warm-up
    best = []
    for p in prompts:
        runs = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            g.generate(p["ids"], 1, speculate=False, chat=False)
            runs.append(time.perf_counter() - t0)
        best.append(min(runs))
    tokens = sum(len(p["ids"]) for p in prompts)
    kernels = "AMX for 16 rows or more" if q4_matmul.uses_amx() else "no AMX"
    print(f"{len(prompts)} prompts, {tokens} prompt tokens ({kernels}): first tokens after {sum(best) * 1e3:.1f} ms "
          f"in all, {sum(best) / tokens * 1e3:.3f} ms a prompt token; per prompt median "
          f"{np.median(best) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
