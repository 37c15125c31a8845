"""`speccompile train-head`'s command-line options, one per TrainOptions field (options.py). Kept here so the
CLI module stays a table of commands; importing this module imports click only, never torch."""
from __future__ import annotations

import click


def train_head_options(fn):
    """Apply every train-head option to the click command `fn`."""
    for option in reversed(OPTIONS):
        fn = option(fn)
    return fn


OPTIONS = [
    click.option("--arch", type=click.Choice(["mtp", "eagle", "eagle3", "medusa"]), default="mtp", show_default=True,
                 help="mtp: a DeepSeek-V3 MTP module (--out FILE.safetensors); eagle / eagle3: an EAGLE-1 / EAGLE-3 head "
                      "in its public layout (--out DIR: model.safetensors, config.json, training.json); medusa: Medusa-1 "
                      "heads (--out FILE.safetensors, FILE.json beside it)."),
    click.option("--target", default=None, help="Target source: HF dir, hub id org/name (local cache), .gguf, or "
                 "default (SmolLM2-135M-Instruct)."),
    click.option("--target-name", default=None,
                 help="Recorded in the head's metadata [default: the --target's file or folder name; "
                      "SmolLM2-135M-Instruct for the default target]."),
    click.option("--out", default=None, help="Where the head goes (eagle/eagle3: a new folder, or one an earlier "
                 "export wrote) [default: the shipped SmolLM2 MTP head's path]."),
    click.option("--work", default="/tmp/train_head", show_default=True, help="Data, features and epoch checkpoints."),
    click.option("--stages", default="gen,features,aux,train,export", show_default=True,
                 help="Comma-separated; aux runs for eagle3 only, vocab (not run by default) for mtp only."),
    click.option("--redo", default="", help="Stages to redo even if their output exists (comma-separated)."),
    click.option("--seed", type=int, default=0, show_default=True),
    click.option("--prompts", default=None, help="UTF-8 file, one prompt a line: {\"prompt\": ...} or {\"messages\": "
                 "[...]} (a line that starts with '{'), else the line's text; checked before any stage "
                 "[default: speccompile.train.prompts.make_prompts]."),
    click.option("--num-prompts", type=int, default=600, show_default=True),
    click.option("--max-new-tokens", type=int, default=160, show_default=True),
    click.option("--sample-frac", type=float, default=0.25, show_default=True,
                 help="Share of prompts continued by sampling."),
    click.option("--temperature", type=float, default=0.7, show_default=True),
    click.option("--gen-batch", type=int, default=32, show_default=True),
    click.option("--gen-dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True,
                 help="Precision of the generating target (the text only; features are always float32)."),
    click.option("--gen-bundle", default=None,
                 help="Generate the text with this compiled bundle of the target (speccompile's own runtime: "
                      "speculative, several sequences per pass) instead of transformers; prompts that leave it no "
                      "room are skipped."),
    click.option("--gen-minutes", type=float, default=20.0, show_default=True, help="Stop generating after this long."),
    click.option("--gen-tokens", type=int, default=0, show_default=True,
                 help="Stop generating once the data holds this many tokens (0: no limit)."),
    click.option("--aux-layers", default=None,
                 help="EAGLE-3: the target layers whose input the head reads (comma-separated) [default: 2, L/2, L-3]."),
    click.option("--aux-dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True,
                 help="EAGLE-3: precision of the target pass that computes its layer features."),
    click.option("--topk", type=int, default=8, show_default=True,
                 help="Target distribution kept per position (distillation)."),
    click.option("--holdout", type=float, default=0.05, show_default=True,
                 help="Share of sequences held out for evaluation."),
    click.option("--epochs", type=float, default=None, help="[default: 4; medusa: 1.0]"),
    click.option("--lr", type=float, default=None, help="[default: 6e-4; medusa: 1e-3]"),
    click.option("--min-lr-frac", type=float, default=0.05, show_default=True),
    click.option("--warmup", type=int, default=20, show_default=True),
    click.option("--weight-decay", type=float, default=0.01, show_default=True),
    click.option("--tokens-per-step", type=int, default=None, help="[default: 1024; medusa: 2048]"),
    click.option("--depth2-weight", type=float, default=0.5, show_default=True,
                 help="Loss weight of each unrolled depth."),
    click.option("--unroll", type=int, default=2, show_default=True,
                 help="Depths trained per step: the head fed its own output depth after depth (EAGLE-3's "
                      "training-time test)."),
    click.option("--reg-weight", type=float, default=0.1, show_default=True,
                 help="Smooth-L1 of norm(o) toward the target's next feature."),
    click.option("--train-minutes", type=float, default=None,
                 help="Stop training (and export) after this long [default: 35; medusa: 10]."),
    click.option("--threads", type=int, default=2, show_default=True),
    click.option("--extra-features", default="", help="Comma-separated features.npz of other work dirs of the same "
                 "target to train on as well (their info.json rounds go into the record; only read)."),
    click.option("--init", default=None, help="Start from these weights (safetensors only): an exported head (its "
                 "--out, e.g. the shipped head's .safetensors) or a --work's ckpt/final.safetensors (medusa: an "
                 "earlier run's --out)."),
    click.option("--resume", is_flag=True, help="Continue training from the last epoch checkpoint in --work (a run "
                 "without it starts over: the earlier epoch checkpoints are removed)."),
    click.option("--full-vocab", is_flag=True, help="Train over the full vocabulary (slower)."),
    click.option("--vocab-min-p", type=float, default=None,
                 help="Training softmax: tokens in the data or this likely [default: 0.01; medusa: 0.02]."),
    click.option("--draft-vocab", type=int, default=8192, show_default=True,
                 help="Size of the draft vocabulary: EAGLE-3's head, or stage vocab's for an MTP head."),
    click.option("--draft-vocab-keep", default=None,
                 help="Stage vocab: also keep every token of this MTP head file's draft vocabulary (the head a "
                      "warm start began from, whose training data is not at hand)."),
    click.option("--heads", type=int, default=3, show_default=True, help="Medusa: number of heads."),
    click.option("--log-every", type=int, default=10, show_default=True),
    click.option("--eval-chain", type=int, default=4, show_default=True,
                 help="Draft chain length for the acceptance estimate."),
]
