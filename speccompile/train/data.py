"""The features files as training data: per-sequence views, the held-out split, packed training rows."""
from __future__ import annotations

import random

import numpy as np
import torch

from speccompile.errors import SpeccompileError
from speccompile.train.features import aux_path


def _shared_prefix(tokens: np.ndarray, off: np.ndarray, prompt_len: np.ndarray) -> int:
    """Length of the prompt prefix every sequence shares (the system block and user header)."""
    first = [tokens[off[j]:off[j] + prompt_len[j]] for j in range(len(off) - 1)]
    m = min(map(len, first))
    return next((i for i in range(m) if len({int(f[i]) for f in first}) > 1), m)


def _aux_features(paths: list[str], tokens: list[int], aux_layers: list[int], work: str) -> tuple[np.ndarray, str]:
    """EAGLE-3's layer features (stage aux) of every features file (tokens: how many each holds), and the precision
    they were computed in."""
    aux = [np.load(aux_path(p, work)) for p in paths]
    for p, n, x in zip(paths, tokens, aux):
        if list(x["layers"]) != list(aux_layers) or len(x["aux"]) != n:
            raise SpeccompileError(f"{aux_path(p, work)} holds layers {list(x['layers'])} of {len(x['aux'])} "
                                   f"tokens, not layers {aux_layers} of the {n} in {p}: run --stages aux "
                                   "--redo aux")
    return np.concatenate([x["aux"] for x in aux]), str(aux[0]["dtype"])


class Data:
    """Per-sequence views over one or more features files (work dirs), trained as one set."""

    def __init__(self, paths: list[str], holdout: float, seed: int, aux_layers: list[int] | None = None,
                 work: str = ""):
        """aux_layers: read EAGLE-3's layer features (stage aux, in --work `work`) as the feature h, not the stored
        residual."""
        ds = [np.load(p) for p in paths]
        cat = lambda k: np.concatenate([d[k] for d in ds])
        self.tokens = cat("tokens").astype(np.int64)
        if aux_layers is None:
            self.h = cat("h")
        else:
            self.h, self.aux_dtype = _aux_features(paths, [len(d["tokens"]) for d in ds], aux_layers, work)
        self.topk_ids, self.topk_p = cat("topk_ids").astype(np.int64), cat("topk_p").astype(np.float32)
        base = np.cumsum([0] + [int(d["offsets"][-1]) for d in ds[:-1]])
        self.off = np.concatenate([ds[0]["offsets"][:1]] + [d["offsets"][1:] + b for d, b in zip(ds, base)])
        self.prompt_len, self.temp = cat("prompt_len"), cat("temperature")
        self.n_seq = len(self.off) - 1
        # the system block and user header are the same for every sequence: no loss there
        self.shared = _shared_prefix(self.tokens, self.off, self.prompt_len)
        rng = np.random.default_rng(seed)
        perm = rng.permutation(self.n_seq)
        n_eval = max(1, int(round(holdout * self.n_seq)))
        self.eval_ids, self.train_ids = sorted(perm[:n_eval].tolist()), sorted(perm[n_eval:].tolist())

    def seq(self, j):
        a, b = self.off[j], self.off[j + 1]
        return self.tokens[a:b], self.h[a:b], self.topk_ids[a:b], self.topk_p[a:b]

    def n_tokens(self, ids):
        return int(sum(self.off[j + 1] - self.off[j] for j in ids))

    def pack(self, ids, tokens_per_step: int, seed: int) -> list[list[int]]:
        """The sequences in a seeded random order, packed into training rows of at most tokens_per_step tokens
        (a longer sequence gets a row of its own)."""
        ids = list(ids)
        random.Random(seed).shuffle(ids)
        rows, cur, n = [], [], 0
        for j in ids:
            L = int(self.off[j + 1] - self.off[j])
            if cur and n + L > tokens_per_step:
                rows.append(cur)
                cur, n = [], 0
            cur.append(j)
            n += L
        return rows + [cur] if cur else rows

    def epoch_rows(self, tokens_per_step: int, seed: int, epoch: int) -> list[list[int]]:
        """The training rows of one epoch, packed in an order of its own (one order repeated makes every epoch take
        the same steps)."""
        return self.pack(self.train_ids, tokens_per_step, seed * 1000 + epoch)

    def response_tokens(self, ids) -> np.ndarray:
        return np.concatenate([self.tokens[self.off[j] + self.prompt_len[j]:self.off[j + 1]] for j in ids])


def make_row(data: Data, ids: list[int], vmap, depths: int = 2) -> dict:
    """Pack sequences into one training row. Head index i of a sequence = pair (h_i, x_{i+1}) at position i+1; depth
    d is fed x_{i+d}, predicts the token at i+d+1 (labels l{d}: the target's distribution at i+d) and regresses
    on h_{i+d}. Rows past a sequence's end repeat its last value and are masked out."""
    later = lambda a, d: np.concatenate([a[d:]] + [a[-1:]] * (d - 1))  # a[i + d] for i < n - 1
    cols = {k: [] for k in ["h", "pos", "seq"] + [f"{c}{d}" for d in range(1, depths + 1)
                                                     for c in ("x", "h", "l", "p", "m")]}
    for s, j in enumerate(ids):
        tok, h, ti, tp = data.seq(j)
        n = len(tok)
        i = np.arange(n - 1)
        cols["h"].append(h[:-1])
        cols["pos"].append(i + 1)
        cols["seq"].append(np.full(n - 1, s))
        for d in range(1, depths + 1):
            cols[f"x{d}"].append(later(tok, d)), cols[f"h{d}"].append(later(h, d))
            cols[f"l{d}"].append(later(ti, d)), cols[f"p{d}"].append(later(tp, d))
            # label position i+d must predict a real token (<= n-2) outside the shared header
            cols[f"m{d}"].append((i + d <= n - 2) & (i + d >= data.shared))
    r = {k: torch.as_tensor(np.concatenate(v)) for k, v in cols.items()}
    r["h"] = r["h"].float()
    if vmap is not None:
        for d in range(1, depths + 1):
            idx = torch.as_tensor(vmap)[r[f"l{d}"]]
            r[f"p{d}"] = torch.where(idx >= 0, r[f"p{d}"], torch.zeros(()))
            r[f"l{d}"] = idx.clamp(min=0)
    return r


def row_masks(r: dict):
    """(causal within each sequence of the row, identity)."""
    seq, pos = r["seq"], r["pos"]
    causal = (seq[:, None] == seq[None, :]) & (pos[None, :] <= pos[:, None])
    eye = torch.eye(len(seq), dtype=torch.bool)
    return causal, eye
