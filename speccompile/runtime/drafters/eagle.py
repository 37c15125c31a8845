"""EAGLE-1/2 and EAGLE-3 heads as drafters (layouts: speccompile/compile/drafters/eagle.py).

Drafting is the MTP head's (drafters/mtp.py): the head's own KV cache holds one slot per committed pair (f_t,
x_{t+1}); it drafts autoregressively on its own output features, and trees grow by top-k per depth (EAGLE-2's
dynamic trees, or static ones). What differs is the feature it reads from the target: EAGLE-1 the target's
output after its final norm, EAGLE-3 three of its layers fused by the head's fc (a graph of its own, run as the
target's rows are committed).
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort

from speccompile.format.bundle import resolve_inside
from speccompile.runtime.drafters.base import RuntimeContext
from speccompile.runtime.drafters.features import aux_columns
from speccompile.runtime.drafters.mtp import MtpDrafter
from speccompile.runtime.engine import Engine, open_session, session_options


def load(entry: dict, ctx: RuntimeContext) -> "EagleDrafter":
    """An EAGLE-1 or EAGLE-3 head (kinds "eagle", "eagle3"): the target features it reads must be among those the
    target's graph outputs; EAGLE-3's fc that fuses them is a graph of its own (entry "fuse_model")."""
    models, head = ctx.manifest["models"], ctx.model(entry)
    cols = aux_columns(entry["name"], head, models["target"])
    fuse = None
    if entry.get("fuse_model"):
        fuse = open_session(resolve_inside(ctx.bundle_dir, models[entry["fuse_model"]]["graph"]),
                            session_options(ctx.threads), ["CPUExecutionProvider"])
    engine = Engine(ctx.bundle_dir, head, ctx.threads, ctx.device, max_rows=ctx.max_rows, cache=ctx.slot_cache(entry))
    return EagleDrafter(entry["name"], engine, cols, fuse, head.get("draft_to_target"), ctx.target.vocab_size)


class EagleDrafter(MtpDrafter):
    def __init__(self, name: str, engine: Engine, aux_columns: np.ndarray, fuse: ort.InferenceSession | None = None,
                 draft_to_target: list[int] | None = None, target_vocab: int | None = None):
        """aux_columns: the columns of the target's aux_hidden_states this head reads; fuse: EAGLE-3's fc."""
        super().__init__(name, engine, draft_to_target, target_vocab, aux_columns)
        self.fuse = fuse

    def observe(self, start: int, hidden: np.ndarray) -> None:
        if self.fuse is not None:
            hidden = self.fuse.run(["hidden"], {"aux_hidden_states": np.ascontiguousarray(hidden, np.float32)})[0]
        super().observe(start, hidden)
