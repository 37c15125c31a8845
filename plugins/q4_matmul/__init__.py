"""MatMulQ4 and MatMulQ8 (speccompile.kernels::MatMulQ4, ::MatMulQ8): speccompile's own onnxruntime CPU kernels for
4-bit weights in blocks of 32 with a scale and a minimum each (GGUF's Q4_1; Q4_0 too) and for int8 blocks of 32 with a
scale each (::MatMulQ8F: the same int8 weight times float32 inputs; ::GatherQ8F: an int8 matrix's rows as float32); the
same library holds ::TreeAttention (attention.c: plugins/tree_attention's op on the CPU), ::TopK,
::MatMulQ4SiLU, ::RMSNorm and ::SkipRMSNorm (norm.c) and ::GreedyAccept (accept.c). kernel.c
says what the products compute and why they exist; here are their numpy definitions, the packing of their weight
inputs, and the library: the C files compiled on first use by the machine's C compiler into the user's cache. Where
that cannot be done (no compiler, a CPU without AVX2), `unavailable()` says why, and a build keeps onnxruntime's
MatMulNBits and GroupQueryAttention."""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile

import numpy as np

from speccompile.errors import SpeccompileError
from speccompile.format.paths import user_cache_dir
from speccompile.graphs import KERNEL_DOMAIN

DOMAIN, OP_TYPE, OP_TYPE_Q8, OP_TYPE_SILU = KERNEL_DOMAIN, "MatMulQ4", "MatMulQ8", "MatMulQ4SiLU"
OP_TYPE_Q8F = "MatMulQ8F"  # MatMulQ8's weight times float32 inputs as they are
OP_TYPE_Q8_BOUND = "MatMulQ8Bound"  # MatMulQ8, and each output plus a bound on its error (the exact head's screen)
OP_TYPE_GATHER_Q8F = "GatherQ8F"  # rows of an int8 matrix (pack_rows8) as float32
BLOCK, TILE, RECORD, RECORD8 = 32, 16, 320, 576
# each instruction set's code is marked in its file, not by flags
UNITS = ("kernel.c", "avx512.c", "amx.c", "avx2.c", "attention.c", "topk.c", "gather.c", "q8f.c", "gated.c", "norm.c", "accept.c", "gumbel.c")
SOURCES = (*UNITS, "q4.h", "ort_abi.h", "attention_body.h", "vectors.h", "vexp_body.h", "gated_body.h", "q8f_body.h",
           "isa_variants.h")
FLAGS = ["-O3", "-shared", "-fPIC"]
ISAS = {2: "AVX-512 VNNI", 1: "AVX2"}
LIBRARY = "libspeccompile_kernels.so"


class KernelUnavailable(SpeccompileError):
    """The kernel cannot run on this machine; the message says why."""


def tiles(n: int, k: int) -> bool:
    """Whether an [N, K] weight fits the op's tiles (N a multiple of 16, K of 32)."""
    return n > 0 and k > 0 and n % TILE == 0 and k % BLOCK == 0


def pack(codes: np.ndarray, scales: np.ndarray, minimums: np.ndarray) -> np.ndarray | None:
    """W[n, k] = scales[n, k // 32] * codes[n, k] + minimums[n, k // 32] (codes uint8 0..15 [N, K]; scales and
    minimums float32 [N, K/32]) -> the op's weight input, uint8 [N/16, K/32, 320]; None where W does not tile or a
    scale or minimum is not exactly a float16 (the layout stores float16: the weight would change)."""
    n, k = codes.shape
    if not tiles(n, k):
        return None
    halves = [np.asarray(a, np.float32).astype(np.float16) for a in (scales, minimums)]
    if not all(np.isfinite(h).all() and (h.astype(np.float32) == a).all() for h, a in zip(halves, (scales, minimums))):
        return None
    nb, nt = k // BLOCK, n // TILE
    q = codes.reshape(nt, TILE, nb, 2, 4, 4).transpose(0, 2, 4, 1, 5, 3)  # tile, block, j, lane, i, half
    vectors = (q[..., 0] | (q[..., 1] << 4)).astype(np.uint8).reshape(nt, nb, 256)
    d, m = (h.reshape(nt, TILE, nb).transpose(0, 2, 1).copy().view(np.uint8) for h in halves)
    return np.ascontiguousarray(np.concatenate([vectors, d, m], axis=-1))


def unpack(records: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """pack's inverse: (codes [N, K], scales, minimums [N, K/32] float32)."""
    nt, nb, _ = records.shape
    v = records[..., :256].reshape(nt, nb, 4, TILE, 4)  # tile, block, j, lane, i
    q = np.stack([v & 15, v >> 4], axis=-1).transpose(0, 3, 1, 5, 2, 4).reshape(nt * TILE, nb * BLOCK)
    d, m = (records[..., a:a + 32].copy().view(np.float16).astype(np.float32).transpose(0, 2, 1).reshape(nt * TILE, nb)
            for a in (256, 288))
    return q, d, m


def round_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x [M, K] -> per 32-block int8 codes [M, K/32, 32], their scales and the blocks' sums [M, K/32], as the
    kernel rounds them (round half to even of x * (127 / max|x|))."""
    blocks = x.reshape(len(x), -1, BLOCK).astype(np.float32)
    amax = np.abs(blocks).max(-1)
    inv = np.divide(np.float32(127), amax, out=np.zeros_like(amax), where=amax > 0)
    return np.rint(blocks * inv[..., None]).astype(np.int8), amax / np.float32(127), blocks.sum(-1)


def reference(x: np.ndarray, records: np.ndarray) -> np.ndarray:
    """The op's definition in numpy: x [..., K] -> [..., N] (float64 sums of the kernel's terms, to float32): the
    centred codes' exact integer products, and the minimum plus eight steps times each block's float sum."""
    q, d, m = unpack(records)
    k = q.shape[1]
    xq, scale, sums = round_rows(x.reshape(-1, k))
    centred = q.reshape(len(q), -1, BLOCK).astype(np.int64) - 8
    dots = np.einsum("mbk,nbk->mbn", xq.astype(np.int64), centred)
    offsets = np.float32(8) * d + m  # float32, as the kernel forms it
    y = (dots * scale[..., None] * d.T[None] + sums[..., None] * offsets.T[None]).sum(1)
    return y.astype(np.float32).reshape(*x.shape[:-1], len(q))


def reference_silu(x: np.ndarray, records: np.ndarray) -> np.ndarray:
    """MatMulQ4SiLU's definition in numpy: x [..., K] -> [..., N/2], silu of the product's first half times its
    second (float64, to float32)."""
    y = reference(x, records).astype(np.float64)
    gate, up = np.split(y, 2, axis=-1)
    t = np.exp(-np.abs(gate))  # the sigmoid without overflow either side
    return (gate * np.where(gate >= 0, 1 / (1 + t), t / (1 + t)) * up).astype(np.float32)


def pack8(codes: np.ndarray, scales: np.ndarray) -> np.ndarray | None:
    """MatMulQ8's weight input: W[n, k] = scales[n, k // 32] * (codes[n, k] - 128) (codes uint8 [N, K], stored + 128
    as onnxruntime's 8-bit MatMulNBits stores them; scales float32 [N, K/32]) -> uint8 [N/16, K/32, 576]; None
    where W does not tile."""
    n, k = codes.shape
    if not tiles(n, k):
        return None
    nb, nt = k // BLOCK, n // TILE
    vectors = codes.reshape(nt, TILE, nb, 8, 4).transpose(0, 2, 3, 1, 4).reshape(nt, nb, 512)  # tile, block, j, c, i
    d = np.ascontiguousarray(np.asarray(scales, np.float32).reshape(nt, TILE, nb).transpose(0, 2, 1)).view(np.uint8)
    return np.ascontiguousarray(np.concatenate([vectors.astype(np.uint8), d], axis=-1))


def unpack8(records: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """pack8's inverse: (codes [N, K] uint8 stored + 128, scales [N, K/32] float32)."""
    nt, nb, _ = records.shape
    codes = records[..., :512].reshape(nt, nb, 8, TILE, 4).transpose(0, 3, 1, 2, 4).reshape(nt * TILE, nb * BLOCK)
    d = records[..., 512:].copy().view(np.float32).transpose(0, 2, 1).reshape(nt * TILE, nb)
    return codes, d


def reference8(x: np.ndarray, records: np.ndarray) -> np.ndarray:
    """MatMulQ8's definition in numpy: x [..., K] -> [..., N], the signed codes' exact integer dots per block times
    both scales (float64 sums, to float32)."""
    codes, d = unpack8(records)
    k = codes.shape[1]
    xq, scale, _ = round_rows(x.reshape(-1, k))
    w = codes.reshape(len(codes), -1, BLOCK).astype(np.int64) - 128
    dots = np.einsum("mbk,nbk->mbn", xq.astype(np.int64), w)
    y = (dots * scale[..., None] * d.T[None]).sum(1)
    return y.astype(np.float32).reshape(*x.shape[:-1], len(codes))


def reference8_bound(x: np.ndarray, records: np.ndarray, slack: float) -> tuple[np.ndarray, np.ndarray]:
    """MatMulQ8Bound's definition in numpy: (MatMulQ8's y, upper = y + slack * sum over blocks b of x's step (its
    rounding scale, max|x_b| / 127) times the block's L1 norm d_b * sum |w_b|) (float64 sums, to float32)."""
    codes, d = unpack8(records)
    k = codes.shape[1]
    _, scale, _ = round_rows(x.reshape(-1, k))
    l1 = np.abs(codes.reshape(len(codes), -1, BLOCK).astype(np.int64) - 128).sum(-1) * d.astype(np.float64)
    y = reference8(x, records)
    upper = y.reshape(-1, len(codes)) + slack * (scale.astype(np.float64) @ l1.T)
    return y, upper.astype(np.float32).reshape(y.shape)


def reference8f(x: np.ndarray, records: np.ndarray) -> np.ndarray:
    """MatMulQ8F's definition in numpy: x [..., K] -> [..., N] = x @ W.T for W = the records' dequantized matrix
    (float64 sums, to float32)."""
    codes, d = unpack8(records)
    w = (codes.reshape(len(codes), -1, BLOCK).astype(np.float64) - 128) * d[..., None]
    y = x.reshape(-1, codes.shape[1]).astype(np.float64) @ w.reshape(len(codes), -1).T
    return y.astype(np.float32).reshape(*x.shape[:-1], len(codes))


def pack_rows8(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """GatherQ8F's rows input: W[n, k] = scales[n, k // 32] * (codes[n, k] - 128) (codes uint8 [N, K], stored + 128;
    scales float32 [N, K/32]) -> uint8 [N, K/32, 36]: each block's 32 codes, then its scale."""
    n, k = codes.shape
    d = np.ascontiguousarray(np.asarray(scales, np.float32).reshape(n, k // BLOCK, 1)).view(np.uint8)
    return np.ascontiguousarray(np.concatenate([codes.reshape(n, k // BLOCK, BLOCK).astype(np.uint8), d], axis=-1))


def reference_gather8f(rows: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """GatherQ8F's definition in numpy: rows `indices` (ONNX Gather's, negative from the end) of the matrix that
    pack_rows8's `rows` hold, float32 [..., K]."""
    codes = rows[..., :BLOCK].astype(np.float32) - 128
    d = rows[..., BLOCK:].copy().view(np.float32)
    return (codes * d).reshape(len(rows), -1)[np.asarray(indices)]


GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's output function, over uint64 (products wrap)."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _split(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x = 2^e m, m in [sqrt(1/2), sqrt(2)) (float32, normal)."""
    b = x.view(np.uint32)
    e = (b >> np.uint32(23)).astype(np.int32) - 127
    m = ((b & np.uint32(0x007FFFFF)) | np.uint32(0x3F800000)).view(np.float32)
    big = m > np.float32(1.41421356)
    return np.where(big, m * np.float32(0.5), m), e + big


def _series(s: np.ndarray) -> np.ndarray:
    f, z, p = np.float32, s * s, np.float32(1 / 13)
    for c in (1 / 11, 1 / 9, 1 / 7, 1 / 5, 1 / 3):
        p = f(c) + z * p
    return f(2) * (f(1) + z * p)


def reference_gumbel_row(key: np.ndarray, position: int, temperature: float, n: int) -> np.ndarray:
    """speccompile_gumbel_row (gumbel.c) in numpy, step for step in float32: T * G for n tokens, G Gumbel from
    SplitMix64 keyed by key[0], key[1] (uint64) and the position."""
    f, u64 = np.float32, np.uint64
    with np.errstate(over="ignore"):
        seed = _mix(u64(key[0]) ^ _mix(u64(key[1]) + u64(position + 1) * GOLDEN))
        k = _mix(seed + np.arange(1, n + 1, dtype=u64) * GOLDEN) >> u64(11)
    high = k >= u64(1 << 52)
    w = ((u64(1 << 53) - k).astype(np.int64).astype(f) - f(0.5)) * f(2.0**-53)
    m, e = _split((k.astype(np.int64).astype(f) + f(0.5)) * f(2.0**-53))
    s = np.where(high, -w, m - f(1)) / np.where(high, f(2) - w, m + f(1))
    exponential = -(np.where(high, 0, e).astype(f) * f(0.693147181) + s * _series(s))
    m, e = _split(exponential)
    s = (m - f(1)) / (m + f(1))
    return f(-temperature) * (e.astype(f) * f(0.693147181) + s * _series(s))


def gumbel_row(key: np.ndarray, position: int, temperature: float, out: np.ndarray) -> bool:
    """Write reference_gumbel_row(key, position, temperature, len(out)) into `out` (float32, contiguous) by the
    kernel library's speccompile_gumbel_row; False where it cannot run here (no library, no AVX-512): out as it
    was."""
    kernel = _gumbel_kernel()
    return kernel is not None and bool(kernel(int(key[0]), int(key[1]), int(position), float(temperature),
                                              out.ctypes.data, len(out)))


@functools.lru_cache(maxsize=1)
def _gumbel_kernel():
    built = _built()
    if isinstance(built, KernelUnavailable):
        return None
    kernel = ctypes.CDLL(built).speccompile_gumbel_row
    kernel.restype = ctypes.c_int
    kernel.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p,
                       ctypes.c_int64]
    return kernel


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _source_key(cc: str) -> str:
    h = hashlib.sha256(" ".join([cc, *FLAGS]).encode())
    for name in SOURCES:
        with open(os.path.join(os.path.dirname(__file__), name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def _compile(cc: str, out: str) -> None:
    """Compile kernel.c to `out`, atomically: concurrent processes may build the same file."""
    os.makedirs(os.path.dirname(out), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(out))
    os.close(fd)
    try:
        units = [os.path.join(os.path.dirname(__file__), u) for u in UNITS]
        done = subprocess.run([cc, *FLAGS, "-o", tmp, *units], capture_output=True, text=True, timeout=300)
        if done.returncode:
            raise KernelUnavailable(f"{os.path.basename(cc)} could not build speccompile's kernels for this "
                                    f"machine (x86-64 only): {done.stderr.strip()[-300:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.lru_cache(maxsize=1)
def _built() -> str | KernelUnavailable:
    cc = _compiler()
    if cc is None:
        return KernelUnavailable("no C compiler (cc, gcc or clang; or $CC) to build speccompile's kernels")
    folder = user_cache_dir("kernels") or tempfile.mkdtemp(prefix="speccompile-kernels-")
    path = os.path.join(folder, _source_key(cc), LIBRARY)
    try:
        if not os.path.exists(path):
            _compile(cc, path)
    except (OSError, subprocess.SubprocessError, KernelUnavailable) as e:
        return e if isinstance(e, KernelUnavailable) else KernelUnavailable(f"building speccompile's kernels: {e}")
    if not ctypes.CDLL(path).speccompile_cpu_supported():
        return KernelUnavailable("this CPU lacks AVX2, FMA and F16C, which speccompile's kernels need")
    return path


def instruction_set() -> str | None:
    """The instruction set the kernel runs with here ("AVX-512 VNNI" or "AVX2"), None where it cannot run."""
    built = _built()
    return None if isinstance(built, KernelUnavailable) else ISAS[ctypes.CDLL(built).speccompile_cpu_supported()]


def uses_amx() -> bool:
    """Whether MatMulQ4 runs its products of 16 rows or more on the CPU's AMX tiles here (amx.c: the same numbers
    as the VNNI kernel; $SPECCOMPILE_Q4_ISA=avx512 turns it off)."""
    built = _built()
    return not isinstance(built, KernelUnavailable) and bool(ctypes.CDLL(built).speccompile_amx())


def library() -> str:
    """The compiled kernel library (built once per machine and compiler), for
    SessionOptions.register_custom_ops_library; KernelUnavailable where it cannot run here."""
    built = _built()
    if isinstance(built, KernelUnavailable):
        raise built
    return built


@functools.lru_cache(maxsize=1)
def build_key() -> str:
    """Which kernels a load here runs: the hash of their sources and compiler flags (what the library's build is
    filed under; nothing is built to tell it), "none" without a compiler. Timings depend on it: a cost model
    measured under other kernels is not this one's."""
    cc = _compiler()
    return _source_key(cc) if cc else "none"


def unavailable() -> str | None:
    """Why the kernel cannot run on this machine, or None where it can."""
    built = _built()
    return str(built) if isinstance(built, KernelUnavailable) else None
