"""Packed matrices in the layouts of speccompile's own kernels (speccompile.plugins.q4_matmul), where that keeps the
weight exactly: MatMulQ4's blocks of 32 whose scale and minimum are float16s (a GGUF's Q4_0 and Q4_1 blocks), and
MatMulQ8's int8 blocks (the output head's screen, draft heads), each in a shape that fits the kernels' tiles.
`build --kernels` chooses between them and onnxruntime's MatMulNBits."""
from __future__ import annotations

import numpy as np

from speccompile.compile.quantize.int8 import BLOCK, SUFFIX_CODES, SUFFIX_SCALES
from speccompile.compile.quantize.nbits import PackedMatrix, unpack_nibbles
from speccompile.errors import SpeccompileError, given
from speccompile.plugins import q4_matmul

SUFFIX = ".q4blocks"  # key + SUFFIX: the op's weight input, uint8 [N / 16, K / 32, 320]
CHOICES = ("auto", "onnxruntime", "speccompile")


def records(p: PackedMatrix) -> np.ndarray | None:
    """The kernel's weight input computing exactly p's weight, or None where it cannot."""
    if p.bits != 4 or p.block_size != 32 or p.zero_points is not None:
        return None
    n, k = p.shape
    eight = np.float32(8)
    if p.offsets is None:  # (q - 8) * d
        minimums = -eight * p.scales
    else:  # (q - 8) * d + (8 d + m), the bracket stored per block: m back, if it comes back exactly
        minimums = p.offsets.T - eight * p.scales
        if not (eight * p.scales + minimums == p.offsets.T).all():
            return None
    return q4_matmul.pack(unpack_nibbles(p.codes).reshape(n, k), p.scales, minimums)


def int8_records(weights: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Each int8 matrix of `weights` (codes [N, K/32, 32] and scales: compile/quantize/int8.py, head_screen.py)
    whose N tiles, in MatMulQ8's layout under its codes' name, its scales dropped (the layout holds them; the graph
    side, graph/linear.int8_product, tells the layouts apart by shape). Returns (weights, the codes converted)."""
    out, done = dict(weights), []
    pairs = [(k, k[:-len(SUFFIX_CODES)] + SUFFIX_SCALES) for k in weights if k.endswith(SUFFIX_CODES)]
    for codes_key, scales_key in pairs + [("head_screen.codes", "head_screen.scales")]:
        codes, scales = out.get(codes_key), out.get(scales_key)
        if codes is None or scales is None or codes.ndim != 3 or codes.shape[-1] != BLOCK:
            continue
        n, nb, _ = codes.shape
        packed = q4_matmul.pack8(codes.reshape(n, nb * BLOCK), scales.reshape(n, nb))
        if packed is not None:
            out[codes_key] = packed
            del out[scales_key]
            done.append(codes_key)
    return out, done


def head_rows(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{"head_screen.rows": the screen's int8 codes and scales row by row (q4_matmul.pack_rows8)} where they give the
    output head exactly (no grid error: a GGUF Q8_0 head), else {}: its rescored candidates and a tied embedding
    are then gathered from them (GatherQ8F), and no graph reads the float32 head (compile/graph/head_screen.py)."""
    codes, scales = weights.get("head_screen.codes"), weights.get("head_screen.scales")
    if codes is None or scales is None or "head_screen.err" in weights or codes.ndim != 3:
        return {}
    n, nb, _ = codes.shape
    return {"head_screen.rows": q4_matmul.pack_rows8(codes.reshape(n, nb * BLOCK), scales.reshape(n, nb))}


def kernels_pay() -> bool:
    """Whether speccompile's kernels are measured to beat onnxruntime's products on this machine: with AVX-512 VNNI.
    MatMulQ8's AVX2 variant is slower than MatMulNBits, and MatMulQ4's has not been timed on an AVX2-only CPU
    (docs/results.md, "An int8 kernel for the head's screen"): elsewhere `auto` keeps MatMulNBits, and
    `speccompile` keeps it for the int8 matrices."""
    return q4_matmul.instruction_set() == "AVX-512 VNNI"


def use_kernel(choice: str, cannot: str | None) -> tuple[bool, str | None]:
    """(whether a build's 4-bit matrices go to MatMulQ4, why not). choice: --kernels; cannot: why these graphs
    cannot run it (a TensorRT or float16 build), None where they can. auto (the default): where the kernels run and
    pay on this machine (kernels_pay), and no GPU build of onnxruntime is installed (its bundles are for a GPU)."""
    if choice not in CHOICES:
        raise SpeccompileError(f"{given('kernels', choice)}: choose {', '.join(CHOICES)}")
    if choice == "onnxruntime":
        return False, "--kernels onnxruntime"
    why = cannot or q4_matmul.unavailable()
    if why is not None and choice == "speccompile":
        raise SpeccompileError(f"{given('kernels', choice)}: {why}")
    if why is None and choice == "auto":
        why = _auto_declines()
    return why is None, why


def _auto_declines() -> str | None:
    """Why `--kernels auto` keeps onnxruntime's products although the kernels run here, or None."""
    import onnxruntime
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        return "onnxruntime-gpu is installed: a bundle for a GPU keeps MatMulNBits, which runs there"
    if not kernels_pay():
        return (f"this CPU runs speccompile's kernels with {q4_matmul.instruction_set()}; they are measured to pay "
                "with AVX-512 VNNI")
    return None
