"""Token trees: which candidates a verify pass checks.

A tree is a list of nodes in topological order, each with a parent index (-1: child of the last committed
token). Shapes:
  chain:K      one path of K tokens (the classic draft)
  static:FILE  a fixed shape: a JSON list of paths of top-k ranks, e.g. [[0], [1], [0, 0], [0, 1], [0, 0, 0]]
               (Medusa/EAGLE "choices"): node [0, 1] is the 2nd-best child of the best root candidate
  dynamic:N    EAGLE-2: grow the tree by expanding the most probable nodes (cumulative draft probability) and
               keep the best N
  adaptive[:D]  chosen per pass (runtime/adaptive.py): the drafter's dynamic tree up to D deep (default 4), or
               none, pruned to the nodes worth their verify rows under the measured cost model; plain steps when
               drafting would lose. The default tree of a 4-bit bundle's MTP head and prompt lookup.
  SHAPE+lookup:L  any of these, joined by up to L nodes from prompt lookup (the continuation of the context's
               last n-gram where it occurred before): a head is weak exactly where the answer copies the prompt
               (extraction, summaries, RAG), and there lookup is strong. A static tree's FILE may hold any
               character, '+' too: only a last "+lookup:L" that is not part of an existing file's name joins
The compiled verify graph takes any tree up to the runtime's row limit; smaller trees simply use fewer rows.
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from speccompile.errors import SpeccompileError, given
from speccompile.graphs import MAX_TREE_NODES

ADAPTIVE_DEPTH = 4  # how deep an adaptive tree's drafter may go (its head passes: one per level)
ADAPTIVE_LOOKUP = 6  # prompt-lookup nodes an adaptive tree starts from (it doubles its reach while accepted)

_MADE_BY = "a TreeSpec is made by TreeSpec.parse (e.g. 'dynamic:8') or TreeSpec.from_paths, not by hand"


@dataclasses.dataclass(frozen=True)
class TreeSpec:
    kind: str  # "chain" | "static" | "dynamic" | "adaptive"
    size: int  # nodes (dynamic: the budget N; chain: K)
    paths: tuple[tuple[int, ...], ...] = ()  # static: rank paths
    depth: int = 0  # longest path
    branching: int = 4  # dynamic: children considered per expanded node
    lookup: int = 0  # nodes prompt lookup may add to the drafter's tree

    @classmethod
    def parse(cls, spec: str) -> "TreeSpec":
        shape, join = _split_join(spec)
        if join is None:
            return cls._shape(spec, spec)
        if not shape:
            raise SpeccompileError(f"{given('tree', spec)}: +lookup:L joins a shape: e.g. dynamic:4{spec}")
        kind, _, arg = join.partition(":")
        if kind != "lookup" or not (arg.isascii() and arg.isdigit()) or not 1 <= int(arg) <= MAX_TREE_NODES:
            raise SpeccompileError(f"{given('tree', spec)}: after '+' expected lookup:L with L in "
                                   f"1..{MAX_TREE_NODES}")
        return dataclasses.replace(cls._shape(spec, shape), lookup=int(arg))

    @classmethod
    def _shape(cls, spec: str, shape: str) -> "TreeSpec":
        """The tree `shape` (spec without its +lookup:L) names."""
        kind, colon, arg = shape.partition(":")
        if kind == "chain":
            k = cls._nodes(_count(spec, kind, arg))  # before its paths are built: their size grows with k squared
            return cls("chain", k, tuple((0,) * d for d in range(1, k + 1)), k)
        if kind == "dynamic":
            n = _count(spec, kind, arg)
            return cls._checked(cls("dynamic", n, (), depth=min(n, 8)))
        if kind == "adaptive":
            d = _count(spec, kind, arg) if colon else ADAPTIVE_DEPTH  # "adaptive:" names no depth: refused
            if not 1 <= d <= 8:
                raise SpeccompileError(f"{given('tree', spec)}: adaptive:D drafts at most D deep, D in 1..8")
            return cls("adaptive", MAX_TREE_NODES, (), depth=d)
        if kind == "static":
            if not os.path.isfile(arg):
                raise SpeccompileError(f"{given('tree', spec)}: no such file {arg!r}")
            try:
                with open(arg, encoding="utf-8") as f:
                    paths = json.load(f)
            except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, or nested too deep
                raise SpeccompileError(f"{given('tree', spec)}: {arg} is not JSON ({e})") from None
            return cls.from_paths(paths)
        raise SpeccompileError(f"{given('tree', spec)}: use chain:K, static:FILE, dynamic:N or adaptive[:D] "
                               "(optionally +lookup:L)")

    @classmethod
    def from_paths(cls, paths) -> "TreeSpec":
        # ranks as given, never converted: int() would take 1.7, True or "01" for other ranks than were meant
        if not isinstance(paths, (list, tuple)) or not all(
                isinstance(p, (list, tuple)) and all(type(r) is int for r in p) for p in paths):
            raise SpeccompileError("a static tree is a list of lists of non-negative integer ranks")
        ps = sorted({tuple(p) for p in paths}, key=lambda p: (len(p), p))
        if not ps:
            raise SpeccompileError("a static tree needs at least one path")
        known = set()
        for p in ps:
            if not p or min(p) < 0:
                raise SpeccompileError(f"static tree path {list(p)}: ranks must be non-negative, paths non-empty")
            if len(p) > 1 and p[:-1] not in known:
                raise SpeccompileError(f"static tree path {list(p)} has no parent path {list(p[:-1])}")
            known.add(p)
        return cls._checked(cls("static", len(ps), tuple(ps), max(len(p) for p in ps)))

    @staticmethod
    def _nodes(n: int) -> int:
        if not 1 <= n <= MAX_TREE_NODES:
            raise SpeccompileError(f"tree of {n} nodes: must be 1..{MAX_TREE_NODES}")
        return n

    @classmethod
    def _checked(cls, t: "TreeSpec") -> "TreeSpec":
        cls._nodes(t.size)
        return t

    def checked(self) -> "TreeSpec":
        """A TreeSpec built by hand, refused unless it is one that parse or from_paths would make (a chain without
        its paths would draft nothing, silently; a numpy depth would reach the drafters' index sums)."""
        fields = (self.size, self.depth, self.branching, self.lookup)
        if self.kind not in ("chain", "static", "dynamic", "adaptive") or not all(type(v) is int for v in fields) \
                or not 0 <= self.lookup <= MAX_TREE_NODES:
            raise SpeccompileError(f"{given('tree', self)}: {_MADE_BY}")
        if self.kind == "static":
            made = TreeSpec.from_paths(list(self.paths))
        else:
            made = TreeSpec.parse(f"{self.kind}:{self.depth if self.adaptive else self.size}")
        made = dataclasses.replace(made, lookup=self.lookup)
        if made != self:
            raise SpeccompileError(f"{given('tree', self)}: {_MADE_BY}; its kind and size make {made}")
        return self

    def limited(self, nodes: int, depth: int | None = None) -> "TreeSpec":
        """The same shape cut to at most `nodes` nodes (near the end of the context or of the answer)."""
        if nodes >= self.size and (depth is None or depth >= self.depth):
            return self
        paths = tuple(p for p in self.paths if len(p) <= nodes)[:nodes]
        return dataclasses.replace(self, size=min(self.size, nodes), paths=paths,
                                   depth=min(self.depth, nodes if depth is None else depth))

    def to_dict(self) -> dict:
        return {"kind": self.kind, "size": self.size, "paths": [list(p) for p in self.paths], "depth": self.depth,
                "branching": self.branching, "lookup": self.lookup}

    @classmethod
    def from_dict(cls, d: dict) -> "TreeSpec":
        return cls(d["kind"], d["size"], tuple(tuple(p) for p in d["paths"]), d["depth"], d.get("branching", 4),
                   d.get("lookup", 0))

    @property
    def adaptive(self) -> bool:
        return self.kind == "adaptive"

    @property
    def max_rank(self) -> int:
        return max((max(p) for p in self.paths), default=0) + 1


def _split_join(spec: str) -> tuple[str, str | None]:
    """"SHAPE+lookup:L" -> (SHAPE, "lookup:L"); (spec, None) without a join. Only a last '+' before a word joins
    ("chain:+3" is a count, if a wrong one), and after a static tree's file only a '+lookup' that does not make
    an existing file's name: a file's name may hold any character."""
    shape, plus, join = spec.rpartition("+")
    if not plus or not join[:1].isalpha():
        return spec, None
    if spec.startswith("static:") and (not join.startswith("lookup") or os.path.isfile(spec[len("static:"):])):
        return spec, None
    return shape, join


def _count(spec: str, kind: str, arg: str) -> int:
    """The whole number after "KIND:", in ASCII digits only: int() would also read "1_0" as 10, " 3" as 3 and
    other scripts' digits, sizes nobody meant to write."""
    if not (arg.isascii() and arg.isdigit()):
        raise SpeccompileError(f"{given('tree', spec)}: expected a whole number after '{kind}:'")
    return int(arg)


def depths(parents: np.ndarray) -> np.ndarray:
    d = np.zeros(len(parents), np.int64)
    for i, p in enumerate(parents):
        d[i] = 0 if p < 0 else d[p] + 1
    return d
