"""Stages features and aux: teacher-forced target passes over the generated data.

features: per token, h (the residual stream after the last layer, before the final norm) and the target's top-k
next-token distribution, in WORK/features.npz, tagged with the target's identity (target.target_identity: features
of another target are never trained on as this one's). aux (EAGLE-3): the residual stream entering three target
layers, in WORK/aux.npz (an --extra-features file's in WORK too: another work dir is only read)."""
from __future__ import annotations

import hashlib
import os
import time
import zipfile

import numpy as np
import torch

from speccompile.compile.drafters.eagle import default_aux_layers
from speccompile.errors import SpeccompileError
from speccompile.train.files import write_file
from speccompile.train.gen import gen_records
from speccompile.train.options import TrainOptions
from speccompile.train.progress import log
from speccompile.train.target import load_target

PASS_BATCH = 8  # sequences per teacher-forced pass


def _padded(seqs: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Right padding: positions 0.. as in the runtime."""
    L = max(map(len, seqs))
    inp = torch.zeros((len(seqs), L), dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for r, s in enumerate(seqs):
        inp[r, :len(s)] = torch.as_tensor(s)
        mask[r, :len(s)] = 1
    return inp, mask


def _features_by_sequence(a: TrainOptions, model, recs: list[dict]) -> dict:
    """Sequence index -> (tokens, h, top-k ids, top-k probabilities), passes over length-sorted batches."""
    captured = {}
    hook = model.model.norm.register_forward_pre_hook(lambda m, args: captured.__setitem__("h", args[0]))
    order = sorted(range(len(recs)), key=lambda j: len(recs[j]["prompt_ids"]) + len(recs[j]["response_ids"]))
    results, t0 = {}, time.time()
    for b in range(0, len(order), PASS_BATCH):
        batch = order[b:b + PASS_BATCH]
        seqs = [recs[j]["prompt_ids"] + recs[j]["response_ids"] for j in batch]
        inp, mask = _padded([torch.tensor(s) for s in seqs])
        with torch.no_grad():
            logits = model(input_ids=inp, attention_mask=mask).logits
            top = torch.log_softmax(logits.float(), -1).topk(a.topk, -1)
        h = captured["h"]
        for r, j in enumerate(batch):
            n = len(seqs[r])
            results[j] = (np.asarray(seqs[r], np.int32), h[r, :n].numpy().astype(np.float32),
                          top.indices[r, :n].numpy().astype(np.int32),
                          top.values[r, :n].exp().numpy().astype(np.float16))
        log(f"features: {min(b + PASS_BATCH, len(order))}/{len(order)} sequences  {time.time() - t0:.0f}s")
    hook.remove()
    return results


def stage_features(a: TrainOptions, hf_dir: str, gen_path: str, out_path: str, identity: str) -> float:
    """Teacher-forced target passes over gen.jsonl into features.npz (tagged with the target's identity); the
    seconds it took."""
    recs = sorted(gen_records(gen_path), key=lambda r: r["idx"])
    if not recs:
        raise SpeccompileError(f"{gen_path} holds no sequences: the gen stage generated none (no prompts, or none "
                               "the --gen-bundle's context leaves room for)")
    _, model = load_target(hf_dir)
    t0 = time.time()
    results = _features_by_sequence(a, model, recs)
    cols = [results[j] for j in range(len(recs))]
    offsets = np.cumsum([0] + [len(c[0]) for c in cols])
    arrays = dict(tokens=np.concatenate([c[0] for c in cols]), h=np.concatenate([c[1] for c in cols]),
                  topk_ids=np.concatenate([c[2] for c in cols]), topk_p=np.concatenate([c[3] for c in cols]),
                  offsets=np.asarray(offsets, np.int64),
                  prompt_idx=np.asarray([r["idx"] for r in recs], np.int64),
                  prompt_len=np.asarray([len(r["prompt_ids"]) for r in recs], np.int64),
                  temperature=np.asarray([r["temperature"] for r in recs], np.float32),
                  target=np.asarray(identity))
    write_file(out_path, lambda f: np.savez(f, **arrays))
    return time.time() - t0


def check_features_target(paths: list[str], identity: str, own: str) -> None:
    """Every features file was computed from this target (`own`, --work's file, may predate the tag; an
    --extra-features file must carry it). A file that does not load is one error too."""
    for p in paths:
        try:
            with np.load(p) as d:
                stored = str(d["target"]) if "target" in d.files else None
        except FileNotFoundError:
            raise SpeccompileError(f"{p}: no features file (run the features stage)") from None
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise SpeccompileError(f"{p}: unreadable features file ({e}); run its features stage again "
                                   "(--redo features)") from None
        if p == own and stored not in (None, identity):
            raise SpeccompileError(f"{p} holds the features of another target than this run's: run --redo "
                                   "features, or use the --work of that target")
        if p != own and stored != identity:
            raise SpeccompileError(f"--extra-features {p}: " + (
                "features of another target than this run's; only a work dir of the same target adds data" if stored
                else "its features record no target (an older speccompile wrote them): run its features stage "
                     "again (--redo features in its --work)"))


def aux_layer_ids(a: TrainOptions, cfg: dict) -> list[int]:
    """The three target layers an EAGLE-3 head reads, ascending (--aux-layers, or the default)."""
    n = cfg["num_hidden_layers"]
    ids = [int(x) for x in a.aux_layers.split(",")] if a.aux_layers else default_aux_layers(n)
    if len(set(ids)) != 3 or min(ids) < 0 or max(ids) > n:
        raise SpeccompileError(f"--aux-layers: three distinct layer ids in 0..{n}, got {ids}")
    return sorted(ids)


def aux_path(feat_path: str, work: str) -> str:
    """EAGLE-3's layer features of a features file, in --work: aux.npz for its own, aux-extra-HASH.npz (of the
    path) for an --extra-features file, whose work dir is only read."""
    if os.path.dirname(os.path.abspath(feat_path)) == os.path.abspath(work):
        return os.path.join(work, "aux.npz")
    return os.path.join(work, f"aux-extra-{hashlib.sha256(os.path.abspath(feat_path).encode()).hexdigest()[:16]}.npz")


class _Enough(Exception):
    """Raised by the last tap's hook: the layers above it are not needed."""


def _tap_layers(model, layers: list[int], seen: dict) -> list:
    """Hooks that keep the input of each layer of `layers` (L = the final norm's) and stop the pass at the last."""
    n_layers = len(model.model.layers)

    def tap(i):
        def hook(mod, args, kwargs=None):
            seen[i] = args[0] if args else kwargs["hidden_states"]
            if i == layers[-1]:
                raise _Enough
        return hook
    return [(model.model.norm if i == n_layers else model.model.layers[i]).register_forward_pre_hook(
        tap(i), with_kwargs=True) for i in layers]


def _aux_features(model, tokens: np.ndarray, off: np.ndarray, layers: list[int]) -> np.ndarray:
    """float16 [tokens, 3H]: the taps of every sequence, concatenated in ascending layer order."""
    seen = {}
    hooks = _tap_layers(model, layers, seen)
    aux = np.zeros((len(tokens), len(layers) * model.config.hidden_size), np.float16)
    n_seq = len(off) - 1
    order = sorted(range(n_seq), key=lambda j: off[j + 1] - off[j])
    t0 = time.time()
    try:
        for b in range(0, n_seq, PASS_BATCH):
            batch = order[b:b + PASS_BATCH]
            inp, mask = _padded([torch.as_tensor(tokens[off[j]:off[j + 1]].astype(np.int64)) for j in batch])
            with torch.no_grad():
                try:
                    model.model(input_ids=inp, attention_mask=mask)
                except _Enough:
                    pass
            x = torch.cat([seen[i].float() for i in layers], -1)
            for r, j in enumerate(batch):
                aux[off[j]:off[j + 1]] = x[r, :int(off[j + 1] - off[j])].numpy().astype(np.float16)
            if (b // PASS_BATCH) % 20 == 0 or b + PASS_BATCH >= n_seq:
                log(f"aux: {min(b + PASS_BATCH, n_seq)}/{n_seq} sequences  {time.time() - t0:.0f}s")
    finally:
        for h in hooks:
            h.remove()
    return aux


def stage_aux(a: TrainOptions, hf_dir: str, feat_path: str, out_path: str, layers: list[int]) -> float:
    """EAGLE-3's features for every token of a features file: the target's residual stream entering each layer
    of `layers` (layer L = after the last layer, before the final norm), float16 [tokens, 3H] in out_path. The
    pass stops at the highest tap (the layers above it and the LM head are skipped). The seconds it took."""
    _, model = load_target(hf_dir, a.aux_dtype)
    t0 = time.time()
    d = np.load(feat_path)
    aux = _aux_features(model, d["tokens"], d["offsets"], layers)
    write_file(out_path, lambda f: np.savez(f, aux=aux, layers=np.asarray(layers, np.int64),
                                                 dtype=np.asarray(a.aux_dtype)))
    return time.time() - t0
