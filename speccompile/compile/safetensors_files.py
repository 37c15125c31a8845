"""Safetensors files read as the build reads them: float tensors only (widened to float32 exactly), pickled
checkpoints refused unread, a quantization's integer codes refused by name."""
from __future__ import annotations

import json

import numpy as np
from safetensors import safe_open

from speccompile.compile.families import text_tensor_name
from speccompile.compile.fp8 import check_block_scales, e4m3_to_float32
from speccompile.errors import CheckpointError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# tensors of GPTQ and AWQ checkpoints, whose integer codes a file without a quantization_config may still hold
PACKED_QUANT_TENSORS = (".qweight", ".qzeros", ".g_idx")


def refuse_pickle(path: str) -> None:
    """Pickled weights are never loaded: unpickling runs arbitrary code."""
    if path.endswith(PICKLE_SUFFIXES):
        raise CheckpointError(f"{path}: pickled checkpoints are refused (unsafe to load); convert it to safetensors")


# what read_safetensors widens to float32, exactly; integer or boolean tensors are a quantization's codes (int8,
# bitsandbytes, GPTQ's int32 packs) or masks, never weights to be cast
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64", "F8_E4M3")


def read_safetensors(fpath: str, keep=lambda name: True, ints: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """The tensors of one safetensors file whose names `keep` accepts: float32, except the names in `ints`
    (token-id maps), kept as int64. A corrupt or truncated file, or a tensor of another dtype than FLOAT_DTYPES
    (outside `ints`), is a CheckpointError naming it."""
    try:
        with safe_open(fpath, framework="numpy") as f:
            names = [k for k in f.keys() if keep(k)]
            dtypes = {k: f.get_slice(k).get_dtype() for k in names}
            refuse_non_float(fpath, {k: d for k, d in dtypes.items() if k not in ints})
            raw = {k for k in names if dtypes[k] in ("BF16", "F8_E4M3")}
            out = {k: f.get_tensor(k).astype(np.int64 if k in ints else np.float32) for k in names if k not in raw}
        return out | (read_raw_floats(fpath, raw) if raw else {})
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"weights not found: {fpath}") from None
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt headers
        raise CheckpointError(f"{fpath}: corrupt or truncated safetensors file ({e})") from None


def refuse_non_float(fpath: str, dtypes: dict[str, str]) -> None:
    bad = next((k for k, dtype in dtypes.items() if dtype not in FLOAT_DTYPES), None)
    if bad is not None:
        packed = " (qweight/qzeros tensors: a GPTQ or AWQ checkpoint)" if bad.endswith(PACKED_QUANT_TENSORS) else ""
        raise CheckpointError(f"{fpath}: tensor {bad!r} is stored as {dtypes[bad]}{packed}; only float weights are "
                              f"read ({', '.join(FLOAT_DTYPES)}): use the model's float original")


def checked_dtypes(files: list[str], hf: dict) -> dict[str, str]:
    """The dtype of each tensor of the text model, by its text model name, from the files' headers: a tensor that
    is not a float weight, or an FP8 one without its block scales, is refused here, before a weight is hashed or
    read (a quantized checkpoint of several GB otherwise fails only once read up to the offending tensor)."""
    dtypes: dict[str, str] = {}
    for fpath in files:
        try:
            with safe_open(fpath, framework="numpy") as f:
                found = {k: f.get_slice(k).get_dtype() for k in f.keys() if text_tensor_name(hf, k) is not None}
        except Exception as e:  # safetensors raises its own error types for truncated or corrupt headers
            raise CheckpointError(f"{fpath}: corrupt or truncated safetensors file ({e})") from None
        refuse_non_float(fpath, found)
        dtypes |= {text_tensor_name(hf, k): dtype for k, dtype in found.items()}
    check_block_scales({k for k, dtype in dtypes.items() if dtype == "F8_E4M3"}, set(dtypes))
    return dtypes


def fp8_tensor_names(fpath: str) -> set[str]:
    """The float8 tensors of a safetensors file (read from its header)."""
    with safe_open(fpath, framework="numpy") as f:
        return {k for k in f.keys() if f.get_slice(k).get_dtype() == "F8_E4M3"}


def read_raw_floats(fpath: str, names: set[str]) -> dict[str, np.ndarray]:
    """numpy has neither bfloat16 nor float8, so safetensors' numpy API refuses them; a bfloat16 is the top half of
    a float32's bits, and every float8 e4m3 value is a float32 (fp8.py; its block scales are applied by
    load_hf_dir), so widening is exact. The header's layout is the safetensors format: 8-byte length, JSON,
    data."""
    with open(fpath, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    data = np.memmap(fpath, np.uint8, "r", offset=8 + n)
    out = {}
    for k in names:
        begin, stop = header[k]["data_offsets"]
        if header[k]["dtype"] == "F8_E4M3":
            out[k] = e4m3_to_float32(data[begin:stop]).reshape(header[k]["shape"])
            continue
        bits = data[begin:stop].view("<u2").astype(np.uint32) << 16
        out[k] = bits.view(np.float32).reshape(header[k]["shape"])
    return out
