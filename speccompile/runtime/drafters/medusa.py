"""Medusa drafting: the heads read the target's hidden state at the last accepted token and each proposes top-k
candidates for one further position; a static tree (Medusa "choices") combines them, a chain takes each head's
best. No KV cache: the heads see one hidden state."""
from __future__ import annotations

import numpy as np

from speccompile.format.bundle import resolve_inside
from speccompile.format.trees import TreeSpec
from speccompile.runtime.drafters.base import CaughtUp, Drafter, Proposal, RuntimeContext
from speccompile.runtime.engine import open_session, session_options


def load(entry: dict, ctx: RuntimeContext) -> "MedusaDrafter":
    return MedusaDrafter(entry["name"], ctx.bundle_dir, ctx.model(entry), ctx.threads, ctx.target.max_seq_len)


class MedusaDrafter(Drafter):
    wants_hidden = True

    def __init__(self, name: str, bundle_dir: str, entry: dict, threads: int | None, max_seq_len: int):
        self.name = name
        self.session = open_session(resolve_inside(bundle_dir, entry["graph"]), session_options(threads),
                                    ["CPUExecutionProvider"])
        self.num_heads = self.max_depth = entry["num_heads"]
        self.h = np.zeros((max_seq_len, entry["config"]["hidden_size"]), np.float32)
        # graphs since the batched catch-up take several sequences' rows (runtime/shared_catch_up.py)
        self.takes_rows = not isinstance(self.session.get_inputs()[0].shape[0], int)
        self.caught = CaughtUp()  # the heads' logits, where a pass of several slots' rows ran them

    def reset(self) -> None:
        self.caught.clear()

    def observe(self, start: int, hidden: np.ndarray) -> None:
        self.h[start:start + len(hidden)] = hidden

    def _row(self, context) -> np.ndarray:
        """The hidden state that predicted the last context token; head k guesses the token k+1 places after it."""
        return self.h[len(context) - 2]

    def _logits(self, context):
        row = self.caught.take((len(context), int(context[-1])))
        if row is not None:
            return row[0]
        return self.session.run(["logits"], {"hidden_in": self._row(context)[None]})[0]

    def catch_up_step(self, context) -> tuple | None:
        """Its one pass's input, for a pass of several slots' heads (runtime/shared_catch_up.py): (None, None, None,
        the feature row)."""
        return (None, None, None, self._row(context)) if self.takes_rows and len(context) >= 2 else None

    def caught_up(self, context, logits, token, hidden) -> None:
        self.caught.put((len(context), int(context[-1])), logits)

    def run_rows(self, rows: np.ndarray) -> np.ndarray:
        """The heads over several sequences' rows [N, H]: logits [K, N, V]."""
        logits = self.session.run(["logits"], {"hidden_in": np.ascontiguousarray(rows)})[0]
        return logits.reshape(self.num_heads, len(rows), -1)

    def propose(self, context, k, params, rng) -> Proposal:
        if len(context) < 2:
            return Proposal.empty()
        logits = self._logits(context)[:k]
        return Proposal(self.ranked(logits, len(context) + np.arange(len(logits))).argmax(-1).astype(np.int64))

    def propose_tree(self, context, tree: TreeSpec, params, rng) -> Proposal:
        if len(context) < 2:
            return Proposal.empty()
        logits = self._logits(context)
        logits = self.ranked(logits, len(context) + np.arange(len(logits)))
        # a static tree may rank past the vocabulary: its paths there are skipped below, as past the heads
        ranks = min(max(tree.max_rank, tree.branching if tree.kind == "dynamic" else 1), logits.shape[-1])
        order = np.argsort(-logits, axis=-1)[:, :ranks]  # [heads, ranks]
        paths = tree.paths if tree.kind != "dynamic" else _paths_by_score(logits, order, tree)
        tokens, parents, node_of = [], [], {(): -1}
        for p in paths:
            if len(p) > self.num_heads or p[:-1] not in node_of or p[-1] >= ranks:
                continue
            node_of[p] = len(tokens)
            tokens.append(int(order[len(p) - 1, p[-1]]))
            parents.append(node_of[p[:-1]])
        return Proposal(np.array(tokens, np.int64), None, np.array(parents, np.int64))


def _paths_by_score(logits, order, tree: TreeSpec):
    """A dynamic tree for independent heads: the `size` rank paths of highest joint head probability."""
    lp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
        logits.max(-1, keepdims=True)
    frontier, chosen = [((), 0.0)], []
    while frontier and len(chosen) < tree.size:
        frontier.sort(key=lambda x: -x[1])
        path, score = frontier.pop(0)
        if path:
            chosen.append(path)
        d = len(path)
        if d < len(order):
            frontier += [(path + (r,), score + lp[d, order[d, r]]) for r in range(order.shape[1])]
    return sorted(chosen, key=lambda p: (len(p), p))
