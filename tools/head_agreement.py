"""A bundle's draft head, teacher-forced on the target's own greedy answers: how often its first draft is the
target's next token, per category, and prompt lookup's beside it (speccompile/bench/head_agreement.py says what
is counted).

    python tools/head_agreement.py BUNDLE [--drafter mtp] [--dataset question.jsonl] [--limit 26]
        [--max-new-tokens 128] [--threads 2]

Greedy decoding with a chain of one draft takes these guesses where its passes fall (`speccompile bench B
--drafter mtp@chain:1` prints that live rate as "acceptance rate per draft depth"); a head trained for the target
shows here what it gives on other prompts than its training data's.
"""
from __future__ import annotations

import argparse

import speccompile
from speccompile.bench.head_agreement import Agreement, answer_agreement
from speccompile.bench.prompts import default_dataset, load_questions, pick_prompts
from speccompile.cli.errors import one_line_errors


@one_line_errors  # bad input (a bundle, a dataset line): one `error:` line, as the CLI gives
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--drafter", default="mtp")
    ap.add_argument("--dataset", default=default_dataset(), help="Spec-Bench-format question.jsonl")
    ap.add_argument("--limit", type=int, default=26)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    gen = speccompile.load(a.bundle, threads=a.threads, context_cache=False)
    prompts, _ = pick_prompts(load_questions(a.dataset), a.limit, gen.encode_chat,
                              gen.max_seq_len - a.max_new_tokens)
    by_category: dict[str, Agreement] = {}
    overall = Agreement()
    for i, p in enumerate(prompts, 1):
        one = answer_agreement(gen, a.drafter, p["ids"], a.max_new_tokens)
        by_category.setdefault(p["category"], Agreement()).add(one)
        overall.add(one)
        print(f"[{i}/{len(prompts)}] {p['category']:<16} {one.rate:.3f} of {one.positions}", flush=True)
    print(f"\nfirst-draft agreement, {a.drafter}, teacher-forced on greedy answers ({a.max_new_tokens} tokens):")
    for category, agreement in by_category.items():
        print(f"  {category:<16} {agreement.rate:.3f}  ({agreement.positions} positions)")
    print(f"  {'overall':<16} {overall.rate:.3f}  ({overall.positions} positions)")
    print_lookup(overall)


def print_lookup(overall: Agreement) -> None:
    """Prompt lookup's first drafts beside the head's, by match length, and the two together."""
    P = max(overall.positions, 1)
    print("prompt lookup's first draft (the most recent match's next token), by the n-gram matched:")
    for n, (at, look, head) in sorted(overall.lookup.items()):
        print(f"  {n}-gram  {at / P:.3f} of positions: lookup right {look / at:.3f}, the head {head / at:.3f}")
    print(f"either right {overall.either / P:.3f}; lookup proposes the head's draft at {overall.agreed / P:.3f} of "
          f"positions, right there {overall.agreed_hits / max(overall.agreed, 1):.3f}")


if __name__ == "__main__":
    main()
