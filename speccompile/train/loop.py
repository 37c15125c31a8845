"""Stage train (MTP and EAGLE heads): AdamW, warmup + cosine lr, depth-1 and unrolled-depth distillation plus a
feature regression; a checkpoint per epoch in WORK/ckpt (--resume continues from the last), WORK/ckpt/final.safetensors
at the end (--init starts another run from it); checkpoints.py writes and checks them."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from speccompile.errors import CheckpointError, SpeccompileError
from speccompile.train.checkpoints import (FINAL, head_identity, load_final, remove_epoch_checkpoints, resume_from,
                                           save_checkpoint, stored_draft_ids)
from speccompile.train.data import Data, make_row
from speccompile.train.draft_vocab import frequent_tokens
from speccompile.train.evaluate import evaluate
from speccompile.train.files import write_json
from speccompile.train.export import export
from speccompile.train.features import aux_layer_ids
from speccompile.train.heads import Head
from speccompile.train.init import init_head, load_weights
from speccompile.train.objective import feat_loss, head_forward, soft_ce
from speccompile.train.options import TrainOptions
from speccompile.train.progress import f3, log
from speccompile.train.target import output_head, target_config, target_tensors


@dataclasses.dataclass
class Setup:
    """What training and export share: the target's config and weights (emb_w its embedding, out_w its output head:
    lm_head, or the embedding where tied), the data, the head, the training softmax (vmap: target id -> row of W,
    -1 outside; W None: EAGLE-3's own head)."""
    cfg: dict
    emb_w: torch.Tensor
    out_w: torch.Tensor
    wfinal: torch.Tensor
    data: Data
    h_rms: float
    head: Head
    vmap: np.ndarray | None
    W: torch.Tensor | None


def pick_draft_vocab(data: Data, size: int, weights: str | None = None) -> tuple[np.ndarray, float]:
    """EAGLE-3's draft vocabulary: the one stored with the weights the head starts from (their lm_head rows are
    those tokens'; picked again from other data they would be another's), else the `size` tokens most frequent in
    the training responses (ascending ids); and the share of held-out response tokens it covers (a draft can never
    propose a token outside it)."""
    ids = stored_draft_ids(weights) if weights else None
    if ids is None:
        ids = frequent_tokens(data.response_tokens(data.train_ids), size)
    return ids, float(np.isin(data.response_tokens(data.eval_ids), ids).mean())


def load_data(a: TrainOptions, cfg: dict, feat_path: str, info: dict) -> Data:
    """The features of --work and --extra-features as one set; the record lists every round of data it holds."""
    extra = a.extra_feature_paths
    data = Data([feat_path] + extra, a.holdout, a.seed, aux_layer_ids(a, cfg) if a.arch == "eagle3" else None,
                a.work)
    for p in extra:
        side = os.path.join(os.path.dirname(p), "info.json")
        rounds = json.load(open(side)).get("gen_rounds", []) if os.path.isfile(side) else []
        info["gen_rounds"] = [r for r in rounds if r not in info.get("gen_rounds", [])] + info.get("gen_rounds", [])
    return data


def training_vocab(a: TrainOptions, data: Data, out_w, draft_ids) -> tuple[np.ndarray | None, torch.Tensor | None]:
    """Training logits over the rows of out_w (the target's output head, which the runtime scores MTP and EAGLE-1
    heads with) of the tokens that occur in the data or the target's likely next tokens (the softmax over the rest
    costs most of the step and moves little); evaluation always uses the full vocabulary. EAGLE-3 trains its own
    head over its draft vocabulary; labels outside it carry no weight."""
    if draft_ids is not None:
        vmap = np.full(out_w.shape[0], -1, np.int64)
        vmap[draft_ids] = np.arange(len(draft_ids))
        return vmap, None
    if a.full_vocab:
        return None, out_w
    keep = np.zeros(out_w.shape[0], bool)
    keep[data.tokens] = True
    keep[data.topk_ids[data.topk_p >= a.vocab_min_p]] = True
    keep[data.topk_ids[:, 0]] = True
    sub = np.nonzero(keep)[0]
    vmap = np.full(out_w.shape[0], -1, np.int64)
    vmap[sub] = np.arange(len(sub))
    log(f"training softmax over {len(sub)} of {out_w.shape[0]} tokens")
    return vmap, out_w[torch.as_tensor(sub)].contiguous()


def prepare(a: TrainOptions, hf_dir: str, feat_path: str, info: dict, weights: str | None = None) -> Setup:
    """weights: the file the head's weights will come from (--init, or the final checkpoint an export reads)."""
    cfg, tensors = target_config(hf_dir), target_tensors(hf_dir)
    emb_w, wfinal = tensors["model.embed_tokens.weight"].float(), tensors["model.norm.weight"].float()
    out_w = output_head(tensors)
    data = load_data(a, cfg, feat_path, info)
    H = cfg["hidden_size"]  # rms of the residual stream (EAGLE-3: its highest tap's)
    h_rms = float(np.median(np.sqrt((data.h[::97, -H:].astype(np.float32) ** 2).mean(-1))))
    log(f"data: {data.n_seq} sequences, {len(data.tokens)} tokens; train {len(data.train_ids)} seqs "
        f"({data.n_tokens(data.train_ids)} tok), held out {len(data.eval_ids)} seqs "
        f"({data.n_tokens(data.eval_ids)} tok); shared header {data.shared} tokens; median rms(h) {h_rms:.2f}")
    draft_ids = None
    if a.arch == "eagle3":
        draft_ids, covered = pick_draft_vocab(data, a.draft_vocab, weights)
        info["draft_vocab"] = {"size": len(draft_ids), "coverage_of_heldout_responses": covered}
        log(f"draft vocabulary: {len(draft_ids)} tokens, {covered:.2%} of held-out response tokens")
    head = Head(cfg, float(cfg["rms_norm_eps"]), a.arch, wfinal, draft_ids)
    init_head(head, tensors, cfg["num_hidden_layers"], h_rms)
    if a.init:  # warm start: an exported head or a run's final checkpoint; new optimizer and schedule
        load_weights(head, a.init, head_identity(a, cfg))
        info["init_from"] = a.init
        log(f"weights from {a.init}")
    vmap, W = training_vocab(a, data, out_w, draft_ids)
    return Setup(cfg, emb_w, out_w, wfinal, data, h_rms, head, vmap, W)


def make_optimizer(a: TrainOptions, head: Head) -> torch.optim.AdamW:
    """AdamW, weight decay on the matrices only."""
    decay, no_decay = [], []
    for _, p in head.named_parameters():
        (no_decay if p.dim() == 1 else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=a.lr, betas=(0.9, 0.95))


def lr_at(a: TrainOptions, total: int, step: int, elapsed: float = 0.0) -> float:
    """Warmup, then cosine over progress = the further of steps done and --train-minutes spent (so a run cut short
    by the time budget, e.g. on a busy machine, still ends annealed)."""
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    t = max((step - a.warmup) / max(1, total - a.warmup), elapsed / (a.train_minutes * 60))
    return a.lr * (a.min_lr_frac + (1 - a.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


@dataclasses.dataclass
class Progress:
    """Where training stands (what an epoch checkpoint holds besides the weights)."""
    epoch: int = 0
    step: int = 0
    train_s: float = 0.0
    history: list = dataclasses.field(default_factory=list)
    data: dict = dataclasses.field(default_factory=dict)  # data_settings of the run (none in older checkpoints)


def data_settings(a: TrainOptions, data: Data) -> dict:
    """What fixes the held-out split and the order of the rows: a run resumed with others would train on sequences
    the earlier epochs held out, and its held-out figures would no longer be held out."""
    return {"seed": a.seed, "holdout": a.holdout, "tokens_per_step": a.tokens_per_step, "sequences": data.n_seq,
            "tokens": len(data.tokens)}


def resume(a: TrainOptions, s: Setup, ck_dir: str, opt) -> Progress:
    """Load the last epoch checkpoint of ck_dir into the head and opt; where it stood (a fresh start if none)."""
    found = resume_from(ck_dir, s.head, opt, head_identity(a, s.cfg))
    if found is None:
        return Progress()
    name, p = found
    try:
        at = Progress(int(p["epoch"]), int(p["step"]), float(p["train_s"]), list(p["history"]), dict(p.get("data", {})))
    except (TypeError, ValueError):
        raise CheckpointError(f"--resume: {name} records a malformed progress ({p})"[:300]) from None
    now = data_settings(a, s.data)
    changed = [f"{k} {at.data[k]} -> {now[k]}" for k in now if k in at.data and at.data[k] != now[k]]
    if changed:
        raise CheckpointError(f"--resume: {name} was trained on other data or settings ({', '.join(changed)}); "
                              "resume with the same --seed, --holdout, --tokens-per-step and data, or train without "
                              "--resume to start over")
    log(f"resumed from {name} (epoch {at.epoch}, step {at.step})")
    return at


def step_losses(a: TrainOptions, s: Setup, row: list[int], depths: int) -> tuple:
    """(loss, [CE per depth], [feature regression per depth]) of one packed row."""
    r = make_row(s.data, row, s.vmap, depths)
    s.head.train()
    ces, regs = [], []
    for d, o in enumerate(head_forward(s.head, lambda ids: F.embedding(ids, s.emb_w), r, depths), 1):
        ces.append(soft_ce(s.head.logits(o, s.W), r[f"l{d}"], r[f"p{d}"], r[f"m{d}"]))
        # EAGLE-3 has no feature regression: its features are its own, not the target's
        regs.append(torch.zeros(()) if a.arch == "eagle3" else feat_loss(s.head, o, r[f"h{d}"], r[f"m{d}"], s.wfinal))
    loss = sum((1.0 if d == 0 else a.depth2_weight) * (ce + a.reg_weight * reg)
               for d, (ce, reg) in enumerate(zip(ces, regs)))
    return loss, ces, regs


def _log_step(a: TrainOptions, at: Progress, ri: int, n_rows: int, total: int, mean: np.ndarray, depths: int,
              gnorm: float, lr: float, elapsed: float) -> None:
    ce_s = "  ".join(f"ce{d + 1} {x:.3f}" for d, x in enumerate(mean[1:1 + depths]))
    reg_s = "" if a.arch == "eagle3" else "  " + "  ".join(f"reg{d + 1} {x:.4f}"
                                                          for d, x in enumerate(mean[1 + depths:]))
    log(f"ep {at.epoch + 1}/{a.epochs} step {ri + 1}/{n_rows} ({at.step}/{total})  loss {mean[0]:.3f}  "
        f"{ce_s}{reg_s}  gnorm {gnorm:.2f}  lr {lr:.2e}  {elapsed / 60:.1f} min")


def train_epoch(a: TrainOptions, s: Setup, opt, at: Progress, rows: list, total: int, t0: float) -> bool:
    """One epoch's steps (at.step advances); False when the time budget ran out inside it."""
    depths = a.unroll if a.depth2_weight > 0 else 1
    sums, cnt = np.zeros(1 + 2 * depths), 0
    for ri, row in enumerate(rows):
        if time.time() - t0 > a.train_minutes * 60:
            log("train: time budget spent")
            return False
        lr_now = lr_at(a, total, at.step, time.time() - t0)
        for g in opt.param_groups:
            g["lr"] = lr_now
        loss, ces, regs = step_losses(a, s, row, depths)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(s.head.parameters(), 1.0)
        opt.step()
        at.step += 1
        sums += [float(x.detach()) for x in (loss, *ces, *regs)]
        cnt += 1
        if at.step % a.log_every == 0 or ri == len(rows) - 1:
            _log_step(a, at, ri, len(rows), total, sums / cnt, depths, float(gn), lr_now, time.time() - t0)
            sums[:], cnt = 0, 0
    return True


def end_epoch(s: Setup, opt, at: Progress, ck_dir: str, t0: float, identity: dict) -> None:
    """Held-out metrics into the history, and the epoch checkpoint."""
    s.head.eval()
    ev = evaluate(s.head, s.data, s.emb_w, s.out_w, s.data.eval_ids, 2)
    at.epoch += 1
    at.train_s = time.time() - t0
    at.history.append({"epoch": at.epoch, "step": at.step, "minutes": round(at.train_s / 60, 2),
                       "heldout_d1": ev["d1_resp"], "heldout_d2": ev["d2_resp"]})
    log(f"epoch {at.epoch} held-out: d1 {f3(ev['d1_resp'])}  d2 {f3(ev['d2_resp'])}  "
        f"d2|d1 {f3(ev['d2_resp_given_d1'])}")
    save_checkpoint(os.path.join(ck_dir, f"epoch{at.epoch}.safetensors"), s.head, identity, opt, at)


def train(a: TrainOptions, s: Setup, info: dict) -> None:
    """Epochs from the start (or the last checkpoint with --resume) to --epochs or --train-minutes; the final
    checkpoint and the run's figures in info."""
    rows_of = lambda ep: s.data.epoch_rows(a.tokens_per_step, a.seed, ep)
    steps_per_epoch = len(rows_of(0))
    if not steps_per_epoch:  # no step would run: the head would be exported as it was initialized
        raise SpeccompileError(f"train: no sequence to train on ({s.data.n_seq} in the data, all held out by "
                               f"--holdout {a.holdout}); generate more (--prompts, --num-prompts)")
    total = steps_per_epoch * a.epochs
    opt = make_optimizer(a, s.head)
    ck_dir = os.path.join(a.work, "ckpt")
    os.makedirs(ck_dir, exist_ok=True)
    if not a.resume:
        remove_epoch_checkpoints(ck_dir)
    at = resume(a, s, ck_dir, opt) if a.resume else Progress()
    at.data = data_settings(a, s.data)
    identity = head_identity(a, s.cfg)
    ev = evaluate(s.head, s.data, s.emb_w, s.out_w, s.data.eval_ids, 2)
    log(f"init held-out: d1 {f3(ev['d1_resp'])}  d2 {f3(ev['d2_resp'])}")
    t0 = time.time() - at.train_s
    for ep in range(at.epoch, a.epochs):
        if not train_epoch(a, s, opt, at, rows_of(ep), total, t0):
            break
        end_epoch(s, opt, at, ck_dir, t0, identity)
    save_checkpoint(os.path.join(ck_dir, FINAL), s.head, identity)
    info.update(train_seconds=time.time() - t0, steps=at.step, steps_per_epoch=steps_per_epoch,
                epochs_done=at.history[-1]["epoch"] if at.history else 0, history=at.history)
    write_json(os.path.join(a.work, "info.json"), info)


def load_trained(a: TrainOptions, s: Setup, ck_dir: str) -> None:
    """An export without training: the head of the last train stage (its final checkpoint, or with --resume its
    last epoch's), or --init's weights; never the head as initialized, which would be exported as trained."""
    final = os.path.join(ck_dir, FINAL)
    if os.path.isfile(final):
        load_final(final, s.head, head_identity(a, s.cfg), final)
        return
    if a.resume and os.path.isdir(ck_dir) and resume(a, s, ck_dir, make_optimizer(a, s.head)).epoch:
        return  # no final weights: the last epoch's
    if os.path.isfile(os.path.join(ck_dir, "final.pt")):
        raise CheckpointError(f"{ck_dir}/final.pt is a pickle of an older speccompile, never loaded: rerun --stages "
                              "train")
    if not a.init:
        raise CheckpointError(f"export: {ck_dir} holds no trained head ({FINAL}): run the train stage first, or "
                              "name the weights to export with --init")


def stage_train(a: TrainOptions, hf_dir: str, feat_path: str, info: dict, do_train: bool, do_export: bool) -> None:
    """Train (do_train) and/or export (do_export: from the final checkpoint when not trained in this run)."""
    ck_dir = os.path.join(a.work, "ckpt")
    final = os.path.join(ck_dir, FINAL)
    s = prepare(a, hf_dir, feat_path, info, final if not do_train and os.path.isfile(final) else a.init)
    if do_train:
        train(a, s, info)
    else:
        load_trained(a, s, ck_dir)
    if do_export:
        s.head.eval()
        log("final evaluation (held-out, full vocabulary)")
        ev = evaluate(s.head, s.data, s.emb_w, s.out_w, s.data.eval_ids, a.eval_chain)
        ev_train = evaluate(s.head, s.data, s.emb_w, s.out_w, s.data.train_ids[:len(s.data.eval_ids)], 2)
        export(a, s, info, ev, ev_train)
