"""`layerskip:L`: the target's first L layers with its final norm and head, a graph over target.bin's weights."""
from __future__ import annotations

import functools

from speccompile.compile.drafters.base import DrafterBuild, TargetBuild
from speccompile.compile.drafters.batched_forms import add_batched_form
from speccompile.compile.graph.decoder import build_decoder
from speccompile.compile.model_entries import decoder_entry
from speccompile.errors import SpeccompileError
from speccompile.format.drafter_kinds import DraftSpec, asked_drafter


def build(spec: DraftSpec, target: TargetBuild) -> DrafterBuild:
    cfg, opts = target.config, target.options
    L = int(spec.arg)
    if not 1 <= L < cfg.num_hidden_layers:
        asked = asked_drafter(f"layerskip:{L}")
        raise SpeccompileError(f"{asked}: the target has {cfg.num_hidden_layers} layers; choose "
                               f"1..{cfg.num_hidden_layers - 1}")
    name = f"early_exit_{L}"
    target.progress(f"      {name}: the target's first {L} layers + its norm and head (shared weights)")
    graph = functools.partial(build_decoder, cfg, target.weights, opts.max_seq_len, num_layers=L,
                              attention=opts.attention, fused=opts.fused)
    graphs = {name: (graph(name=name), ["target.bin"])}
    models = {name: decoder_entry(name, cfg, L, opts.max_seq_len, ["target.bin"], opts.attention)}
    entry = {"model": name}
    add_batched_form(name, cfg, graph, target, (graphs, models, entry))
    return DrafterBuild(entry=entry, graphs=graphs, models=models)
