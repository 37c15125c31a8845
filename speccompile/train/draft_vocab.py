"""Draft vocabularies (EAGLE-3 style): the target tokens most frequent in a head's training data. A head's output
matrix then has that many rows instead of the target's whole vocabulary, most of a draft step's cost on a small
model; a draft can never propose a token outside it."""
from __future__ import annotations

import json
import os

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save as safetensors_bytes

from speccompile.errors import CheckpointError
from speccompile.train.files import write_file, write_json
from speccompile.train.gen import gen_records
from speccompile.train.heads import HEAD_TENSORS


def frequent_tokens(tokens: np.ndarray, size: int) -> np.ndarray:
    """The `size` most frequent ids of `tokens` (ties: the lower id), ascending: a draft vocabulary."""
    counts = np.bincount(tokens)
    return np.sort(np.argsort(-counts, kind="stable")[:min(size, int((counts > 0).sum()))])


def earlier_vocab(head_path: str) -> np.ndarray:
    """The draft vocabulary stored in an MTP head file (its `mtp.d2t`)."""
    with safe_open(head_path, "np") as f:
        if "mtp.d2t" not in f.keys():
            raise ValueError(f"{head_path}: no draft vocabulary (mtp.d2t) to keep")
        return f.get_tensor("mtp.d2t").astype(np.int64)


def read_mtp_head(path: str) -> tuple[dict, dict]:
    """(tensors, metadata) of the MTP head file stage vocab adds to; anything else is refused, never rewritten."""
    if not os.path.isfile(path):
        raise CheckpointError(f"--out {path}: no MTP head there (stage vocab adds to the head the export stage "
                              "wrote)")
    try:
        with safe_open(path, "np") as f:
            meta, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"--out {path}: not a readable safetensors file ({e})") from None
    if not set(HEAD_TENSORS) <= set(tensors):
        raise CheckpointError(f"--out {path}: not an MTP head (no {min(set(HEAD_TENSORS) - set(tensors))}); stage "
                              "vocab adds a draft vocabulary to the head --arch mtp exported")
    return tensors, meta


def add_draft_vocab(head_path: str, gen_paths: list[str], size: int, made_by: str,
                    keep: np.ndarray | None = None) -> tuple[int, float]:
    """Store a draft vocabulary of `size` tokens, picked from the responses of gen_paths (work dirs' gen.jsonl),
    in the MTP head file as `mtp.d2t` (draft index -> target token id), and in the head's record beside it if any
    (made_by: the command, for the record). `keep`: ids it holds as well (a warm start's earlier vocabulary,
    whose training data is not at hand). (tokens chosen, share of training tokens they cover)."""
    tensors, meta = read_mtp_head(head_path)
    responses = [r["response_ids"] for path in gen_paths for r in gen_records(path)]
    tokens = np.concatenate([np.asarray(r, np.int64) for r in responses])
    chosen = frequent_tokens(tokens, size)
    if keep is not None:
        chosen = np.union1d(chosen, keep)
    covered = float(np.isin(tokens, chosen).mean())
    tensors["mtp.d2t"] = chosen.astype(np.int64)
    meta |= {"draft_vocab": str(len(chosen)), "draft_vocab_coverage": f"{covered:.4f}"}
    write_file(head_path, lambda f: f.write(safetensors_bytes(tensors, metadata=meta)))
    record = os.path.splitext(head_path)[0] + ".json"  # the head's record, if it sits beside it
    if os.path.isfile(record):
        with open(record) as f:
            r = json.load(f)
        r["bytes"] = os.path.getsize(head_path)  # the file grew by the map
        r["draft_vocabulary"] = {"tensor": "mtp.d2t", "size": len(chosen), "coverage_of_training_responses": covered,
                                 "made_by": made_by}
        write_json(record, r, indent=2)
    return len(chosen), covered
