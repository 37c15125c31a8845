"""Train Medusa heads for a target by self-distillation on CPU, from the features tools/train_head.py computed.

Medusa-1 (Cai et al., 2024; the target stays frozen): head k (k = 0..K-1) reads the target's last hidden state at
position t, normed as its LM head reads it, and guesses x_{t+k+2} (the target itself gives x_{t+1}):

    x = final_norm(h_t);  x = x + SiLU(W_k x + b_k);  logits_k = lm_head(x)

W_k, b_k start at zero (each head starts as the target's own head) and are the only weights trained; lm_head is the
target's, frozen, and written into the file as each head's output matrix -- FasterDecoding's public layout
(`{k}.0.linear.weight|bias`, `{k}.1.weight`), which `speccompile build --draft medusa:PATH` reads. Labels are the
target's teacher-forced top-k distribution at position t+k+1 (the one that predicts x_{t+k+2}); the loss is their
soft cross-entropy, head k weighted 0.8^k as in Medusa. The training softmax runs over a reduced vocabulary (tokens
in the data plus the target's likely ones); evaluation uses the full one.

    python tools/train_head.py --stages gen,features --work W      # the data, shared with the MTP head
    python tools/train_medusa.py --features W/features.npz --out /tmp/medusa/heads.safetensors
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_head import Data, log, soft_ce  # noqa: E402  (the features file, its packing and the loss)


def heads_module(hidden: int, k: int):
    import torch
    w = torch.nn.Parameter(torch.zeros(k, hidden, hidden))
    b = torch.nn.Parameter(torch.zeros(k, hidden))
    return w, b


def normed(h, wfinal, eps):
    import torch
    h = torch.as_tensor(h, dtype=torch.float32)
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * wfinal


def head_outputs(x, w, b):
    """[T, H] -> [K, T, H]: each head's residual SiLU block."""
    import torch
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


def evaluate(data: Data, ids, w, b, wfinal, eps, emb_w, K: int) -> dict:
    """Per head, on the response positions of held-out greedy sequences (full vocabulary): top-1 agreement with the
    target's greedy token at its position, and the soft cross-entropy to the target's distribution there."""
    import torch
    hit, ce, tot = np.zeros(K), np.zeros(K), np.zeros(K)
    with torch.no_grad():
        for j in ids:
            if data.temp[j] != 0:
                continue
            tok, h, ti, _ = data.seq(j)
            out = head_outputs(normed(h, wfinal, eps), w, b)
            for k in range(K):
                valid, lab, p = labels(data, j, k)
                valid &= np.arange(len(tok)) >= data.prompt_len[j] - 1
                logits = out[k] @ emb_w.T
                hit[k] += int((logits.argmax(-1).numpy() == lab[:, 0])[valid].sum())
                m = torch.as_tensor(valid)
                ce[k] += float(soft_ce(logits, torch.as_tensor(lab), torch.as_tensor(p), m)) * int(valid.sum())
                tot[k] += int(valid.sum())
    return {"top1_per_head": (hit / np.maximum(tot, 1)).tolist(), "ce_per_head": (ce / np.maximum(tot, 1)).tolist(),
            "positions": int(tot[0])}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", required=True, help="features.npz of tools/train_head.py (comma-separated: several)")
    ap.add_argument("--target", default=None, help="the target's HF dir (default: the one beside the features)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--tokens-per-step", type=int, default=2048)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--train-minutes", type=float, default=10.0)
    ap.add_argument("--holdout", type=float, default=0.05)
    ap.add_argument("--vocab-min-p", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--init", default=None, help="start from these heads' weights (an earlier run's --out)")
    a = ap.parse_args(argv)
    import torch
    from safetensors.torch import load_file, save_file
    torch.set_num_threads(a.threads)
    paths = a.features.split(",")
    hf = a.target or os.path.join(os.path.dirname(paths[0]), "target_hf")
    cfg = json.load(open(os.path.join(hf, "config.json")))
    tensors = load_file(os.path.join(hf, "model.safetensors"))
    emb_w = tensors.get("lm_head.weight", tensors["model.embed_tokens.weight"]).float()
    wfinal, eps = tensors["model.norm.weight"].float(), float(cfg["rms_norm_eps"])
    data = Data(paths, a.holdout, a.seed)
    K, H = a.heads, emb_w.shape[1]
    keep = np.zeros(emb_w.shape[0], bool)
    keep[data.tokens] = True
    keep[data.topk_ids[data.topk_p >= a.vocab_min_p]] = True
    sub = np.nonzero(keep)[0]
    vmap = np.full(emb_w.shape[0], -1, np.int64)
    vmap[sub] = np.arange(len(sub))
    W = emb_w[torch.as_tensor(sub)].contiguous()
    log(f"medusa: {K} heads; {data.n_seq} sequences, {len(data.tokens)} tokens; softmax over {len(sub)} tokens")
    w, b = heads_module(H, K)
    if a.init:  # warm start: an earlier run's blocks (its output matrices are the target's head anyway)
        prev = load_file(a.init)
        with torch.no_grad():
            for k in range(K):
                w[k].copy_(prev[f"{k}.0.linear.weight"].float())
                b[k].copy_(prev[f"{k}.0.linear.bias"].float())
        log(f"medusa: weights from {a.init}")
    opt = torch.optim.AdamW([w, b], lr=a.lr, betas=(0.9, 0.95), weight_decay=0.0)
    rows = data.pack(data.train_ids, a.tokens_per_step, a.seed)
    total = max(1, int(len(rows) * a.epochs))
    rows = (rows * math.ceil(a.epochs))[:total]
    ev0 = evaluate(data, data.eval_ids, w, b, wfinal, eps, emb_w, K)
    log(f"init held-out top-1 per head: {[round(x, 3) for x in ev0['top1_per_head']]}")
    t0, step, losses = time.time(), 0, []
    weights = torch.tensor([0.8 ** k for k in range(K)])
    for step, row in enumerate(rows, 1):
        el = time.time() - t0
        if el > a.train_minutes * 60:
            log("medusa: time budget spent"); break
        lr = a.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, max(step / total, el / (a.train_minutes * 60)))))
        for g in opt.param_groups:
            g["lr"] = lr
        x = torch.cat([normed(data.seq(j)[1], wfinal, eps) for j in row])
        out = head_outputs(x, w, b)
        loss = 0.0
        for k in range(K):
            v, li, lp = zip(*(labels(data, j, k) for j in row))
            li = torch.as_tensor(vmap[np.concatenate(li)])
            lp = torch.where(li >= 0, torch.as_tensor(np.concatenate(lp)), torch.zeros(()))
            loss = loss + weights[k] * soft_ce(out[k] @ W.T, li.clamp(min=0), lp,
                                               torch.as_tensor(np.concatenate(v)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if step % 20 == 0 or step == len(rows):
            log(f"medusa: step {step}/{total}  loss {float(loss.detach()):.3f}  lr {lr:.2e}  {el / 60:.1f} min")
    train_s = time.time() - t0
    ev = evaluate(data, data.eval_ids, w, b, wfinal, eps, emb_w, K)
    log(f"held-out top-1 per head: {[round(x, 3) for x in ev['top1_per_head']]}")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    out = {}
    for k in range(K):
        out[f"{k}.0.linear.weight"] = w[k].detach().to(torch.float16).contiguous()
        out[f"{k}.0.linear.bias"] = b[k].detach().to(torch.float16).contiguous()
        out[f"{k}.1.weight"] = emb_w.to(torch.float16).contiguous()
    save_file(out, a.out, metadata={"format": "medusa", "medusa_num_heads": str(K), "medusa_num_layers": "1"})
    record = {"file": os.path.basename(a.out), "heads": K, "features": paths, "init_from": a.init,
              "train_sequences": len(data.train_ids),
              "steps": step, "tokens_per_step": a.tokens_per_step, "lr": a.lr, "train_seconds": round(train_s, 1),
              "softmax_tokens": int(len(sub)), "heldout_init": ev0, "heldout": ev,
              "train_loss_first_last": [losses[0], losses[-1]] if losses else None}
    with open(os.path.splitext(a.out)[0] + ".json", "w") as f:
        json.dump(record, f, indent=2)
    log(f"wrote {a.out} ({os.path.getsize(a.out) / 1e6:.0f} MB) and its .json")
    return record


if __name__ == "__main__":
    main()
