"""Self-speculative early exit (kind "layerskip"): the target's first L layers with its norm and head, drafting
as a separate draft model does (drafters/draft_model.py)."""
from __future__ import annotations

from speccompile.runtime.drafters.base import RuntimeContext
from speccompile.runtime.drafters.draft_model import DraftModelDrafter
from speccompile.runtime.engine import Engine


def load(entry: dict, ctx: RuntimeContext) -> DraftModelDrafter:
    # An early exit reads the target's weight file: unpacked, its matrices stay the mapped file's pages (one copy
    # in memory); it multiplies one row at a time, where packing gains nothing.
    engine = Engine(ctx.bundle_dir, ctx.model(entry), ctx.threads, ctx.device, max_rows=ctx.max_rows, prepack=False,
                    cache=ctx.slot_cache(entry))
    return DraftModelDrafter(entry["name"], engine)
