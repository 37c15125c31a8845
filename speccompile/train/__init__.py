"""Head training: draft heads (MTP, EAGLE-1, EAGLE-3, Medusa) self-distilled from a frozen target on CPU.

`speccompile train-head` runs it; from Python: `pipeline.run(options.TrainOptions(arch="eagle3", out=DIR, ...))`.
The stages, in order: gen.py (the target's own continuations of prompts.py's prompt sets), features.py (teacher-
forced target passes; EAGLE-3's layer features), loop.py (training with epoch checkpoints, over data.py's packed
rows, heads.py's modules started by init.py, objective.py's losses, evaluate.py's held-out metrics), export.py
(safetensors + config + record), draft_vocab.py (an MTP head's reduced vocabulary); medusa.py trains Medusa heads
from the same features. Beside them: pipeline.py (the stages in order), options.py and cli_options.py (a run's
settings), target.py (the frozen target), bundle_gen.py (a compiled bundle as gen's writer), checkpoints.py,
files.py (files written whole) and progress.py. Most modules import torch; this package file and cli_options.py
do not, so the CLI can say when it is missing.
"""
