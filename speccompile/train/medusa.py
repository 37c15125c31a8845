"""Medusa heads (--arch medusa) trained by self-distillation from the features stage's data.

Medusa-1 (Cai et al., 2024; the target stays frozen): head k (k = 0..K-1) reads the target's last hidden state at
position t, normed as its LM head reads it, and guesses x_{t+k+2} (the target itself gives x_{t+1}):

    x = final_norm(h_t);  x = x + SiLU(W_k x + b_k);  logits_k = lm_head(x)

W_k, b_k start at zero (each head starts as the target's own head) and are the only weights trained; lm_head is the
target's, frozen, and written into the file as each head's output matrix -- FasterDecoding's public layout
(`{k}.0.linear.weight|bias`, `{k}.1.weight`), which `speccompile build --draft medusa:PATH` reads. Labels are the
target's teacher-forced top-k distribution at position t+k+1 (the one that predicts x_{t+k+2}); the loss is their
soft cross-entropy, head k weighted 0.8^k as in Medusa. The training softmax runs over a reduced vocabulary (tokens
in the data plus the target's likely ones); evaluation uses the full one.
"""
from __future__ import annotations

import math
import os
import time

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes

from speccompile.errors import CheckpointError
from speccompile.train.checkpoints import read_checkpoint
from speccompile.train.data import Data
from speccompile.train.files import write_file, write_json
from speccompile.train.objective import soft_ce
from speccompile.train.options import TrainOptions
from speccompile.train.progress import log
from speccompile.train.target import output_head, target_config, target_tensors

HEAD_WEIGHT_DECAY = 0.8  # head k's loss weight: 0.8^k


def normed(h, wfinal, eps):
    h = torch.as_tensor(h, dtype=torch.float32)
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * wfinal


def head_outputs(x, w, b):
    """[T, H] -> [K, T, H]: each head's residual SiLU block."""
    y = torch.einsum("th,koh->kto", x, w) + b[:, None, :]
    return x[None] + torch.nn.functional.silu(y)


def labels(data: Data, j: int, k: int):
    """Positions t of sequence j whose head-k label (the target's distribution at t+k+1) predicts a real token past
    the shared header, with those labels."""
    tok, h, ti, tp = data.seq(j)
    n = len(tok)
    t = np.arange(n)
    valid = (t + k + 1 <= n - 2) & (t + k + 1 >= data.shared)
    p = np.minimum(t + k + 1, n - 1)
    return valid, ti[p], tp[p]


class Medusa:
    """The target's frozen parts the heads use, and the K heads' trained blocks w [K, H, H], b [K, H]."""

    def __init__(self, hf_dir: str, heads: int):
        cfg, tensors = target_config(hf_dir), target_tensors(hf_dir)
        self.emb_w = output_head(tensors)
        self.wfinal, self.eps = tensors["model.norm.weight"].float(), float(cfg["rms_norm_eps"])
        self.K, H = heads, self.emb_w.shape[1]
        self.w = torch.nn.Parameter(torch.zeros(heads, H, H))
        self.b = torch.nn.Parameter(torch.zeros(heads, H))

    def outputs(self, h):
        return head_outputs(normed(h, self.wfinal, self.eps), self.w, self.b)

    def load(self, path: str) -> None:
        """Warm start: an earlier run's blocks (its output matrices are the target's head anyway), every name and
        shape checked before any copy."""
        prev, _ = read_checkpoint(path)
        H = self.w.shape[1]
        stored = sum(name.endswith(".0.linear.weight") for name in prev)
        for k in range(self.K):
            for name, shape in ((f"{k}.0.linear.weight", (H, H)), (f"{k}.0.linear.bias", (H,))):
                if name not in prev:
                    raise CheckpointError(f"--init {path}: " + (f"holds {stored} Medusa heads, not the {self.K} of "
                                                                 "--heads" if stored else f"not a Medusa heads file "
                                                                 f"of this layout (no {name})"))
                if tuple(prev[name].shape) != shape:
                    raise CheckpointError(f"--init {path}: {name} has shape {tuple(prev[name].shape)}, this "
                                          f"target's heads need {shape} (heads of another target?)")
        with torch.no_grad():
            for k in range(self.K):
                self.w[k].copy_(prev[f"{k}.0.linear.weight"].float())
                self.b[k].copy_(prev[f"{k}.0.linear.bias"].float())

    def save(self, path: str) -> None:
        out = {}
        for k in range(self.K):
            out[f"{k}.0.linear.weight"] = self.w[k].detach().to(torch.float16).contiguous()
            out[f"{k}.0.linear.bias"] = self.b[k].detach().to(torch.float16).contiguous()
            out[f"{k}.1.weight"] = self.emb_w.to(torch.float16).contiguous()
        meta = {"format": "medusa", "medusa_num_heads": str(self.K), "medusa_num_layers": "1"}
        write_file(path, lambda f: f.write(safetensors_bytes(out, metadata=meta)))


def evaluate(data: Data, ids, m: Medusa) -> dict:
    """Per head, on the response positions of held-out greedy sequences (full vocabulary): top-1 agreement with the
    target's greedy token at its position, and the soft cross-entropy to the target's distribution there."""
    hit, ce, tot = np.zeros(m.K), np.zeros(m.K), np.zeros(m.K)
    with torch.no_grad():
        for j in ids:
            if data.temp[j] != 0:
                continue
            tok, h, _, _ = data.seq(j)
            out = m.outputs(h)
            for k in range(m.K):
                valid, lab, p = labels(data, j, k)
                valid &= np.arange(len(tok)) >= data.prompt_len[j] - 1
                logits = out[k] @ m.emb_w.T
                hit[k] += int((logits.argmax(-1).numpy() == lab[:, 0])[valid].sum())
                mask = torch.as_tensor(valid)
                ce[k] += float(soft_ce(logits, torch.as_tensor(lab), torch.as_tensor(p), mask)) * int(valid.sum())
                tot[k] += int(valid.sum())
    return {"top1_per_head": (hit / np.maximum(tot, 1)).tolist(), "ce_per_head": (ce / np.maximum(tot, 1)).tolist(),
            "positions": int(tot[0])}


def softmax_vocab(a: TrainOptions, data: Data, emb_w) -> tuple[np.ndarray, np.ndarray]:
    """The training softmax's tokens: those in the data or with target probability >= --vocab-min-p; (their ids,
    target id -> index among them, -1 outside)."""
    keep = np.zeros(emb_w.shape[0], bool)
    keep[data.tokens] = True
    keep[data.topk_ids[data.topk_p >= a.vocab_min_p]] = True
    sub = np.nonzero(keep)[0]
    vmap = np.full(emb_w.shape[0], -1, np.int64)
    vmap[sub] = np.arange(len(sub))
    return sub, vmap


def row_loss(data: Data, m: Medusa, row: list[int], vmap: np.ndarray, W) -> torch.Tensor:
    """Medusa's loss over one packed row: each head's soft cross-entropy over the softmax tokens W, weighted."""
    out = head_outputs(torch.cat([normed(data.seq(j)[1], m.wfinal, m.eps) for j in row]), m.w, m.b)
    weights = torch.tensor([HEAD_WEIGHT_DECAY ** k for k in range(m.K)])
    loss = 0.0
    for k in range(m.K):
        v, li, lp = zip(*(labels(data, j, k) for j in row))
        li = torch.as_tensor(vmap[np.concatenate(li)])
        lp = torch.where(li >= 0, torch.as_tensor(np.concatenate(lp)), torch.zeros(()))
        loss = loss + weights[k] * soft_ce(out[k] @ W.T, li.clamp(min=0), lp, torch.as_tensor(np.concatenate(v)))
    return loss


def epoch_rows(data: Data, tokens_per_step: int, seed: int, epochs: float) -> list[list[int]]:
    """`epochs` of training rows, each whole epoch packed in an order of its own (Data.epoch_rows, as the MTP and
    EAGLE loop packs its epochs), a fraction of an epoch cut from the next one's."""
    per_epoch = [data.epoch_rows(tokens_per_step, seed, ep) for ep in range(math.ceil(epochs))]
    return [row for rows in per_epoch for row in rows][:max(1, int(len(per_epoch[0]) * epochs))]


def _train_steps(a: TrainOptions, data: Data, m: Medusa, vmap: np.ndarray, W) -> tuple[int, list[float], float]:
    """Cosine-lr AdamW steps over --epochs of packed rows or --train-minutes; (steps, losses, seconds)."""
    opt = torch.optim.AdamW([m.w, m.b], lr=a.lr, betas=(0.9, 0.95), weight_decay=0.0)
    rows = epoch_rows(data, a.tokens_per_step, a.seed, a.epochs)
    total = len(rows)
    t0, step, losses = time.time(), 0, []
    for step, row in enumerate(rows, 1):
        el = time.time() - t0
        if el > a.train_minutes * 60:
            log("medusa: time budget spent")
            break
        lr = a.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, max(step / total, el / (a.train_minutes * 60)))))
        for g in opt.param_groups:
            g["lr"] = lr
        loss = row_loss(data, m, row, vmap, W)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if step % 20 == 0 or step == len(rows):
            log(f"medusa: step {step}/{total}  loss {float(loss.detach()):.3f}  lr {lr:.2e}  {el / 60:.1f} min")
    return step, losses, time.time() - t0


def train_medusa(a: TrainOptions, hf_dir: str, paths: list[str]) -> dict:
    """Train --heads Medusa heads on the features files `paths`, write them to --out with a record beside it
    (OUT.json); the record."""
    m = Medusa(hf_dir, a.heads)
    data = Data(paths, a.holdout, a.seed)
    sub, vmap = softmax_vocab(a, data, m.emb_w)
    W = m.emb_w[torch.as_tensor(sub)].contiguous()
    log(f"medusa: {m.K} heads; {data.n_seq} sequences, {len(data.tokens)} tokens; softmax over {len(sub)} tokens")
    if a.init:
        m.load(a.init)
        log(f"medusa: weights from {a.init}")
    ev0 = evaluate(data, data.eval_ids, m)
    log(f"init held-out top-1 per head: {[round(x, 3) for x in ev0['top1_per_head']]}")
    step, losses, train_s = _train_steps(a, data, m, vmap, W)
    ev = evaluate(data, data.eval_ids, m)
    log(f"held-out top-1 per head: {[round(x, 3) for x in ev['top1_per_head']]}")
    m.save(a.out)
    record = {"file": os.path.basename(a.out), "heads": m.K, "features": paths, "init_from": a.init,
              "train_sequences": len(data.train_ids),
              "steps": step, "tokens_per_step": a.tokens_per_step, "lr": a.lr, "train_seconds": round(train_s, 1),
              "softmax_tokens": int(len(sub)), "heldout_init": ev0, "heldout": ev,
              "train_loss_first_last": [losses[0], losses[-1]] if losses else None}
    write_json(a.record_path, record, indent=2)
    log(f"wrote {a.out} ({os.path.getsize(a.out) / 1e6:.0f} MB) and its .json")
    return record
