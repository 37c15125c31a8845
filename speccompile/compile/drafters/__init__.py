"""The build halves of the drafter kinds: one module per kind, found through `format.drafter_kinds.KINDS`.

Each module exposes

    build(spec: DraftSpec, target: TargetBuild) -> DrafterBuild

which reads the target (config, checkpoint, lowered weights, options) and returns what the drafter adds to the
bundle: the keys of its drafter entry, its weight files, its graphs and their model entries. It writes into no
shared state: the driver merges what each returns. A kind whose heads read features of the target (EAGLE) also
exposes

    target_features(spec: DraftSpec, cfg: ModelConfig) -> list

which the driver asks before it emits the target graph, so that the graph outputs them (`aux_hidden_states`).
"""
from __future__ import annotations

import importlib
from types import ModuleType

from speccompile.format.drafter_kinds import KINDS


def build_half(kind: str) -> ModuleType:
    """The build module of a drafter kind (KINDS names it, so the table stays the one place kinds are listed)."""
    return importlib.import_module(KINDS[kind].build_module)
