"""A run's checkpoints in WORK/ckpt, safetensors only (nothing is unpickled): epochN.safetensors after each epoch
(the head, the optimizer's state flattened into tensors, where training stood) and final.safetensors at the end (the
head alone). Head tensors carry their exported names, so --init reads a final checkpoint as it reads an exported
head. The metadata names the head and the target dimensions it was trained for: a checkpoint of another arch,
target or layer choice is refused, by what differs, before anything is copied."""
from __future__ import annotations

import dataclasses
import json
import os

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from speccompile.errors import CheckpointError
from speccompile.train.features import aux_layer_ids
from speccompile.train.files import write_file
from speccompile.train.options import TrainOptions

FORMAT = "speccompile-train-checkpoint"
SUFFIX = ".safetensors"
FINAL = "final" + SUFFIX
OPTIMIZER = "optimizer."  # optimizer state tensors: optimizer.{parameter index}.{state key}
PROGRESS_KEYS = {"epoch", "step", "train_s", "history"}  # loop.Progress's fields
DRAFT_OFFSETS = "d2t"  # EAGLE-3's draft vocabulary: d2t[i] = target id - i
IDENTITY_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                 "vocab_size")


def head_identity(a: TrainOptions, cfg: dict) -> dict:
    """What a checkpoint must match to be continued or loaded: the arch, the target's dimensions, EAGLE-3's layers."""
    identity = {"arch": a.arch, **{k: cfg[k] for k in IDENTITY_KEYS}}
    if a.arch == "eagle3":
        identity["aux_layers"] = aux_layer_ids(a, cfg)
    return identity


def save_checkpoint(path: str, head, identity: dict, opt=None, progress=None) -> None:
    """The head's tensors (float32, exported names); with opt and progress (a loop.Progress), an epoch checkpoint."""
    tensors = {name: getattr(head, k).detach().float().contiguous() for k, name in head.names.items()}
    meta = {"format": FORMAT, "head": json.dumps(identity)}
    if getattr(head, "draft_ids", None) is not None:  # EAGLE-3: the tokens of its lm_head rows, as export stores them
        tensors[DRAFT_OFFSETS] = head.draft_ids - torch.arange(len(head.draft_ids))
    if opt is not None:
        for i, state in opt.state_dict()["state"].items():
            tensors |= {f"{OPTIMIZER}{i}.{key}": torch.as_tensor(v).contiguous() for key, v in state.items()}
        meta["progress"] = json.dumps(dataclasses.asdict(progress))
    write_file(path, lambda f: f.write(safetensors_bytes(tensors, metadata=meta)))


def read_checkpoint(path: str) -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors file; a missing, corrupt or truncated one is a CheckpointError."""
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def stored_identity(meta: dict) -> dict | None:
    """The identity a checkpoint of this module records (None for any other safetensors file)."""
    if meta.get("format") != FORMAT:
        return None
    try:
        identity = json.loads(meta.get("head", ""))
    except ValueError:
        return None
    return identity if isinstance(identity, dict) else None


def check_identity(stored: dict, identity: dict, source: str) -> None:
    if stored.get("arch") != identity["arch"]:
        raise CheckpointError(f"{source}: a checkpoint of an {stored.get('arch')} head, not {identity['arch']}")
    for key, value in identity.items():
        if stored.get(key) != value:
            raise CheckpointError(f"{source}: trained for {key} {stored.get(key)}, this run's is {value} (a "
                                  "checkpoint of another target or settings)")


def load_head(head, tensors: dict, source: str) -> None:
    """Copy the head's tensors (exported names) from `tensors`, every name and shape checked before any copy."""
    for k, name in head.names.items():
        if name not in tensors:
            raise CheckpointError(f"{source}: not a {head.arch} head of this layout (no {name})")
        got, want = tuple(tensors[name].shape), tuple(getattr(head, k).shape)
        if got != want:
            raise CheckpointError(f"{source}: {name} has shape {got}, this target's {head.arch} head needs {want} "
                                  "(a head of another target?)")
    with torch.no_grad():
        for k, name in head.names.items():
            getattr(head, k).copy_(tensors[name].float())


def load_optimizer(opt, tensors: dict, source: str) -> None:
    """The optimizer state save_checkpoint flattened, each moment checked against its parameter's shape (the
    hyperparameters are this run's own)."""
    params = [p for group in opt.param_groups for p in group["params"]]
    state = {}
    for name, t in tensors.items():
        if name.startswith(OPTIMIZER):
            index, _, key = name[len(OPTIMIZER):].partition(".")
            if not index.isdigit() or int(index) >= len(params) or (t.dim() and t.shape != params[int(index)].shape):
                raise CheckpointError(f"{source}: optimizer state {name} does not fit this head")
            state.setdefault(int(index), {})[key] = t
    saved = opt.state_dict()
    opt.load_state_dict({**saved, "state": state})


def epoch_checkpoints(ck_dir: str) -> list[str]:
    """The epoch checkpoints in ck_dir, in epoch order."""
    names = [f for f in os.listdir(ck_dir) if f.startswith("epoch") and f.endswith(SUFFIX)
             and f[len("epoch"):-len(SUFFIX)].isdigit()]
    return sorted(names, key=lambda f: int(f[len("epoch"):-len(SUFFIX)]))


def remove_epoch_checkpoints(ck_dir: str) -> None:
    """A run without --resume starts over: an earlier run's epoch files (pickled .pt ones of older versions too) go,
    or a later --resume would continue them instead of this run."""
    for f in os.listdir(ck_dir):
        if f.startswith("epoch") and f.endswith((SUFFIX, ".pt")):
            os.remove(os.path.join(ck_dir, f))


def resume_from(ck_dir: str, head, opt, identity: dict) -> tuple[str, dict] | None:
    """Load the last epoch checkpoint of ck_dir into head and opt: (its file name, its progress fields), or None
    when there is none."""
    names = epoch_checkpoints(ck_dir)
    if not names:
        if any(f.startswith("epoch") and f.endswith(".pt") for f in os.listdir(ck_dir)):
            raise CheckpointError(f"--resume: {ck_dir} holds only pickled epoch checkpoints (.pt) of an older "
                                  "speccompile, which are never loaded; train without --resume to start over")
        return None
    path = os.path.join(ck_dir, names[-1])
    tensors, meta = read_checkpoint(path)
    stored = stored_identity(meta)
    try:
        progress = json.loads(meta.get("progress", ""))
    except ValueError:
        progress = None
    if stored is None or not isinstance(progress, dict) or not PROGRESS_KEYS <= set(progress):
        raise CheckpointError(f"--resume: {path} is not an epoch checkpoint of speccompile train-head")
    check_identity(stored, identity, f"--resume: {path}")
    load_head(head, tensors, f"--resume: {path}")
    load_optimizer(opt, tensors, f"--resume: {path}")
    return names[-1], progress


def stored_draft_ids(path: str):
    """The EAGLE-3 draft vocabulary (target ids) stored with a head's weights (an exported head, its folder, or a
    checkpoint of this module), or None where none is (older checkpoints)."""
    if os.path.isdir(path):
        path = os.path.join(path, "model.safetensors")
    tensors, _ = read_checkpoint(path)
    offsets = tensors.get(DRAFT_OFFSETS)
    return None if offsets is None else (offsets.long() + torch.arange(len(offsets))).numpy()


def load_final(path: str, head, identity: dict | None, source: str) -> None:
    """A final checkpoint, or any head file in its tensor names (an exported head), into head; `source` names it
    in errors."""
    tensors, meta = read_checkpoint(path)
    stored = stored_identity(meta)
    if stored is not None and identity is not None:
        check_identity(stored, identity, source)
    load_head(head, tensors, source)
