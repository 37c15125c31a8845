"""GGUF quantized blocks as onnxruntime's com.microsoft MatMulNBits inputs, exactly.

MatMulNBits computes x @ W^T with W[n, k] = (code - zero_point) * scale per block of `block_size` along k, the
zero point defaulting to 2^(bits-1) when none is given. A GGUF block format maps onto it without rounding where
each block is (integer - constant) * scale:

    Q4_0   (q - 8) * d                      4 bits, block 32, no zero points
    Q5_0   (q - 16) * d  (q 5-bit)          8 bits, block 32, codes q + 112
    Q8_0   q * d  (q int8)                  8 bits, block 32, codes q + 128
    Q6_K   (q - 32) * d * sc  (16-blocks)   8 bits, block 16, codes q + 96, scales d * sc
    Q4_1   q * d + m                        (q - 8) * d  plus  (8 d + m) * (sum of x over the block)
    Q5_1   q * d + m  (q 5-bit)             (q - 16) * d (8 bits) plus (16 d + m) * (sum of x over the block)
    Q4_K   q * d * sc - dmin * mn (32-blocks)  as Q4_1 with per-32 scale d * sc and minimum -dmin * mn
    Q5_K   the same with 5-bit q            as Q5_1 with those scales and minimums

Q4_1/Q5_1/Q4_K/Q5_K's per-block minimum is not an integer zero point, and a float zero point sends onnxruntime
to a much slower kernel; so the minimum goes in as a second, small product: the per-block sums of x [.., K/32]
times `offsets` [K/32, N] (centre * scale + minimum). The centre is the middle code, so both terms stay of the
weights' size (no cancellation). Scales are f16 (times a small integer for the K formats): exact in float32.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from speccompile.graphs.builder import GraphBuilder

SUPPORTED = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K)


@dataclasses.dataclass
class PackedMatrix:
    """A [N, K] weight as MatMulNBits inputs (rows = outputs), plus the additive per-block term if any."""
    bits: int
    block_size: int
    codes: np.ndarray  # uint8 [N, K / block_size, block_size * bits / 8]
    scales: np.ndarray  # float32 [N, K / block_size]
    offsets: np.ndarray | None = None  # float32 [K / 32, N]: added (sum of x over each 32-block) @ offsets

    @property
    def shape(self) -> tuple[int, int]:
        n, blocks, _ = self.codes.shape
        return n, blocks * self.block_size

    def weights(self, name: str) -> dict[str, np.ndarray]:
        """The arrays to store, under the names emit_nbits_matmul gives them."""
        out = {f"{name}.nbits": self.codes, f"{name}.nbits_scales": self.scales}
        return out | ({f"{name}.nbits_offsets": self.offsets} if self.offsets is not None else {})

    def dequantize(self) -> np.ndarray:
        """W [N, K] float32 as MatMulNBits (plus the offset term) reads it: for tests and fallbacks."""
        n, k = self.shape
        q = unpack_nibbles(self.codes) if self.bits == 4 else self.codes
        w = (q.astype(np.float32) - 2 ** (self.bits - 1)) * self.scales[..., None]
        w = w.reshape(n, k)
        if self.offsets is not None:
            w = w + np.repeat(self.offsets.T, 32, axis=1)
        return w


def _blocks(raw: np.ndarray, ggml_type: Q, shape: tuple[int, int]) -> np.ndarray:
    """raw rows -> uint8 [N, K / block, type_size]."""
    n, k = shape
    block, type_size = GGML_QUANT_SIZES[ggml_type]
    if k % block:
        raise ValueError(f"{ggml_type.name} row length {k} is not a multiple of {block}")
    return np.ascontiguousarray(raw, np.uint8).reshape(n, k // block, type_size)


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    return np.ascontiguousarray(blocks[..., at:at + 2]).view(np.float16)[..., 0].astype(np.float32)


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """4-bit codes [..., 2j] in the low nibble, [..., 2j + 1] in the high one (MatMulNBits' order)."""
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def unpack_nibbles(b: np.ndarray) -> np.ndarray:
    return np.stack([b & 15, b >> 4], axis=-1).reshape(*b.shape[:-1], b.shape[-1] * 2)


def _q4_codes(qs: np.ndarray) -> np.ndarray:
    """ggml's 32-element 4-bit block: element j < 16 in qs[j]'s low nibble, j + 16 in its high nibble."""
    return np.concatenate([qs & 15, qs >> 4], axis=-1)


def _per32_offsets(scales: np.ndarray, minimums: np.ndarray, centre: int) -> np.ndarray:
    """(q - c) * s + (c s + min) == q * s + min; the bracket per 32-block, laid out [K/32, N] for x-sums @ it."""
    return np.ascontiguousarray((centre * scales + minimums).T, np.float32)


def _q5_codes(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """ggml's 32-element 5-bit block: the 4-bit layout plus bit j of the little-endian uint32 qh as bit 4."""
    high = (np.ascontiguousarray(qh).view("<u4") >> np.arange(32, dtype=np.uint32)) & 1
    return _q4_codes(qs) | (high.astype(np.uint8) << 4)


def _pack_q4_0(b):
    return PackedMatrix(4, 32, pack_nibbles(_q4_codes(b[..., 2:])), _f16(b, 0))


def _pack_q4_1(b):
    d, m = _f16(b, 0), _f16(b, 2)
    return PackedMatrix(4, 32, pack_nibbles(_q4_codes(b[..., 4:])), d, _per32_offsets(d, m, 8))


def _pack_q5_0(b):
    return PackedMatrix(8, 32, _q5_codes(b[..., 2:6], b[..., 6:]) + np.uint8(112), _f16(b, 0))


def _pack_q5_1(b):
    d, m = _f16(b, 0), _f16(b, 2)
    return PackedMatrix(8, 32, _q5_codes(b[..., 4:8], b[..., 8:]) + np.uint8(112), d, _per32_offsets(d, m, 16))


def _pack_q8_0(b):
    q = b[..., 2:].view(np.int8).astype(np.int16) + 128
    return PackedMatrix(8, 32, q.astype(np.uint8), _f16(b, 0))


def _k4_scales_mins(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's get_scale_min_k4: eight 6-bit scales and minimums packed in 12 bytes."""
    low = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)], axis=-1)
    mins = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], axis=-1)
    return low.astype(np.float32), mins.astype(np.float32)


def _k_scales_minimums(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: per-32 scales d * sc and minimums -dmin * mn, [N, K/32]."""
    n = b.shape[0]
    sc, mn = _k4_scales_mins(b[..., 4:16])
    return (_f16(b, 0)[..., None] * sc).reshape(n, -1), (-_f16(b, 2)[..., None] * mn).reshape(n, -1)


def _k_nibbles(qs: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 128 bytes per super-block: 4 chunks of 64 elements, low nibbles then high nibbles ->
    [N, supers, 8, 32]."""
    qs = qs.reshape(*qs.shape[:2], 4, 32)
    return np.stack([qs & 15, qs >> 4], axis=3).reshape(*qs.shape[:2], 8, 32)


def _pack_q4_k(b):
    scales, minimums = _k_scales_minimums(b)
    q = _k_nibbles(b[..., 16:]).reshape(b.shape[0], -1, 32)
    return PackedMatrix(4, 32, pack_nibbles(q), scales, _per32_offsets(scales, minimums, 8))


def _pack_q5_k(b):
    scales, minimums = _k_scales_minimums(b)
    qh = b[..., 16:48]  # bit j of byte l: element l of sub-block j
    high = (qh[..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1
    q = (_k_nibbles(b[..., 48:]) | (high << 4)).reshape(b.shape[0], -1, 32)
    return PackedMatrix(8, 32, q + np.uint8(112), scales, _per32_offsets(scales, minimums, 16))


def _pack_q6_k(b):
    n, supers, _ = b.shape
    ql, qh = b[..., 0:128].reshape(n, supers, 2, 64), b[..., 128:192].reshape(n, supers, 2, 32)
    low = np.concatenate([ql & 15, ql >> 4], axis=-1)  # per 128-half: elements 0-31, 32-63 | 64-95, 96-127
    high = np.concatenate([(qh >> s) & 3 for s in (0, 2, 4, 6)], axis=-1)
    q = (low | (high << 4)).reshape(n, supers * 16, 16)
    sc = b[..., 192:208].view(np.int8).astype(np.float32)
    scales = (_f16(b, 208)[..., None] * sc).reshape(n, -1)
    return PackedMatrix(8, 16, (q + 96).astype(np.uint8), scales)


_PACKERS = {Q.Q4_0: _pack_q4_0, Q.Q4_1: _pack_q4_1, Q.Q5_0: _pack_q5_0, Q.Q5_1: _pack_q5_1, Q.Q8_0: _pack_q8_0,
            Q.Q4_K: _pack_q4_k, Q.Q5_K: _pack_q5_k, Q.Q6_K: _pack_q6_k}


def pack_gguf_matrix(raw_blocks: np.ndarray, ggml_type: Q, shape: tuple[int, int]) -> PackedMatrix:
    """A GGUF tensor's raw rows (Hugging Face row order, e.g. speccompile.compile.gguf.GGUFTensor.raw) of an
    [N, K] weight -> MatMulNBits inputs computing exactly the weight gguf.quants.dequantize gives."""
    if ggml_type not in _PACKERS:
        raise ValueError(f"{Q(ggml_type).name} blocks have no exact MatMulNBits form")
    return _PACKERS[ggml_type](_blocks(raw_blocks, ggml_type, shape))


def emit_nbits_matmul(g: GraphBuilder, x: str, packed: PackedMatrix, name: str, accuracy_level: int = 4) -> str:
    """y = x @ W^T (x [..., K], y [..., N]) for the packed W, its arrays registered as weights under `name`
    (store packed.weights(name)). accuracy_level 4 quantizes x to int8 per block (the fast kernel); 0 computes in
    float32."""
    n, k = packed.shape
    names = list(packed.weights(name))
    for key, array in packed.weights(name).items():
        g.weight(key, array)
    y = g.op("MatMulNBits", [x, names[0], names[1]], domain="com.microsoft", K=k, N=n, bits=packed.bits,
             block_size=packed.block_size, accuracy_level=accuracy_level)[0]
    if packed.offsets is None:
        return y
    # x's leading dims, then [K/32, 32]: sums over each 32-block whatever x's rank
    lead = g.op("Slice", [g.op("Shape", [x])[0], g.const(np.array([0], np.int64)),
                          g.const(np.array([-1], np.int64))])[0]
    blocked = g.op("Reshape", [x, g.op("Concat", [lead, g.const(np.array([k // 32, 32], np.int64))], axis=0)[0]])[0]
    sums = g.op("ReduceSum", [blocked, g.const(np.array([-1], np.int64))], keepdims=0)[0]
    return g.op("Add", [y, g.op("MatMul", [sums, names[2]])[0]])[0]
