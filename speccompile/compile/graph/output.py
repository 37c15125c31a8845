"""The graph's outputs after the last block: the hidden states heads read, and the output head on the rows asked for.

Only the rows asked for (input logits_index) reach the head: the head is the largest matrix of a small model.
"""
from __future__ import annotations

import numpy as np

from speccompile.compile.graph.linear import int8_product
from speccompile.compile.quantize.int8 import SUFFIX_CODES, SUFFIX_SCALES
from speccompile.graphs.builder import GraphBuilder

NORM_TAP = "norm"  # the aux feature after the final norm (EAGLE-1's), beside layer ids


def hidden_outputs(g: GraphBuilder, x: str, h: str, taps: dict | None = None, aux_layers=None) -> tuple[str, str]:
    """Emit hidden_states (h, the residual stream before the final norm: what MTP/EAGLE-style heads consume) and,
    with aux_layers, aux_hidden_states: those taps side by side (layer id i = the stream entering layer i, the
    layer count = after the last layer, NORM_TAP = x). Returns (the rows of x that logits_index asks for, the
    constant [0] for squeezing the batch axis). A batched graph's rows are packed as one sequence's: [1, P, *]."""
    batch = g.const(np.array([0], np.int64))

    def rows_of(t, **out):
        return g.op("Squeeze", [t, batch], **out)[0]

    rows_of(h, outputs=["hidden_states"])
    if aux_layers:
        taps = taps | {NORM_TAP: x}
        rows_of(g.op("Concat", [taps[t] for t in aux_layers], axis=-1)[0], outputs=["aux_hidden_states"])
    rows = g.op("Gather", [rows_of(x), "logits_index"], axis=0)[0]
    return rows, batch


def float_head(g: GraphBuilder, rows: str, head: str) -> str:
    """logits = rows [R, H] times the head [V, H] transposed."""
    return g.op("Gemm", [rows, head], outputs=["logits"], transB=1)[0]


def draft_head(g: GraphBuilder, rows: str, W: dict[str, str]) -> str:
    """A draft head's logits: its own output matrix (mtp.head, a draft vocabulary; int8 or float32), else the
    target's head, as an int8 screen over the whole vocabulary or float32 (lm_head, or the tied embedding)."""
    if "mtp.head" + SUFFIX_CODES in W:
        return int8_product(g, rows, W["mtp.head" + SUFFIX_CODES], W.get("mtp.head" + SUFFIX_SCALES), output="logits")
    if "head_screen.codes" in W:
        return int8_product(g, rows, W["head_screen.codes"], W.get("head_screen.scales"), output="logits")
    return float_head(g, rows, W.get("mtp.head", W.get("lm_head", W["embed"])))


def greedy_token(g: GraphBuilder, logits: str, draft_to_target: str | None = None) -> str:
    """next_token: the argmax, mapped back to a target token id through draft_to_target for a draft vocabulary."""
    if draft_to_target is None:
        return g.op("ArgMax", [logits], outputs=["next_token"], axis=-1, keepdims=0)[0]
    return g.op("Gather", [draft_to_target, g.op("ArgMax", [logits], axis=-1, keepdims=0)[0]],
                outputs=["next_token"], axis=0)[0]
