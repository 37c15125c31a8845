"""Weights of draft heads that score with the target's output head (MTP, EAGLE, Medusa): what they read from
target.bin instead of a copy, and their matrices in int8 (drafts need not be exact)."""
from __future__ import annotations

from speccompile.compile.quantize.int8 import SUFFIX_CODES, quantize_matrices
from speccompile.compile.quantize.kernel_form import int8_records

HEAD_MATRICES = ("mtp.eh_proj", "mtp.fc", "mtp.l0.qkv", "mtp.l0.o", "mtp.l0.gate", "mtp.l0.up", "mtp.l0.down")


def int8_draft_head(head_w: dict, target_w: dict, int8_kernel: bool = False) -> dict:
    """A draft head's (MTP or EAGLE) matrices in int8: drafts need not be exact, and a drafting pass reads a quarter
    of the bytes. Its output head: its own rows (a draft vocabulary) in int8, else the target's int8 head screen,
    read from target.bin (see head_shared_weights), else an int8 copy of the target's head. int8_kernel: in
    speccompile's MatMulQ8 layout where they tile (quantize/kernel_form.py)."""
    if "mtp.head" not in head_w and "head_screen.codes" not in target_w:
        head_w = {**head_w, "mtp.head": target_w.get("lm_head", target_w["embed"])}
    head_w = quantize_matrices(quantize_matrices(head_w, HEAD_MATRICES), ["mtp.head"], layout="nk")
    return int8_records(head_w)[0] if int8_kernel else head_w


def target_output_head(target_w: dict, int8: bool) -> dict:
    """The target's output head as a draft head graph that scores with it reads it from target.bin (not copied):
    the int8 head screen for an int8 head, else the float32 head (lm_head, or the tied embedding)."""
    keys = ("head_screen.codes", "head_screen.scales") if int8 and "head_screen.codes" in target_w else ("lm_head",
                                                                                                          "embed")
    return {k: target_w[k] for k in keys if k in target_w}


def head_shared_weights(head_w: dict, target_w: dict) -> dict:
    """The target's tensors an MTP/EAGLE head graph reads from target.bin: embedding (or the head's int8 rows it
    is gathered from), RoPE tables, and the output head it scores with when it has none of its own."""
    shared = {k: target_w[k] for k in ("embed", "lm_head", "rope.cos", "rope.sin") if k in target_w}
    if not any(k.startswith("mtp.head") for k in head_w):
        shared |= target_output_head(target_w, int8=any(k.endswith(SUFFIX_CODES) for k in head_w))
    if "head_screen.rows" in target_w:  # a tied embedding's rows come from it (graph/head_screen.head_rows)
        shared["head_screen.rows"] = target_w["head_screen.rows"]
    return shared
