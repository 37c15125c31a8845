"""The drafter interface: every way of guessing the target's next tokens plugs in here.

Each kind of format/drafter_kinds.py has a runtime module in this package exposing
`load(entry: dict, ctx: RuntimeContext) -> Drafter`, entry being the drafter's manifest entry; the Generator
builds its drafters through that table alone.

A drafter sees the committed context (prompt + generated tokens, the last of which the target has not run yet)
and proposes up to k tokens. It keeps whatever state it likes (a KV cache, an n-gram index) and re-synchronises
itself from the context on each call, so acceptance and roll back need no callback.
"""
from __future__ import annotations

import abc
import dataclasses

import numpy as np

from speccompile.format.trees import TreeSpec, depths
from speccompile.runtime.context_cache import Arrays, Part
from speccompile.runtime.engine import Engine
from speccompile.runtime.kv_cache import KVCache
from speccompile.runtime.noise import GumbelNoise
from speccompile.runtime.sampling import SamplingParams


@dataclasses.dataclass(frozen=True)
class RuntimeContext:
    """What a drafter's `load` may draw on besides its own manifest entry."""
    bundle_dir: str
    manifest: dict
    threads: int | None
    device: str
    target: Engine  # the loaded target (its vocabulary, context length, features)
    max_rows: int  # rows a draft engine may be asked for in one pass
    slots: int = 1  # sequence slots sharing the target's passes (runtime/scheduler.py)
    slot: int = 0  # the slot a drafter instance serves
    slot_caches: dict = dataclasses.field(default_factory=dict)  # drafter name -> the cache of its slots

    def model(self, entry: dict) -> dict:
        """The manifest entry of the model a drafter entry names."""
        return self.manifest["models"][entry["model"]]

    def slot_cache(self, entry: dict) -> KVCache | None:
        """The cache a drafter's engine binds where its slots share passes of its batched form
        (runtime/shared_catch_up.py): slot `slot` of one cache for all slots; None (a cache of its own) elsewhere."""
        batch = self.manifest["models"].get(entry.get("batch_model", ""))
        if self.slots < 2 or self.device != "cpu" or not batch or batch.get("max_batch", 1) < self.slots:
            return None
        if entry["name"] not in self.slot_caches:
            kv = batch["kv_cache"]
            self.slot_caches[entry["name"]] = KVCache(batch["num_layers"], kv["num_kv_heads"], kv["max_seq_len"],
                                                      kv["head_dim"], kv.get("dtype", "float32"), batch=self.slots,
                                                      scratch=kv.get("scratch_slots", 0))
        return self.slot_caches[entry["name"]].slot(self.slot)


class CaughtUp:
    """The last row of a drafter's catch-up pass that ran elsewhere (runtime/shared_catch_up.py), kept for the
    drafting that follows it: valid for the drafter state `key` it ran for, taken once (drafting moves the state on)."""

    def __init__(self):
        self.key, self.row = None, None

    def put(self, key: tuple, *row) -> None:
        self.key, self.row = key, tuple(r.copy() if isinstance(r, np.ndarray) else r for r in row)

    def holds(self, key: tuple) -> bool:
        return self.key is not None and self.key == key

    def take(self, key: tuple) -> tuple | None:
        """The row, if it is `key`'s, and forgets it; None otherwise (the drafter runs its own pass)."""
        row = self.row if self.holds(key) else None
        self.key, self.row = None, None
        return row

    def clear(self) -> None:
        self.key, self.row = None, None


@dataclasses.dataclass
class Proposal:
    tokens: np.ndarray  # [k] int64, proposed continuation (k may be 0)
    q: np.ndarray | None = None  # [k, V] the distributions the tokens were drawn from; None = deterministic
    parents: np.ndarray | None = None  # tree drafts: parent index per node (-1 = after the context); None = chain
    scores: np.ndarray | None = None  # tree drafts: each node's path log-probability under the drafter, if known
    match_len: int = 0  # nodes joined by prompt lookup: the length of the n-gram they matched on (0: none)
    lookup_agrees: np.ndarray | None = None  # [k] bool: a drafter's node that prompt lookup proposes too

    @classmethod
    def empty(cls) -> "Proposal":
        return cls(np.zeros(0, np.int64))

    def first_path(self) -> "Proposal":
        """The tree's first root-to-leaf path, as a chain: from the context, each node's first child in row order
        (a dynamic tree's best-ranked continuation, extended where prompt lookup agreed with it)."""
        if self.parents is None or not len(self.tokens):
            return self
        path, parent = [], -1
        for i, p in enumerate(self.parents):
            if p == parent:  # topological order: the first node found under `parent` is its first child
                path.append(i)
                parent = i
        pick = lambda a: None if a is None else a[path]  # noqa: E731
        return Proposal(self.tokens[path], pick(self.q), None, pick(self.scores))

    @property
    def depth(self) -> int:
        """Draft tokens on the longest path: a chain's length, a tree's deepest level."""
        if self.parents is None or not len(self.tokens):
            return len(self.tokens)
        return int(depths(self.parents).max()) + 1


class Drafter(abc.ABC):
    name: str = "drafter"
    wants_hidden = False  # True: the runtime calls observe() with the target's hidden states
    max_depth: int | None = None  # the deepest it drafts (Medusa: one token per head); None: no bound
    noise: GumbelNoise | None = None  # the request's, while it is sampled by noise (couple)
    takes_rows = False  # True: no cache of its own, and one pass of its graph reads several slots' feature rows

    def couple(self, noise: GumbelNoise | None) -> None:
        """A request starts: `noise` where it is sampled by noise (runtime/noise.py), else None. A drafter that
        scores tokens adds the noise row of each position to its own logits there before it ranks them, so its
        greedy draft is its own draw coupled to the target's (the Gumbel-max trick with the same noise): where the
        two distributions are close the draws agree far more often than the drafter's argmax is drawn. Lossless
        either way: the target's draw at a position does not depend on the drafts."""
        self.noise = noise

    def ranked(self, logits: np.ndarray, positions, token_map: np.ndarray | None = None) -> np.ndarray:
        """The drafter's logits for the tokens at `positions` (a row each, or one row for one position) as it
        ranks them: with the request's noise added there while coupled (couple); token_map: a reduced draft
        vocabulary's target ids."""
        if self.noise is None:
            return logits
        return self.noise.perturbed(logits, positions, token_map).reshape(np.shape(logits))

    @property
    def ranks(self):
        """`ranked` where it changes the logits (coupled), else None: a caller skips the positions' bookkeeping."""
        return None if self.noise is None else self.ranked

    def reset(self) -> None:
        """A new sequence starts."""

    def observe(self, start: int, hidden: np.ndarray) -> None:
        """The target's features (`features`) of committed positions [start, start+len)."""

    def rows_behind(self, context_len: int) -> int | None:
        """The rows the next drafting pass runs to catch up with a context this long before it drafts (a drafter
        that keeps a cache of its own runs what was committed since it last drafted: after many plain steps, many
        rows); None where it keeps no such state."""
        return None

    def features(self, target, rows) -> np.ndarray:
        """What `observe` receives of the target engine's last pass, for these rows: its hidden states (before
        the final norm); a head that reads other features (EAGLE) picks them here."""
        return target.hidden[rows]

    # ---- a catch-up pass shared by the slots' instances (runtime/shared_catch_up.py) ------------------------------
    def catch_up_step(self, context: np.ndarray) -> tuple | None:
        """What drafting after `context` would run first to bring the drafter's own cache up to it: (the first
        cache slot it writes, its tokens, their positions (None: from that slot on), their features (a head's, else
        None)); None where it keeps no such cache, nothing is to run, or one pass cannot hold it."""
        return None

    def caught_up(self, context: np.ndarray, logits: np.ndarray, token: int, hidden: np.ndarray) -> None:
        """catch_up_step's pass ran in the batched form: its K/V are in this drafter's cache, and its last row gave
        these logits, greedy token and hidden state."""
        raise NotImplementedError(f"{self.name} runs no catch-up pass elsewhere")

    # ---- the context cache (runtime/context_cache.py) keeps per-position state beside the target's K/V -----------
    def state_parts(self) -> dict[str, Part]:
        """The state this drafter can keep in the context cache, per part name; empty when it keeps none that it
        cannot rebuild from the context alone at least as fast as the cache would give it back."""
        return {}

    def save_state(self, part: str, tokens: np.ndarray, start: int, stop: int) -> Arrays | None:
        """Copies of state `part` for positions [start, stop) of `tokens`; None when it does not hold it for all
        of them (or holds it for other tokens)."""
        return None

    def load_state(self, part: str, tokens: np.ndarray, arrays: Arrays) -> None:
        """Just after reset(): take state `part` for positions [0, len) of `tokens` from `arrays`."""

    @abc.abstractmethod
    def propose(self, context: np.ndarray, k: int, params: SamplingParams, rng: np.random.Generator) -> Proposal:
        """Propose up to k tokens to follow `context` (int64 [n])."""

    def propose_tree(self, context: np.ndarray, tree: TreeSpec, params: SamplingParams,
                     rng: np.random.Generator) -> Proposal:
        """Propose a token tree of at most tree.size nodes. Drafters without alternatives propose a chain."""
        p = self.propose(context, min(tree.depth, tree.size), params, rng)
        return Proposal(p.tokens, None, np.arange(len(p.tokens)) - 1)
