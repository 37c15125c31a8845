"""A training run's stages in order, each skipped when its output already exists in --work (unless --redo names
it); what each stage took goes to WORK/info.json and from there into the head's record."""
from __future__ import annotations

import json
import os
import zipfile

import numpy as np
import torch

from speccompile.train.draft_vocab import add_draft_vocab, earlier_vocab
from speccompile.train.features import aux_layer_ids, aux_path, check_features_target, stage_aux, stage_features
from speccompile.train.files import write_json
from speccompile.train.gen import gen_description, gen_records, stage_gen
from speccompile.train.loop import stage_train
from speccompile.train.medusa import train_medusa
from speccompile.train.options import TrainOptions
from speccompile.train.progress import log
from speccompile.train.prompts import read_prompts
from speccompile.train.target import check_head_target, target_config, target_hf_dir, target_identity


class Work:
    """The files of a work directory."""

    def __init__(self, root: str):
        self.root = root
        self.gen = os.path.join(root, "gen.jsonl")
        self.features = os.path.join(root, "features.npz")
        self.info_path = os.path.join(root, "info.json")
        self.info = json.load(open(self.info_path)) if os.path.isfile(self.info_path) else {}

    def save_info(self) -> None:
        write_json(self.info_path, self.info)


def run_gen(a: TrainOptions, hf_dir: str, w: Work, prompts: list) -> None:
    if "gen" in a.redo_set and os.path.isfile(w.gen):
        os.remove(w.gen)
    seconds, written = stage_gen(a, hf_dir, w.gen, prompts)
    if not written:  # nothing left to generate: no round of data to record
        return
    w.info["gen_seconds"] = w.info.get("gen_seconds", 0.0) + seconds
    w.info.setdefault("gen_rounds", []).append(
        {"prompts": a.prompts or f"speccompile.train.prompts.make_prompts({a.num_prompts}, seed={a.seed})",
         "generator": gen_description(a),
         "max_new_tokens": a.max_new_tokens, "sample_frac": a.sample_frac, "temperature": a.temperature,
         "seconds": round(seconds, 1)})
    w.save_info()


def features_current(w: Work) -> bool:
    """features.npz holds every sequence of gen.jsonl (a later gen run, with more prompts or minutes, may have
    added some: the features stage then runs again)."""
    if not os.path.isfile(w.gen):
        return True
    try:
        with np.load(w.features) as d:
            have = set(d["prompt_idx"].tolist())
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return True  # an unreadable file: check_features_target names it
    if have != {r["idx"] for r in gen_records(w.gen)}:
        log(f"features: {w.features} lacks sequences of {w.gen}: computing them again")
        return False
    return True


def run_aux(a: TrainOptions, hf_dir: str, w: Work) -> None:
    """EAGLE-3's layer features of every features file the head trains on (when missing or of other layers), all
    in --work."""
    layers = aux_layer_ids(a, target_config(hf_dir))
    for fp in [w.features] + a.extra_feature_paths:
        path = aux_path(fp, w.root)
        have = list(np.load(path)["layers"]) if os.path.isfile(path) else None
        older = have is not None and os.path.getmtime(path) < os.path.getmtime(fp)  # features computed again
        if have != layers or older or "aux" in a.redo_set:
            log(f"aux: layers {layers} of {fp}")
            w.info["aux_seconds"] = w.info.get("aux_seconds", 0.0) + stage_aux(a, hf_dir, fp, path, layers)
            w.save_info()


def run_vocab(a: TrainOptions, w: Work) -> None:
    """A reduced draft vocabulary for the exported MTP head, from the responses of every round it trained on."""
    gens = [w.gen] + [os.path.join(os.path.dirname(p), "gen.jsonl") for p in a.extra_feature_paths]
    made_by = (f"speccompile train-head --arch mtp --stages vocab --out HEAD --work W "
               f"{'--extra-features W2/features.npz ' if a.extra_feature_paths else ''}--draft-vocab {a.draft_vocab}")
    keep = earlier_vocab(a.draft_vocab_keep) if a.draft_vocab_keep else None
    if keep is not None:
        made_by += f" --draft-vocab-keep {os.path.basename(a.draft_vocab_keep)}"
    size, covered = add_draft_vocab(a.out, gens, a.draft_vocab, made_by, keep)
    log(f"vocab: {size} draft tokens cover {covered:.2%} of the training response tokens")


def run(a: TrainOptions) -> None:
    """Run the stages --stages names (gen, features, aux, train, export, vocab) for --arch."""
    torch.set_num_threads(a.threads)
    stages = a.stage_list
    prompts = read_prompts(a.prompts, a.num_prompts, a.seed) if "gen" in stages else []  # checked before any work
    hf_dir = target_hf_dir(a.target, a.work)
    trains = bool({"aux", "train", "export"} & set(stages))
    if trains and a.arch != "medusa":  # before any stage's work
        check_head_target(hf_dir, a.arch)
    os.makedirs(a.work, exist_ok=True)
    w = Work(a.work)
    identity = target_identity(hf_dir) if trains or "features" in stages else ""
    if trains and a.extra_feature_paths:  # before any stage's work
        check_features_target(a.extra_feature_paths, identity, w.features)
    if "gen" in stages:
        run_gen(a, hf_dir, w, prompts)
    if "features" in stages and (not os.path.isfile(w.features) or "features" in a.redo_set
                                 or not features_current(w)):
        w.info["features_seconds"] = stage_features(a, hf_dir, w.gen, w.features, identity)
        w.save_info()
    if trains:
        check_features_target([w.features], identity, w.features)
    if a.arch == "eagle3" and "aux" in stages:
        run_aux(a, hf_dir, w)
    if a.arch == "medusa" and ("train" in stages or "export" in stages):
        train_medusa(a, hf_dir, [w.features] + a.extra_feature_paths)
    elif "train" in stages or "export" in stages:
        stage_train(a, hf_dir, w.features, w.info, "train" in stages, "export" in stages)
    if a.arch == "mtp" and "vocab" in stages:
        run_vocab(a, w)
