"""Drafters of slots that share the target's passes, caught up with their sequences in one pass of the drafter's
batched form (speccompile.graphs, batched form; a drafter entry's batch_model) instead of one pass each.

A drafter with a cache of its own (a draft model, an early exit, an MTP or EAGLE head) runs, before it drafts,
what its sequence committed since it last drafted, and its first draft comes from that pass's last row. Every
slot's instance of such a drafter binds its slot of one cache (RuntimeContext.slot_cache), so one pass of the
batched form writes each slot's rows where its own graph would and hands each drafter its last row (`caught_up`).
The batched form computes a row as the drafter's own graph computes it in a pass of two rows or more
(runtime/row_parity.py says where one row alone differs), so the drafts are those the request makes alone.
Medusa heads keep no cache: their one pass reads a feature row, and the slots' rows run as one pass of their graph.
"""
from __future__ import annotations

import numpy as np

from speccompile.format.memory import MAPPED_KINDS
from speccompile.runtime.batch_engine import BatchEngine, SlotStep
from speccompile.runtime.drafters.base import Drafter, RuntimeContext
from speccompile.runtime.slots import Slot


class SharedCatchUp:
    def __init__(self, ctx: RuntimeContext, before_open=lambda: None):
        """before_open(): called before a graph is opened (the scheduler checks the bundle's files unchanged)."""
        self.ctx, self.before_open = ctx, before_open
        self._engines: dict[str, BatchEngine] = {}
        self.passes = 0  # shared catch-up passes run

    def catch_up(self, slots: list[Slot], instances) -> None:
        """Catch up the drafters of `slots` (those about to draft) that have a batched form, one pass per drafter
        shared by two slots or more; instances(name): {slot: that slot's instance of the drafter}, whose
        committed K/V the pass must leave alone."""
        groups: dict[str, list[Slot]] = {}
        for s in slots:
            if s.drafter is not None and (s.drafter.name in self.ctx.slot_caches or s.drafter.takes_rows):
                groups.setdefault(s.drafter.name, []).append(s)
        for name, group in groups.items():
            if len(group) < 2:
                continue
            if name in self.ctx.slot_caches:
                self._catch_up(name, group, instances(name))
            else:
                self._run_rows(group)

    def _catch_up(self, name: str, group: list[Slot], instances: dict[int, Drafter]) -> None:
        steps, caught = [], []
        for s in group:
            step = s.drafter.catch_up_step(s.context[:s.n])
            if step is not None:
                start, tokens, positions, features = step
                steps.append(SlotStep(s.index, tokens, start, positions=positions, hidden_in=features))
                caught.append(s)
        if len(steps) < 2:  # a drafter alone runs its own graph, as it would
            return
        engine = self._engine(name)
        idle = {b: d.engine.cache.length for b, d in instances.items()}
        deepest = max([st.length for st in steps] + list(idle.values()))
        if deepest + max(len(st.tokens) for st in steps) > min(engine.cache.capacity, engine.max_seq_len):
            return  # near the context's end, a slot laid out that deep would not fit: each runs its own graph
        out = engine.run(steps, idle=idle)
        for s in caught:
            logits, argmax, rows = out[s.index]
            s.drafter.caught_up(s.context[:s.n], logits[-1], int(argmax[-1]), engine.hidden[rows[-1]])
        self.passes += 1

    def _run_rows(self, group: list[Slot]) -> None:
        """Drafters without a cache whose one pass reads a feature row (Medusa): the slots' rows in one pass."""
        steps = [s.drafter.catch_up_step(s.context[:s.n]) for s in group]
        caught = [(s, step[3]) for s, step in zip(group, steps) if step is not None]
        if len(caught) < 2:
            return
        logits = caught[0][0].drafter.run_rows(np.stack([row for _, row in caught]))
        for i, (s, _) in enumerate(caught):
            s.drafter.caught_up(s.context[:s.n], logits[:, i], -1, None)
        self.passes += 1

    def _engine(self, name: str) -> BatchEngine:
        if name not in self._engines:
            self.before_open()
            ctx = self.ctx
            entry = next(d for d in ctx.manifest["drafters"] if d["name"] == name)
            model = ctx.manifest["models"][entry["batch_model"]]
            self._engines[name] = BatchEngine(ctx.bundle_dir, model, ctx.slot_caches[name], ctx.threads, ctx.device,
                                              prepack=entry["kind"] not in MAPPED_KINDS)
        return self._engines[name]
