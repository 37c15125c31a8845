"""EAGLE-1/2 and EAGLE-3 heads as drafters (layouts: speccompile/eagle.py).

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
from speccompile.errors import BundleError
from speccompile.runtime.engine import Engine, session_options
from speccompile.runtime.drafters.mtp import MtpDrafter


class EagleDrafter(MtpDrafter):
    def __init__(self, name: str, engine: Engine, aux_columns: np.ndarray, fuse: ort.InferenceSession | None = None,
                 draft_to_target: list[int] | None = None, target_vocab: int | None = None):
        """aux_columns: the columns of the target's aux_hidden_states this head reads; fuse: EAGLE-3's fc."""
        super().__init__(name, engine, draft_to_target, target_vocab)
        self.aux_columns, self.fuse = aux_columns, fuse

    def features(self, target, rows) -> np.ndarray:
        return target.aux[rows][:, self.aux_columns]

    def observe(self, start: int, hidden: np.ndarray) -> None:
        if self.fuse is not None:
            hidden = self.fuse.run(["hidden"], {"aux_hidden_states": np.ascontiguousarray(hidden, np.float32)})[0]
        super().observe(start, hidden)

    @classmethod
    def load(cls, d: dict, bundle_dir: str, manifest: dict, threads: int | None, device: str,
             max_rows: int) -> "EagleDrafter":
        models = manifest["models"]
        head, target = models[d["model"]], models["target"]
        have = target.get("aux_hidden_layers", [])
        if any(t not in have for t in head["target_features"]):
            raise BundleError(f"drafter {d['name']!r} reads target features {head['target_features']} that the "
                              f"target graph does not output ({have})")
        H = target["config"]["hidden_size"]
        cols = np.concatenate([np.arange(H) + H * have.index(t) for t in head["target_features"]])
        fuse = None
        if d.get("fuse_model"):
            fuse = ort.InferenceSession(resolve_inside(bundle_dir, models[d["fuse_model"]]["graph"]),
                                        session_options(threads), providers=["CPUExecutionProvider"])
        eng = Engine(bundle_dir, head, threads, device, max_rows=max_rows)
        target_vocab = next(o["shape"][1] for o in target["outputs"] if o["name"] == "logits")
        return cls(d["name"], eng, cols, fuse, head.get("draft_to_target"), target_vocab)
