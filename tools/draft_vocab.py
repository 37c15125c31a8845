"""Give a trained MTP head a reduced draft vocabulary (EAGLE-3 style): the N target tokens most frequent in the
head's training data, stored in the head file as `mtp.d2t` (draft index -> target token id). The head's output
matrix then has N rows instead of the target's whole vocabulary, which is most of a draft step's cost on a small
model. Prints the share of training tokens the set covers (a draft can never propose a token outside it).

    python tools/draft_vocab.py HEAD.safetensors --data gen.jsonl [--size 8192]
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np


def frequent_tokens(tokens: np.ndarray, size: int) -> np.ndarray:
    """The `size` most frequent ids of `tokens` (ties: the lower id), ascending: a draft vocabulary."""
    counts = np.bincount(tokens)
    return np.sort(np.argsort(-counts, kind="stable")[:min(size, int((counts > 0).sum()))])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("head")
    ap.add_argument("--data", required=True, help="jsonl with response_ids (the head's training data; "
                    "comma-separated: several)")
    ap.add_argument("--size", type=int, default=8192)
    a = ap.parse_args(argv)
    responses = []
    for path in a.data.split(","):
        with open(path) as f:
            responses += [json.loads(line)["response_ids"] for line in f]
    tokens = np.concatenate([np.asarray(r, np.int64) for r in responses])
    chosen = frequent_tokens(tokens, a.size)
    total, covered = len(tokens), float(np.isin(tokens, chosen).mean())
    from safetensors import safe_open
    from safetensors.numpy import save_file
    with safe_open(a.head, "np") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["mtp.d2t"] = chosen.astype(np.int64)
    meta |= {"draft_vocab": str(len(chosen)), "draft_vocab_coverage": f"{covered:.4f}"}
    save_file(tensors, a.head, metadata=meta)
    print(f"{len(chosen)} draft tokens cover {covered:.2%} of {total} training tokens")
    record = a.head.rsplit(".", 1)[0] + ".json"  # train_head.py's record of the head, if it sits beside it
    if os.path.isfile(record):
        with open(record) as f:
            r = json.load(f)
        r["bytes"] = os.path.getsize(a.head)  # the file grew by the map
        r["draft_vocabulary"] = {"tensor": "mtp.d2t", "size": len(chosen), "coverage_of_training_responses": covered,
                                 "made_by": "python tools/draft_vocab.py HEAD --data "
                                            f"{','.join(os.path.basename(p) for p in a.data.split(','))} "
                                            f"--size {a.size}"}
        with open(record, "w") as f:
            json.dump(r, f, indent=2)


if __name__ == "__main__":
    main()
