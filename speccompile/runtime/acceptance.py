"""Acceptance: which drafted tokens the target keeps, and the token it adds after them.

Greedy: accept the longest prefix of the draft that equals the target's argmax, then take the target's own token.
Sampling (Leviathan et al. / Chen et al.): accept draft token x with probability min(1, p(x)/q(x)); on the first
rejection sample from norm(max(0, p - q)); if all are accepted, sample the bonus token from p. The committed
tokens then have exactly the target's distribution p (after temperature / top-k / top-p), whatever q is.
Trees generalise both (SpecInfer's recursive rejection over siblings).
"""
from __future__ import annotations

import numpy as np

from speccompile.runtime.sampling import sample


def accept_greedy(draft: np.ndarray, target_argmax: np.ndarray) -> tuple[int, int]:
    """(number of draft tokens accepted, the target's token after them). target_argmax has len(draft)+1 rows."""
    mismatch = np.flatnonzero(target_argmax[:len(draft)] != draft)
    n = int(mismatch[0]) if len(mismatch) else len(draft)
    return n, int(target_argmax[n])


def accept_sampled(draft: np.ndarray, q: np.ndarray | None, p: np.ndarray,
                   rng: np.random.Generator) -> tuple[int, int]:
    """Chain speculative sampling. draft [k]; q [k, V] draft distributions, or None for a deterministic drafter
    (q is then one-hot on the draft token); p [k+1, V] target distributions."""
    for i, x in enumerate(draft):
        qx = 1.0 if q is None else q[i, x]
        if rng.random() * qx < p[i, x]:  # accept with probability min(1, p/q)
            continue
        if q is None:
            residual = p[i].copy()
            residual[x] = 0.0
        else:
            residual = np.maximum(p[i] - q[i], 0.0)
        total = residual.sum()
        return i, sample(residual / total if total > 0 else p[i], rng)
    return len(draft), sample(p[len(draft)], rng)


def accept_tree_greedy(tokens: np.ndarray, parents: np.ndarray, target_argmax: np.ndarray):
    """Longest root-to-node path whose tokens are the target's greedy choices.

    Rows of target_argmax: row 0 is the pending (last committed) token, row 1+i is tree node i.
    Returns (accepted node indices, in order; the target's token after them)."""
    path, row = [], 0
    while True:
        want = target_argmax[row]
        parent = path[-1] if path else -1
        hit = np.flatnonzero((parents == parent) & (tokens == want))
        if not len(hit):
            return path, int(want)
        path.append(int(hit[0]))
        row = path[-1] + 1


def accept_tree_sampled(tokens: np.ndarray, parents: np.ndarray, p: np.ndarray, rng: np.random.Generator):
    """Lossless multi-candidate verification (SpecInfer-style recursive rejection) for deterministic candidates.

    At each step the node's children are tried in order; child x is accepted with probability p'(x), where p' is
    the target distribution with the already-rejected siblings removed and renormalised. The committed token at
    every step is thus distributed exactly as p. p: [1 + len(tokens), V] target distributions per row."""
    path, row = [], 0
    while True:
        dist = p[row].copy()
        parent = path[-1] if path else -1
        accepted = None
        for child in np.flatnonzero(parents == parent):
            x = tokens[child]
            if rng.random() < dist[x]:
                accepted = int(child)
                break
            dist[x] = 0.0
            total = dist.sum()
            if total <= 0:
                break
            dist /= total
        if accepted is None:
            return path, sample(dist if dist.sum() > 0 else p[row], rng)
        path.append(accepted)
        row = accepted + 1
