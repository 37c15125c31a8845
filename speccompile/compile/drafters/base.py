"""What the driver and the build halves of the drafter kinds hand each other: the build's options, a read-only
view of the target, and what one drafter adds to the bundle."""
from __future__ import annotations

import dataclasses
import numbers
from typing import Callable

import numpy as np

from speccompile.compile.checkpoint import Checkpoint
from speccompile.compile.config import ModelConfig
from speccompile.errors import SpeccompileError, given
from speccompile.graphs import DEFAULT_MAX_BATCH
from speccompile.graphs.builder import GraphBuilder

DEFAULT_MAX_SEQ_LEN = 2048
Graph = tuple[GraphBuilder, list[str]]  # a graph and the weight files its initializers live in


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """`speccompile build`'s settings (the CLI's options of the same names; the CLI sets `fused` by --attention,
    and `mla_cache` is build_bundle's keyword alone)."""
    max_seq_len: int | None = None  # None: min(DEFAULT_MAX_SEQ_LEN, the model's context)
    num_draft: int | None = None  # tokens per pass; None: each kind's default (and default tree)
    attention: str = "auto"  # the attention lowering (speccompile.plugins.tree_attention; graph/attention.py)
    fused: bool = True  # onnxruntime's fused kernels (the int8 head screen needs them)
    overwrite: bool = False
    tree: str | None = None  # a TreeSpec every drafter verifies
    mla_cache: str = "latent"  # MLA targets: cache the latent or the expanded K/V
    backend: str = "onnxruntime"  # or "tensorrt": an engine per model besides the CPU graphs
    head_screen: bool = True  # the target's greedy passes score with the exact int8-screened output head
    draft_precision: str = "int8"  # draft heads' matrices in int8 (speccompile.compile.quantize.int8), or "float32"
    dtype: str = "float32"  # graphs, weights and KV caches: float32, float16 or bfloat16 (compile/precision.py)
    kv_dtype: str | None = None  # KV caches alone: float16 under float32 graphs (compile/kv_dtype.py); None: dtype's
    weights: str = "source"  # the target's matrices: source | float32 | int8 | int4 (quantize/target_weights.py)
    max_batch: int = DEFAULT_MAX_BATCH  # sequence slots of the batched target graph (1: none)
    # 4-bit and int8 products: onnxruntime's MatMulNBits, speccompile's MatMulQ4/MatMulQ8 ("speccompile"), or
    # speccompile's where they pay on this machine ("auto": quantize/kernel_form.py)
    kernels: str = "auto"

    def __post_init__(self):
        """build_bundle's keywords checked by type, as click checks the CLI's flags: a string max_seq_len would
        fail deep inside the build, and the string "no" would read as true."""
        for field in dataclasses.fields(self):
            kind, _, optional = field.type.partition(" | ")
            value = getattr(self, field.name)
            what, fits = _EXPECTED[kind]
            if not (value is None and optional == "None" or fits(value)):
                raise SpeccompileError(f"{given(field.name, value)}: expected {what}")
            if kind == "int" and value is not None:  # a numpy integer would not go into the manifest's JSON
                object.__setattr__(self, field.name, int(value))


_EXPECTED = {"int": ("a whole number", lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool)),
             "str": ("a string", lambda v: isinstance(v, str)),
             "bool": ("True or False", lambda v: isinstance(v, bool))}


@dataclasses.dataclass(frozen=True)
class TargetBuild:
    """The target as the build halves see it. Read it, never write to it: its weights are target.bin's."""
    checkpoint: Checkpoint
    weights: dict[str, np.ndarray]  # target.bin: the lowered target (with its int8 head screen when it has one)
    options: BuildOptions
    features: list  # what the target graph outputs as aux_hidden_states (the kinds' target_features, joined)
    progress: Callable[[str], None]
    int8_kernel: bool = False  # int8 matrices go to speccompile's MatMulQ8 (build --kernels; quantize/kernel_form.py)

    @property
    def config(self) -> ModelConfig:
        return self.checkpoint.config


@dataclasses.dataclass(frozen=True)
class DrafterBuild:
    """What one drafter adds to the bundle."""
    entry: dict = dataclasses.field(default_factory=dict)  # keys of its drafter entry, e.g. {"model": ...}
    weights: dict[str, dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)  # file name -> tensors
    graphs: dict[str, Graph] = dataclasses.field(default_factory=dict)  # model name -> graph
    models: dict[str, dict] = dataclasses.field(default_factory=dict)  # model name -> its manifest entry
    max_num_draft: int | None = None  # the most tokens it drafts per pass (Medusa: its number of heads)
