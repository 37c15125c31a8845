"""The quantize pass over the target's matrices: `build --weights source|float32|int8|int4`.

  source   a quantized GGUF keeps its blocks: each layer matrix becomes MatMulNBits inputs computing exactly the
           file's dequantized weight (quantize/nbits.py); a float checkpoint stays float32
  float32  every matrix float32 (dequantized, for a GGUF)
  int8     float weights block-quantized (blocks of 32 along K, a scale and a uint8 zero point per block) by
  int4     onnxruntime's own block quantizer, the one its MatMulNBitsQuantizer calls; a quantized GGUF's matrices
           are its dequantized blocks rounded again (format "int4 requantized from q4_1")

Every matrix that stays float32 in a quantized build is named with the reason (build output and manifest). The
output head is not quantized here: the exact greedy head's int8 screen (quantize/head_screen.py) covers it.

The products run at ACCURACY_LEVEL 4: x rounded to int8 per block and integer products, the fast kernel (level 0,
float32 arithmetic on the dequantized blocks, is several times slower at one row). Rounding x is discontinuous, so
the logits are those of the quantized product, not the float reference's (tools/quant_agreement.py measures how
close); and it would amplify any last-bit difference between a one-row pass and a verify pass of several rows
into different greedy tokens. There is none: the kernel computes each row alike whatever the row count, and the
attention runs every step over two rows or more (speccompile.plugins.tree_attention, the pad row), so speculative
output equals the bundle's own plain decoding bit for bit.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np
from gguf import GGMLQuantizationType as Q
from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

from speccompile.compile.quantize import kernel_form
from speccompile.compile.quantize.nbits import SUPPORTED, PackedMatrix, join_rows, pack_gguf_matrix
from speccompile.compile.weights.names import layer_of
from speccompile.errors import SpeccompileError, given

MODES = ("source", "float32", "int8", "int4")
ACCURACY_LEVEL = 4
BLOCK = 32
FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)

# a dense layer's graph matrix (l{i}.<name>) -> the Hugging Face tensors stacked along its outputs
DENSE_MATRICES = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o": ("self_attn.o_proj",),
                  "gate": ("mlp.gate_proj",), "up": ("mlp.up_proj",), "down": ("mlp.down_proj",)}
HEAD_REASON = "the output head: its exact greedy int8 screen reads a quantized copy, rescoring float32 rows"
UNSCREENED_HEAD_REASON = "the output head: read whole each step (this build has no int8 screen of it)"
EMBED_REASON = "the embedding: a decode step gathers one row of it"
# why an output head (a tied embedding) on the int8 grid is float32 to the graphs though the bundle keeps no float32
# copy of it: they gather its rows from its int8 rows (compile/graph/head_screen.head_rows), the values exact; a
# draft head's graph that multiplies by the float32 head keeps the copy
HEAD_ON_ROWS = ("the output head: gathered from its int8 rows (head_screen.rows), the same float32 values, and "
                "screened by its int8 screen")
HEAD_READ_WHOLE = HEAD_REASON + "; a draft head's graph multiplies by it (a float32 draft head scoring with it)"


@dataclasses.dataclass
class WeightReport:
    """What the pass did: each matrix's format, and why each one that stays float32 does."""
    option: str
    formats: dict[str, str] = dataclasses.field(default_factory=dict)  # graph matrix -> format
    fallbacks: dict[str, str] = dataclasses.field(default_factory=dict)  # graph matrix -> reason it is float32
    kernel_matrices: list[str] = dataclasses.field(default_factory=list)  # stored for speccompile's own kernels
    int8_kernel: bool = False  # int8 matrices go to speccompile's MatMulQ8 (driver._quantize; not in the manifest)
    kernel_library: bool = False  # the build uses speccompile's kernels (--attention kernel needs them)

    def manifest(self) -> dict:
        packed = any(fmt != "float32" for fmt in self.formats.values())
        kernel = {"kernel_matrices": self.kernel_matrices} if self.kernel_matrices else {}
        return {"option": self.option, **({"accuracy_level": ACCURACY_LEVEL} if packed else {}),
                "formats": self.formats, "fallbacks": self.fallbacks, **kernel}

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for fmt in self.formats.values():
            counts[fmt] = counts.get(fmt, 0) + 1
        return ", ".join(f"{n} {fmt}" for fmt, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise SpeccompileError(f"{given('weights', mode)}: choose {', '.join(MODES)}")


def quantize_target(weights: dict[str, np.ndarray], stored: dict | None, mode: str, native: str | None = None,
                    head_screened: bool = True, kernel: bool = False) -> tuple[dict[str, np.ndarray], WeightReport]:
    """The lowered target weights with its layer matrices in `mode`'s format. stored: a GGUF's tensors as stored
    (compile/gguf.GGUFTensor by Hugging Face name), None for a float checkpoint. native: why the graphs cannot run
    MatMulNBits (e.g. a TensorRT build), None when they can. head_screened: whether the build adds the output
    head's int8 screen (the reason its head stays float names it only then). kernel: 4-bit matrices in the layout
    of speccompile's MatMulQ4 kernel where it keeps them exactly (kernel_form.py), else MatMulNBits'."""
    check_mode(mode)
    out, report, packed_mlp = dict(weights), WeightReport(mode), {}
    store = functools.partial(_stored, report=report, kernel=kernel)
    head_reason = HEAD_REASON if head_screened else UNSCREENED_HEAD_REASON
    for key, w in weights.items():
        if key in ("embed", "lm_head"):
            report.formats[key] = "float32"
            if mode != "float32":
                report.fallbacks[key] = EMBED_REASON if key == "embed" and "lm_head" in weights else head_reason
        elif layer_of(key) is not None and np.ndim(w) >= 2:
            report.formats[key] = "float32"
            packed, reason = _matrix(key, w, stored, mode, native)
            if packed is not None:
                del out[key]
                report.formats[key] = reason
                if key.endswith((".gate", ".up")):
                    packed_mlp[key] = packed
                else:
                    out |= store(key, packed)
            elif reason:
                report.fallbacks[key] = reason
    return _join_gate_up(out, packed_mlp, report, store), report


def _stored(key: str, packed: PackedMatrix, report: WeightReport, kernel: bool) -> dict[str, np.ndarray]:
    """The arrays of graph matrix `key`: MatMulQ4's layout where asked and exact, else MatMulNBits' inputs."""
    blocks = kernel_form.records(packed) if kernel else None
    if blocks is None:
        return packed.weights(key)
    report.kernel_matrices.append(key)
    return {key + kernel_form.SUFFIX: blocks}


def _join_gate_up(out: dict, packed: dict, report: WeightReport, store) -> dict:
    """A layer's packed gate and up as one matrix, gate_up (one product and one offsets product a layer instead
    of two each; graph/mlp.py splits the output); a gate or up packed without the other under its own name."""
    for key, p in packed.items():
        layer, name = key.rsplit(".", 1)
        other_key = f"{layer}.{'up' if name == 'gate' else 'gate'}"
        other = packed.get(other_key)
        if other is None:
            out |= store(key, p)
        elif name == "gate":
            joined = join_rows([p, other])
            out |= store(layer + ".gate_up", joined)
            for part_key, part in ((key, p), (other_key, other)):
                _relabel_widened(report, part_key, part, joined)
    return out


def _relabel_widened(report: WeightReport, key: str, part: PackedMatrix, joined: PackedMatrix) -> None:
    """A part widened by its join (a GGUF's Q4 gate beside a Q5 or Q8 up) is stored in the joined form: its label
    says so, as a mixed qkv's does (only --weights source joins parts of different forms)."""
    if (part.bits, part.block_size) != (joined.bits, joined.block_size):
        types = report.formats[key].split(" ")[0]
        report.formats[key] = f"{types} as {joined.bits}-bit blocks of {joined.block_size}"


def _matrix(key: str, w: np.ndarray, stored: dict | None, mode: str,
            native: str | None) -> tuple[PackedMatrix | None, str | None]:
    """(packed, its format) or (None, why it stays float32; None when float32 is what was asked)."""
    if mode == "float32" or (mode == "source" and stored is None):
        return None, None
    name = key.split(".", 1)[1]
    if name not in DENSE_MATRICES or w.ndim != 2:
        return None, f"{name} matrices ({'x'.join(map(str, w.shape))}) have no quantized lowering yet"
    if native:
        return None, native
    if mode == "source":
        return _from_gguf(key, name, stored)
    if w.shape[0] % BLOCK:
        return None, f"its input size {w.shape[0]} is not a multiple of {BLOCK}"
    packed = quantize_float(w, 4 if mode == "int4" else 8)
    blocks = [t.name.lower() for t in _stored_types(key, name, stored) if t not in FLOAT_TYPES] if stored else []
    # a GGUF's own blocks rounded a second time, lossier than --weights source (which keeps them): said so
    return packed, f"{mode} requantized from {'+'.join(blocks)}" if blocks else mode


def _stored_types(key: str, name: str, stored: dict) -> list:
    """The GGUF types of the tensors stacked into graph matrix `key`, sorted by name."""
    prefix = f"model.layers.{layer_of(key)}."
    return sorted({stored[f"{prefix}{hf}.weight"].ggml_type for hf in DENSE_MATRICES[name]}, key=lambda t: t.name)


def _from_gguf(key: str, name: str, stored: dict) -> tuple[PackedMatrix | None, str]:
    prefix = f"model.layers.{layer_of(key)}."
    tensors = [stored[f"{prefix}{hf}.weight"] for hf in DENSE_MATRICES[name]]
    types = _stored_types(key, name, stored)
    for t in types:
        if t in FLOAT_TYPES:
            return None, f"stored as {t.name} in the source (a float format)"
        if t not in SUPPORTED:
            return None, f"{t.name} blocks have no exact MatMulNBits form (dequantized to float32)"
    packed = join_rows([pack_gguf_matrix(t.raw, t.ggml_type, t.shape) for t in tensors])
    fmt = "+".join(t.name.lower() for t in types)
    as_stored = len(types) == 1 and int(types[0].name[1]) == packed.bits  # Q5/Q6 blocks are stored in 8 bits
    return packed, fmt if as_stored else f"{fmt} as {packed.bits}-bit blocks of {packed.block_size}"


def quantize_float(w_kn: np.ndarray, bits: int) -> PackedMatrix:
    """A float matrix [K, N] (as MatMul multiplies x @ W) -> asymmetric blocks of BLOCK along K with uint8 zero
    points (onnxruntime's fastest MatMulNBits kernel), by onnxruntime's block quantizer."""
    k, n = w_kn.shape
    blocks = k // BLOCK
    codes = np.zeros((n, blocks, BLOCK * bits // 8), np.uint8)
    scales = np.zeros((n, blocks), np.float32)
    zeros = np.zeros((n, (blocks + 1) // 2 if bits == 4 else blocks), np.uint8)
    quantize = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    quantize(codes, np.ascontiguousarray(w_kn, np.float32), scales, zeros, BLOCK, n, k, False)
    return PackedMatrix(bits, BLOCK, codes, scales, zero_points=zeros)
