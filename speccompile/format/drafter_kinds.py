"""The one table of drafter kinds: how each is named on the command line, its defaults, and its two halves.

A kind has a build half (`speccompile.compile.drafters.<module>`: `build(spec, target)` -> its weights, graphs
and manifest entries; see that package) and a runtime half (`speccompile.runtime.drafters.<module>`: manifest
entry -> Drafter). The halves live in two layers because the runtime must import neither onnx nor torch; this
table, below both, is what ties them together.
Adding a kind = its two modules + one line here.
"""
from __future__ import annotations

import dataclasses

from speccompile.errors import SpeccompileError, given

MAX_LOOKUP_NGRAM = 64  # the longest n-gram `lookup:N` matches (the manifest schema's bound on max_ngram)
FUSE_MODEL_KIND = "eagle3_fc"  # the manifest kind of EAGLE-3's fc graph (a drafter's "fuse_model")
BATCHED_HEAD_KIND = "head_batch"  # a draft head's batched form (a drafter's "batch_model"; speccompile.graphs)
BATCHED_DECODER_KIND = "decoder_batch"  # a decoder's batched form: the target's, a draft model's or early exit's


def batched_kind(model_kind: str) -> str:
    """The kind of the batched form of a drafter model of this kind."""
    return BATCHED_DECODER_KIND if model_kind == "decoder" else BATCHED_HEAD_KIND


@dataclasses.dataclass(frozen=True)
class DrafterKind:
    name: str
    arg: str  # what may follow "NAME:": "none", "optional" or "required"
    usage: str  # e.g. "mtp[:PATH]"
    summary: str
    module: str = ""  # the halves' module name (default: the kind's name)
    default_num_draft: int = 4  # tokens per pass when neither --num-draft nor --tree says
    default_tree: str | None = None  # the tree it verifies unless --num-draft or --tree says otherwise
    # the same over a target that verifies one path a pass (speccompile.graphs.trees_exact: the quantized builds)
    chain_tree: str | None = None
    named_by_arg: bool = False  # the drafter's name carries its argument (layerskip:8 and layerskip:12 differ)
    model_kind: str = ""  # the manifest kind of the model it runs ("": none)

    @property
    def build_module(self) -> str:
        return f"speccompile.compile.drafters.{self.module or self.name}"

    @property
    def runtime_module(self) -> str:
        return f"speccompile.runtime.drafters.{self.module or self.name}"


# Each head node costs a head pass, each lookup node only a verify row: the measurements behind the MTP defaults
# are in docs/results.md ("Drafter defaults"). Over a 4-bit target a verify row costs far more and trees reduce to
# one path (docs/results.md, "Native 4-bit weights"): the head drafts adaptively, joined by lookup, down to plain
# steps; lookup alone drafts adaptively too (a fixed chain of matches loses where the answer does not repeat).
KINDS: dict[str, DrafterKind] = {k.name: k for k in (
    DrafterKind("model", "required", "model:PATH", "a separate draft model with the target's tokenizer",
                module="draft_model", model_kind="decoder"),
    DrafterKind("layerskip", "required", "layerskip:L", "the target's first L layers + its norm and head",
                named_by_arg=True, model_kind="decoder"),
    DrafterKind("lookup", "optional", "lookup[:N]", "prompt lookup: n-gram matches (n <= N, default 3)",
                chain_tree="adaptive"),
    DrafterKind("mtp", "optional", "mtp[:PATH]", "a multi-token-prediction head (bare: the head shipped for the "
                "target)", default_num_draft=2, default_tree="dynamic:2+lookup:6",
                chain_tree="adaptive+lookup:6", model_kind="mtp_head"),
    DrafterKind("eagle", "required", "eagle:PATH", "an EAGLE-1/2 head (safetensors file or directory)",
                model_kind="eagle_head"),
    DrafterKind("eagle3", "required", "eagle3:PATH", "an EAGLE-3 head (safetensors file or directory)",
                module="eagle", model_kind="eagle3_head"),
    DrafterKind("medusa", "required", "medusa:PATH", "a Medusa heads file (safetensors)", model_kind="medusa"),
)}


def asked_drafter(spec) -> str:
    """The drafter asked for, as the caller spelled it: build_bundle's drafts=[...] or build's --draft."""
    return given("drafts", spec, flag="--draft")


@dataclasses.dataclass(frozen=True)
class DraftSpec:
    """One --draft argument: a kind of KINDS and what follows its colon."""
    kind: str
    arg: str | None = None

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.arg}" if KINDS[self.kind].named_by_arg else self.kind

    @classmethod
    def parse(cls, spec: str) -> "DraftSpec | None":
        """None for "none"; a SpeccompileError naming the choices for anything else that is not a kind."""
        kind, colon, arg = spec.partition(":")
        if kind == "none":
            if colon:
                raise SpeccompileError(f"{asked_drafter(spec)}: none takes no argument")
            return None
        if kind not in KINDS:
            choices = ", ".join(k.usage for k in KINDS.values())
            raise SpeccompileError(f"{asked_drafter(spec)}: unknown drafter; use {choices} or none")
        k = KINDS[kind]
        if k.arg == "required" and not arg:
            raise SpeccompileError(f"{asked_drafter(spec)}: {kind} needs an argument: {k.usage} ({k.summary})")
        if colon and not arg:  # "mtp:$HEAD" with HEAD unset: not the bare kind's default (the shipped head)
            raise SpeccompileError(f"{asked_drafter(spec)}: nothing after the colon; use {k.usage}")
        if k.arg == "none" and arg:
            raise SpeccompileError(f"{asked_drafter(spec)}: {kind} takes no argument")
        if kind in ("layerskip", "lookup") and arg:
            # ASCII digits only (str.isdigit takes other scripts' digits too), written back plainly: layerskip:03
            # is layerskip:3, the name --drafter then finds it by
            if not (arg.isascii() and arg.isdigit()) or int(arg) < 1:
                raise SpeccompileError(f"{asked_drafter(spec)}: {k.usage} needs a whole number >= 1, e.g. {kind}:8")
            if kind == "lookup" and int(arg) > MAX_LOOKUP_NGRAM:
                raise SpeccompileError(f"{asked_drafter(spec)}: lookup matches n-grams of at most {MAX_LOOKUP_NGRAM} "
                                       "tokens")
            arg = str(int(arg))
        return cls(kind, arg or None)
