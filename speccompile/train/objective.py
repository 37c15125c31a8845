"""What a head is trained on: its outputs over a packed row at each unrolled depth, and the two losses."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from speccompile.train.data import row_masks
from speccompile.train.heads import Head


def soft_ce(logits, ids, p, mask):
    """Cross-entropy against the target's top-k distribution (renormalized), mean over masked positions."""
    lp = torch.log_softmax(logits.float(), -1).gather(-1, ids)
    ce = -(p * lp).sum(-1) / p.sum(-1).clamp(min=1e-6)
    m = mask.float()
    return (ce * m).sum() / m.sum().clamp(min=1.0)


def feat_loss(head: Head, o, target, mask, wfinal):
    """Smooth-L1 between norm(o) and the target's normalized feature (both RMS-normalized, times the target's final
    norm weight: the space the LM head reads). Scale-free, like the hnorm that reads o at the next depth. EAGLE's o
    is read as it is (by the lm_head and the next depth), so it regresses on the target's feature unnormalized."""
    def n(x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * wfinal
    l = F.smooth_l1_loss(o if head.arch == "eagle" else n(o), n(target), reduction="none").mean(-1)
    m = mask.float()
    return (l * m).sum() / m.sum().clamp(min=1.0)


def head_forward(head: Head, emb, r: dict, depths: int) -> list:
    """The head's outputs at depths 1..depths: depth 1 over the row (causal within each sequence), depth d fed the
    head's own o of depth d-1 and the real token x_{i+d}, at position +d-1, attending the real keys (<= its index)
    and its own key of each depth at the same index (EAGLE-3's training-time test for depths > 2)."""
    causal, eye = row_masks(r)
    x, z = head.fuse(emb(r["x1"]), head.feature(r["h"]))
    q, k, v = head.qkv(x, r["pos"])
    outs, ks, vs, mask = [head.block(z, q, [k], [v], causal)], [k], [v], causal
    for d in range(2, depths + 1):
        x, z = head.fuse(emb(r[f"x{d}"]), outs[-1])
        q, k, v = head.qkv(x, r["pos"] + d - 1)
        ks.append(k), vs.append(v)
        mask = torch.cat([mask, eye], 1)
        outs.append(head.block(z, q, ks, vs, mask))
    return outs
