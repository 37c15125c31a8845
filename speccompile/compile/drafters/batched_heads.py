"""A draft head's batched form (speccompile.graphs, model kind head_batch): the head's block over a cache of sequence
slots, so that the slots sharing the target's passes catch their heads up in one pass (runtime/shared_heads.py).
It reads the head's own weight files: it costs the bundle a graph."""
from __future__ import annotations

from typing import Callable

from speccompile.compile.config import ModelConfig
from speccompile.compile.drafters.base import TargetBuild
from speccompile.compile.model_entries import batched_entry, batched_form
from speccompile.format.drafter_kinds import BATCHED_HEAD_KIND
from speccompile.graphs import decoder_signature
from speccompile.graphs.builder import GraphBuilder
from speccompile.plugins import tree_attention

BATCH_SUFFIX = "_batch"


def add_batched_head(name: str, block: ModelConfig, graph: Callable[..., GraphBuilder], files: list[str],
                     target: TargetBuild, graphs: dict, models: dict, entry: dict) -> None:
    """Beside head `name` (its model entry in `models`), its batched form where the target has one: graph(batched=True)
    builds it; the drafter entry names it (batch_model)."""
    cfg, opts = target.config, target.options
    if opts.max_batch == 1 or block.is_mla or not batched_form(cfg, opts.attention, opts.dtype):
        return
    model, batch = models[name], name + BATCH_SUFFIX
    kv = model["kv_cache"]
    vocab = next(o["shape"][1] for o in model["outputs"] if o["name"] == "logits")
    signature = decoder_signature(1, kv["num_kv_heads"], kv["head_dim"], kv["max_seq_len"], vocab,
                                  block.hidden_size, mtp=True, batched=True,
                                  scratch=tree_attention.scratch_slots(opts.attention))
    graphs[batch] = (graph(batched=True), files)
    models[batch] = batched_entry(model, batch, opts.max_batch, BATCHED_HEAD_KIND, signature)
    entry["batch_model"] = batch
