"""`speccompile train-head`: train a draft head by self-distillation."""
from __future__ import annotations

import signal
import sys

import click

from speccompile.cli.errors import errors_to_exit
from speccompile.errors import SpeccompileError
from speccompile.train.cli_options import train_head_options

TRAIN_DEPENDENCIES = {"torch", "transformers", "safetensors", "accelerate", "tqdm"}


@click.command("train-head")
@train_head_options
@errors_to_exit
def train_head(**options):
    """Train a draft head for a target by self-distillation, on CPU.

    Each stage is skipped when its output already exists in --work (unless --redo names it):

    \b
      gen       the target's own continuations of a prompt set (greedy, and a
                share sampled), with its chat template: WORK/gen.jsonl
                (--gen-bundle: decoded by a compiled bundle, not transformers)
      features  teacher-forced target passes: the residual stream after the
                last layer and the target's top-k next-token distribution at
                every position: WORK/features.npz
      aux       (eagle3) the target's residual stream entering its three
                EAGLE-3 layers at every token: aux.npz beside each features file
      train     the head: AdamW, warmup + cosine lr, distillation over unrolled
                depths plus a feature regression; a checkpoint per epoch
                (--resume continues from the last, --init warm-starts)
      export    float16 safetensors and a JSON record of how it was trained
                (medusa: train and export are one step)
      vocab     (mtp) a reduced draft vocabulary for the exported head: the
                --draft-vocab tokens most frequent in the training responses
                (--draft-vocab-keep: and every token of an earlier head's)

    Needs the train extra: pip install "speccompile[train]".
    """
    # SIGTERM (a kill, a job scheduler's stop) as an exit, as Ctrl-C: a file being written (features.npz, a
    # checkpoint, the head) leaves no temporary copy behind, and the run resumes from what was written whole
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        from speccompile.train.options import DEFAULT_OUT, TrainOptions
        from speccompile.train.pipeline import run
    except ModuleNotFoundError as e:
        if e.name not in TRAIN_DEPENDENCIES:
            raise
        click.echo(f'error: training needs {e.name}, which is not installed: pip install "speccompile[train]"',
                   err=True)
        sys.exit(2)
    stages = set(options["stages"].split(","))
    writes = stages & {"export", "vocab"} or (options["arch"] == "medusa" and "train" in stages)
    if writes and not options["out"] and (options["arch"] != "mtp" or options["target"] is not None):
        raise SpeccompileError("--out is required: the default output is the shipped head of the default model, "
                               "trained with --arch mtp on the default target")
    run(TrainOptions(**{**options, "out": options["out"] or DEFAULT_OUT}))
