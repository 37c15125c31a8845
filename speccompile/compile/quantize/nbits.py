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


# A packed matrix `key` is stored as these weights (the graph finds its form by name: linear.matmul):
#   key.nbits4 | key.nbits8   uint8 codes [N, K / block, block * bits / 8]; the block size follows from the shape
#   key.nbits_scales          float32 [N, K / block]
#   key.nbits_zeros           uint8 zero points (optional; 4-bit ones two per byte, [N, ceil(K / block / 2)])
#   key.nbits_offsets         float32 [K / 32, N] (optional): the per-32-block-sum product below
CODES = {4: ".nbits4", 8: ".nbits8"}
SCALES, ZEROS, OFFSETS = ".nbits_scales", ".nbits_zeros", ".nbits_offsets"


@dataclasses.dataclass
class PackedMatrix:
    """A [N, K] weight as MatMulNBits inputs (rows = outputs), plus the additive per-block term if any."""
    bits: int
    block_size: int
    codes: np.ndarray  # uint8 [N, K / block_size, block_size * bits / 8]
    scales: np.ndarray  # float32 [N, K / block_size]
    offsets: np.ndarray | None = None  # float32 [K / 32, N]: added (sum of x over each 32-block) @ offsets
    zero_points: np.ndarray | None = None  # uint8, MatMulNBits' layout (4-bit: two per byte); None: the centre

    @property
    def shape(self) -> tuple[int, int]:
        n, blocks, _ = self.codes.shape
        return n, blocks * self.block_size

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.weights("").values())

    def weights(self, name: str) -> dict[str, np.ndarray]:
        """The arrays to store, under the names emit_nbits_matmul and linear.matmul read."""
        out = {name + CODES[self.bits]: self.codes, name + SCALES: self.scales}
        if self.zero_points is not None:
            out[name + ZEROS] = self.zero_points
        return out | ({name + OFFSETS: self.offsets} if self.offsets is not None else {})

    def zero_point_values(self) -> np.ndarray:
        """[N, K / block] zero points as numbers."""
        n, blocks, _ = self.codes.shape
        if self.zero_points is None:
            return np.full((n, blocks), 2 ** (self.bits - 1), np.float32)
        z = unpack_nibbles(self.zero_points) if self.bits == 4 else self.zero_points
        return z.reshape(n, -1)[:, :blocks].astype(np.float32)

    def dequantize(self) -> np.ndarray:
        """W [N, K] float32 as MatMulNBits (plus the offset term) reads it: for tests and fallbacks."""
        n, k = self.shape
        q = unpack_nibbles(self.codes) if self.bits == 4 else self.codes
        w = (q.astype(np.float32) - self.zero_point_values()[..., None]) * self.scales[..., None]
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
    W = {key: g.weight(key, array) for key, array in packed.weights(name).items()}
    return nbits_product(g, x, W, name, accuracy_level)


def stored_bits(W, key: str) -> int | None:
    """The bits of matrix `key` if it is stored packed among the weight names W, else None."""
    return next((bits for bits, suffix in CODES.items() if key + suffix in W), None)


def nbits_product(g: GraphBuilder, x: str, W: dict[str, str], key: str, accuracy_level: int = 4,
                  output: str | None = None) -> str:
    """x @ W^T for the packed matrix stored under `key` (the weight names above, registered in g)."""
    bits = stored_bits(W, key)
    n, blocks, blob = g.weights[W[key + CODES[bits]]][0]
    block = blob * 8 // bits
    k = blocks * block
    inputs = [x, W[key + CODES[bits]], W[key + SCALES]] + ([W[key + ZEROS]] if key + ZEROS in W else [])
    y = g.op("MatMulNBits", inputs, outputs=[output] if output and key + OFFSETS not in W else None,
             domain="com.microsoft", K=k, N=n, bits=bits, block_size=block, accuracy_level=accuracy_level)[0]
    if key + OFFSETS not in W:
        return y
    return g.op("Add", [y, g.op("MatMul", [block_sums(g, x, k), W[key + OFFSETS]])[0]],
                outputs=[output] if output else None)[0]


def block_sums(g: GraphBuilder, x: str, k: int) -> str:
    """x [..., K] -> the sums of its blocks of 32 [..., K/32], as one product with a 0/1 matrix (one node instead
    of a reshape and a reduction), emitted once per input: the matrices that read the same x share it."""
    key = ("nbits.block_sums", x)
    if key not in g.shared:
        ones = ("nbits.block_ones", k)
        if ones not in g.shared:
            g.shared[ones] = g.const(np.kron(np.eye(k // 32, dtype=np.float32), np.ones((32, 1), np.float32)))
        g.shared[key] = g.op("MatMul", [x, g.shared[ones]])[0]
    return g.shared[key]


def _widened(p: PackedMatrix, bits: int, block: int) -> PackedMatrix:
    """The same weight with wider codes and/or smaller blocks, exactly: 4-bit codes centred at 8 become 8-bit
    codes centred at 128; a block splits into blocks of `block` sharing its scale."""
    if p.zero_points is not None:
        raise ValueError("only matrices without zero points are widened")
    codes = p.codes
    if bits != p.bits:
        codes = unpack_nibbles(codes) + np.uint8(120)
    n, blocks, _ = codes.shape
    split = p.block_size // block
    codes = codes.reshape(n, blocks * split, -1)
    return PackedMatrix(bits, block, np.ascontiguousarray(codes), np.repeat(p.scales, split, axis=1), p.offsets)


def join_rows(parts: list[PackedMatrix]) -> PackedMatrix:
    """Matrices with the same K stacked along N (q, k and v as one product), exactly. Parts of different formats
    are first widened to a common one (8 bits, the smallest block); parts with zero points join only parts of
    their own format (each row keeps its own zero points)."""
    if any(p.zero_points is not None for p in parts):
        if len({(p.bits, p.block_size, p.zero_points is not None, p.offsets is not None) for p in parts}) != 1:
            raise ValueError("matrices with zero points join only matrices of the same format")
        first = parts[0]
        return PackedMatrix(first.bits, first.block_size, np.concatenate([p.codes for p in parts]),
                            np.concatenate([p.scales for p in parts]), None,
                            np.concatenate([p.zero_points for p in parts]))
    bits = max(p.bits for p in parts) if len({p.bits for p in parts}) == 1 else 8
    block = min(p.block_size for p in parts)
    parts = [p if (p.bits, p.block_size) == (bits, block) else _widened(p, bits, block) for p in parts]
    offsets = None
    if any(p.offsets is not None for p in parts):
        offsets = np.concatenate([p.offsets if p.offsets is not None else
                                  np.zeros((p.shape[1] // 32, p.shape[0]), np.float32) for p in parts], axis=1)
    return PackedMatrix(bits, block, np.concatenate([p.codes for p in parts]),
                        np.concatenate([p.scales for p in parts]), offsets)
