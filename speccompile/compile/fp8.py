"""FP8 checkpoints as the hub ships them (DeepSeek-V3/R1, Qwen3-*-FP8): weights in float8 e4m3 with one float32
`weight_scale_inv` per block of `weight_block_size` (128 x 128), widened to float32 at load time (w = fp8 * scale
per block), exactly: every e4m3 value is a float32 value.
"""
from __future__ import annotations

import numpy as np

from speccompile.errors import CheckpointError, UnsupportedModelError

SCALE_SUFFIX = "_scale_inv"  # X.weight_scale_inv scales X.weight


def _e4m3_table() -> np.ndarray:
    """The float32 value of each e4m3fn byte: 1 sign bit, 4 exponent bits (bias 7), 3 mantissa bits; no
    infinities, S.1111.111 is NaN."""
    b = np.arange(256)
    sign = np.where(b & 0x80, -1.0, 1.0)
    exp, man = (b >> 3) & 0xF, b & 0x7
    value = np.where(exp == 0, man / 8 * 2.0 ** -6, (1 + man / 8) * 2.0 ** (exp - 7.0))
    value = np.where((exp == 0xF) & (man == 0x7), np.nan, value)
    return (sign * value).astype(np.float32)


E4M3 = _e4m3_table()


def e4m3_to_float32(raw: np.ndarray) -> np.ndarray:
    return E4M3[raw]


def fp8_block_size(hf: dict) -> tuple[int, int]:
    """quantization_config.weight_block_size, (128, 128) where it is not given."""
    size = (hf.get("quantization_config") or {}).get("weight_block_size") or (128, 128)
    if (not isinstance(size, (list, tuple)) or len(size) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in size)):
        raise CheckpointError(f"config: quantization_config.weight_block_size {size!r:.40} must be two positive "
                              "integers")
    return int(size[0]), int(size[1])


def check_block_scales(fp8_names: set[str], names: set[str]) -> None:
    """Each FP8 tensor has its X_scale_inv among `names`; FP8 scaled otherwise (AutoFP8's and llm-compressor's
    per-tensor or per-channel X_scale, a weight_scale beside X.weight) is refused, naming that layout."""
    for name in sorted(fp8_names):
        if name + SCALE_SUFFIX in names:
            continue
        if name.endswith(".weight") and name + "_scale" in names:
            raise UnsupportedModelError(f"FP8 tensor {name!r} is scaled by {name + '_scale'!r}: per-tensor or "
                                        "per-channel FP8 (AutoFP8, llm-compressor) is not read, only block-scaled FP8 "
                                        "(weight_scale_inv); use the model's float original or a GGUF")
        raise CheckpointError(f"FP8 tensor {name!r} has no {name + SCALE_SUFFIX!r}")


def apply_block_scales(tensors: dict[str, np.ndarray], fp8_names: set[str], block: tuple[int, int] = (128, 128)):
    """Scale every FP8 tensor by its X_scale_inv blocks, in place; the scales are dropped. An FP8 tensor without
    its scales, or scales of the wrong shape, is a CheckpointError naming it."""
    for name in fp8_names:
        scale_name = name + SCALE_SUFFIX
        if scale_name not in tensors:
            raise CheckpointError(f"FP8 tensor {name!r} has no {scale_name!r}")
        w, scale = tensors[name], tensors.pop(scale_name)
        if w.ndim != 2:
            raise CheckpointError(f"FP8 tensor {name!r} has shape {w.shape}: block scales ({scale_name!r}) scale "
                                  "matrices only")
        rows, cols = (-(-d // b) for d, b in zip(w.shape, block))
        if scale.shape != (rows, cols):
            raise CheckpointError(f"tensor {scale_name!r} has shape {scale.shape}, expected {(rows, cols)} "
                                  f"(blocks of {block[0]} x {block[1]} over {w.shape})")
        full = np.repeat(np.repeat(scale, block[0], 0), block[1], 1)[:w.shape[0], :w.shape[1]]
        tensors[name] = w * full
