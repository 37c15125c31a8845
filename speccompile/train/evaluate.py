"""Held-out metrics of a head: top-1 agreement with the target at depths 1 and 2, and the acceptance of its draft
chains (full vocabulary; depth d >= 2 is fed the head's own o and its own drafted token, as when drafting)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from speccompile.train.data import Data
from speccompile.train.heads import Head

STATS = ("d1_all", "d1_resp", "d2_resp", "d2_resp_given_d1", "d1_resp_greedy")


def _drafts(head: Head, emb_w, out_w, tok: np.ndarray, h: np.ndarray, chain: int) -> list:
    """The head's greedy drafts at depths 1..chain from every position of one sequence (emb_w: the target's
    embedding, out_w: its output head)."""
    n = len(tok)
    pos = torch.arange(1, n)
    causal = pos[None, :] <= pos[:, None]
    eye = torch.eye(n - 1, dtype=torch.bool)
    x = torch.as_tensor(tok)[1:]
    xa, z = head.fuse(F.embedding(x, emb_w), head.feature(torch.as_tensor(h[:-1], dtype=torch.float32)))
    q, k, v = head.qkv(xa, pos)
    o_prev = head.block(z, q, [k], [v], causal)
    ks, vs, masks, drafts = [k], [v], causal, []
    for d in range(1, chain + 1):
        draft = head.draft(o_prev, out_w)
        drafts.append(draft)
        if d == chain:
            break
        xa, z = head.fuse(F.embedding(draft, emb_w), o_prev)  # own o, own drafted token
        q, kd, vd = head.qkv(xa, pos + d)
        ks.append(kd), vs.append(vd)
        masks = torch.cat([masks, eye], 1)
        o_prev = head.block(z, q, ks, vs, masks)
    return drafts


def _count_top1(stats: dict, drafts: list, tokt, lab, n: int, prompt_len: int, shared: int, greedy: bool) -> None:
    """Add one sequence's depth-1 and depth-2 agreement counts to stats ([hits, positions] each)."""
    i = torch.arange(n - 1)
    resp = i >= prompt_len - 1
    valid = (i + 1 <= n - 2) & (i + 1 >= shared)
    c1 = (drafts[0] == lab[(i + 1).clamp(max=n - 1)]) & valid
    stats["d1_all"][0] += int(c1.sum()); stats["d1_all"][1] += int(valid.sum())
    stats["d1_resp"][0] += int((c1 & resp).sum()); stats["d1_resp"][1] += int((valid & resp).sum())
    if greedy:
        stats["d1_resp_greedy"][0] += int((c1 & resp).sum())
        stats["d1_resp_greedy"][1] += int((valid & resp).sum())
    valid = (i + 2 <= n - 2) & (i + 2 >= shared)
    c2 = (drafts[1] == lab[(i + 2).clamp(max=n - 1)]) & valid
    # depth-2 label is the target's argmax given the real x_{i+2}; compare where that prefix is the target's own
    # greedy choice (always on greedy data)
    cons = tokt[(i + 2).clamp(max=n - 1)] == lab[(i + 1).clamp(max=n - 1)]
    v2 = valid & resp & cons
    stats["d2_resp"][0] += int((c2 & v2).sum()); stats["d2_resp"][1] += int(v2.sum())
    stats["d2_resp_given_d1"][0] += int((c2 & v2 & c1).sum())
    stats["d2_resp_given_d1"][1] += int((v2 & c1).sum())


def _count_chains(acc_depth: np.ndarray, den_depth: np.ndarray, drafts: list, tokt, lab, n: int,
                  prompt_len: int) -> None:
    """Add, per depth d, the chains from each response position whose first d drafts were all accepted
    (acc_depth) and the chains the sequence has d tokens after to check them against (den_depth): a chain cut by
    the sequence's end is not a rejected one."""
    i = torch.arange(n - 1)
    alive = (i >= prompt_len - 1) & (i + 1 <= n - 2)
    for d in range(1, len(acc_depth) + 1):
        p = (i + d).clamp(max=n - 1)
        room = (i >= prompt_len - 1) & (i + d <= n - 2)
        if d > 1:
            alive &= tokt[(i + d).clamp(max=n - 1)] == lab[(i + d - 1).clamp(max=n - 1)]
        alive &= room & (drafts[d - 1] == lab[p])
        acc_depth[d - 1] += int(alive.sum())
        den_depth[d - 1] += int(room.sum())


def evaluate(head: Head, data: Data, emb_w, out_w, ids: list[int], chain: int) -> dict:
    """Metrics over sequences `ids` (chain >= 2: the length of the draft chains scored); drafts scored with out_w,
    the target's output head, as the runtime scores them."""
    stats = {k: [0, 0] for k in STATS}
    acc_depth = np.zeros(chain)  # chains whose first d drafts were all accepted
    den_depth = np.zeros(chain)  # chains with d tokens after them to check against
    with torch.no_grad():
        for j in ids:
            tok, h, ti, _ = data.seq(j)
            n, pl, greedy = len(tok), int(data.prompt_len[j]), data.temp[j] == 0
            lab, tokt = torch.as_tensor(ti[:, 0]), torch.as_tensor(tok)  # the target's argmax at each position
            drafts = _drafts(head, emb_w, out_w, tok, h, chain)
            _count_top1(stats, drafts, tokt, lab, n, pl, data.shared, greedy)
            if greedy:
                _count_chains(acc_depth, den_depth, drafts, tokt, lab, n, pl)
    out = {k: (v[0] / v[1] if v[1] else None) for k, v in stats.items()}
    out["n_positions_resp"] = stats["d1_resp"][1]
    if den_depth[0]:
        reach = np.divide(acc_depth, den_depth, out=np.zeros(chain), where=den_depth > 0)  # P(first d accepted)
        cond = [reach[0]] + [reach[d] / reach[d - 1] if reach[d - 1] else 0.0 for d in range(1, chain)]
        out.update(chain_len=chain, chain_positions=int(den_depth[0]), chain_p_first_d_accepted=reach.tolist(),
                   chain_conditional_accept=cond, chain_expected_accepted=float(reach.sum()))
    return out
