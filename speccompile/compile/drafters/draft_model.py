"""`model:PATH`: a separate, smaller model with the target's tokenizer, lowered like the target into draft.bin."""
from __future__ import annotations

import functools

from speccompile.compile.checkpoint import Checkpoint, tokenizer_fingerprint
from speccompile.compile.drafters.base import DrafterBuild, TargetBuild
from speccompile.compile.drafters.batched_forms import add_batched_form
from speccompile.compile.graph.decoder import build_decoder
from speccompile.compile.weights.decoder import lower_weights
from speccompile.compile.model_entries import decoder_entry
from speccompile.compile.sources import load_checkpoint
from speccompile.errors import TokenizerMismatchError, UnsupportedModelError
from speccompile.format.drafter_kinds import DraftSpec


def build(spec: DraftSpec, target: TargetBuild) -> DrafterBuild:
    opts = target.options
    draft = load_checkpoint(spec.arg, target.progress)
    check_compatible(target.checkpoint, draft)
    cfg = draft.config
    cfg.check_lowerable(opts.max_seq_len)
    weights = lower_weights(cfg, draft.tensors, opts.max_seq_len)
    graph = functools.partial(build_decoder, cfg, weights, opts.max_seq_len, attention=opts.attention,
                              fused=opts.fused)
    model = decoder_entry("draft", cfg, cfg.num_hidden_layers, opts.max_seq_len, ["draft.bin"], opts.attention)
    model["source"] = draft.source
    graphs, models, entry = {"draft": (graph(name="draft"), ["draft.bin"])}, {"draft": model}, {"model": "draft"}
    add_batched_form("draft", cfg, graph, target, (graphs, models, entry))
    return DrafterBuild(entry=entry, weights={"draft.bin": weights}, graphs=graphs, models=models)


def check_compatible(target: Checkpoint, draft: Checkpoint) -> None:
    """Speculation needs one vocabulary: the same tokenizer, and no draft token the target cannot score."""
    if tokenizer_fingerprint(target.tokenizer_files) != tokenizer_fingerprint(draft.tokenizer_files):
        raise TokenizerMismatchError("the draft model's tokenizer differs from the target's "
                                     "(speculation needs one shared vocabulary)")
    if draft.config.vocab_size > target.config.vocab_size:
        raise UnsupportedModelError(f"draft vocab {draft.config.vocab_size} exceeds target vocab "
                                    f"{target.config.vocab_size}")
