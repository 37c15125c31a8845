"""A drafter graph's batched form (speccompile.graphs, batched form): the draft model's, early exit's or draft head's
block over a cache of sequence slots, so that the slots sharing the target's passes catch their drafters up in one
pass (runtime/shared_catch_up.py). It reads the drafter's own weight files: it costs the bundle a graph."""
from __future__ import annotations

from typing import Callable

from speccompile.compile.config import ModelConfig
from speccompile.compile.drafters.base import TargetBuild
from speccompile.compile.model_entries import batched_entry, batched_form
from speccompile.format.drafter_kinds import BATCHED_DECODER_KIND, BATCHED_HEAD_KIND
from speccompile.graphs import decoder_signature
from speccompile.graphs.builder import GraphBuilder
from speccompile.plugins import tree_attention

BATCH_SUFFIX = "_batch"


def add_batched_form(name: str, cfg: ModelConfig, graph: Callable[..., GraphBuilder], target: TargetBuild,
                     parts: tuple[dict, dict, dict], head: bool = False) -> None:
    """Beside model `name`, its batched form where the target has one: graph(name=..., batched=True) builds it, over
    the same files, without the target's int8 screen; parts: the drafter's (graphs, models, entry), extended in
    place (the entry names it batch_model). head: a draft head's (input hidden_in)."""
    graphs, models, entry = parts
    opts = target.options
    if opts.max_batch == 1 or not (batched_form(target.config, opts.attention, opts.dtype)
                                   and batched_form(cfg, opts.attention, opts.dtype)):
        return
    model, batch = models[name], name + BATCH_SUFFIX
    kv = model["kv_cache"]
    vocab = next(o["shape"][1] for o in model["outputs"] if o["name"] == "logits")
    signature = decoder_signature(model["num_layers"], kv["num_kv_heads"], kv["head_dim"], kv["max_seq_len"], vocab,
                                  cfg.hidden_size, mtp=head, batched=True,
                                  scratch=tree_attention.scratch_slots(opts.attention))
    graphs[batch] = (graph(name=batch, batched=True, **({} if head else {"head_screen": False})), graphs[name][1])
    models[batch] = batched_entry(model, batch, opts.max_batch, BATCHED_HEAD_KIND if head else BATCHED_DECODER_KIND,
                                  signature)
    entry["batch_model"] = batch
