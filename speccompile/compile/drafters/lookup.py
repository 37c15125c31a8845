"""`lookup[:N]`: prompt lookup. Nothing to compile: the drafter entry says the longest n-gram it matches."""
from __future__ import annotations

from speccompile.compile.drafters.base import DrafterBuild, TargetBuild
from speccompile.format.drafter_kinds import DraftSpec

DEFAULT_MAX_NGRAM = 3


def build(spec: DraftSpec, target: TargetBuild) -> DrafterBuild:
    return DrafterBuild(entry={"max_ngram": int(spec.arg) if spec.arg else DEFAULT_MAX_NGRAM})
