// Device code of speccompile::TreeAttention: the two kernels that tree_attention_kernels.cu launches. Kept apart
// from the launcher so that the same source also compiles for the CPU emulator (emulator/), which runs it on
// machines without a GPU; only CUDA built-ins the emulator provides may appear here.
#pragma once

#include "tree_attention_kernels.h"

#include <cmath>

namespace speccompile
{
namespace kernels
{

constexpr int32_t kWarpSize = 32;
constexpr int32_t kAttentionWarps = 4;          // slots are dealt round-robin to the warps of a block
constexpr int32_t kPerLane = kMaxHeadDim / kWarpSize;
constexpr int32_t kWriteThreads = 128;

__device__ __forceinline__ int64_t positionOf(TreeAttentionParams const& p, int32_t i)
{
    int64_t const pos = p.positionIdsInt64 ? static_cast<int64_t const*>(p.positionIds)[i]
                                           : static_cast<int32_t const*>(p.positionIds)[i];
    // Out-of-range positions are invalid input; clamping keeps the table reads in bounds.
    return pos < 0 ? 0 : (pos >= p.ropeRows ? p.ropeRows - 1 : pos);
}

// One block per (new token i, kv head h): rotate k, copy v, both into cache slot P + i.
__global__ void writeNewKVKernel(TreeAttentionParams p)
{
    int32_t const i = blockIdx.x;
    int32_t const h = blockIdx.y;
    int32_t const P = p.seqlensK[0] + 1 - p.S;
    int32_t const slot = P + i;
    if (P < 0 || slot >= p.maxSeqLen)
    {
        return; // seqlens_k out of range: write nothing rather than outside the cache
    }
    int32_t const D = p.headDim;
    int32_t const half = D / 2;
    size_t const width = static_cast<size_t>(p.numHeads + 2 * p.kvNumHeads) * D;
    float const* k = p.qkv + i * width + static_cast<size_t>(p.numHeads + h) * D;
    float const* v = k + static_cast<size_t>(p.kvNumHeads) * D;
    float const* c = p.cosTable + positionOf(p, i) * half;
    float const* s = p.sinTable + positionOf(p, i) * half;
    size_t const row = (static_cast<size_t>(h) * p.maxSeqLen + slot) * D;
    for (int32_t t = threadIdx.x; t < half; t += blockDim.x)
    {
        float const x1 = k[t];
        float const x2 = k[t + half];
        p.presentKey[row + t] = x1 * c[t] - x2 * s[t];
        p.presentKey[row + t + half] = x2 * c[t] + x1 * s[t];
    }
    for (int32_t t = threadIdx.x; t < D; t += blockDim.x)
    {
        p.presentValue[row + t] = v[t];
    }
}

// One block per (query token i, head h). Each warp keeps an online softmax (running max m, sum l, weighted V
// sum acc) over its share of the slots; the warps' partial results are merged at the end. A slot whose bias
// is -inf is skipped whole: its K and V are never read, which is most of the cache for a short tree.
__global__ void __launch_bounds__(kAttentionWarps * kWarpSize) attentionKernel(TreeAttentionParams p)
{
    __shared__ float qShared[kMaxHeadDim];
    __shared__ float mShared[kAttentionWarps];
    __shared__ float lShared[kAttentionWarps];
    __shared__ float accShared[kAttentionWarps][kMaxHeadDim];

    int32_t const i = blockIdx.x;
    int32_t const h = blockIdx.y;
    int32_t const D = p.headDim;
    int32_t const half = D / 2;
    int32_t const kvHead = h / (p.numHeads / p.kvNumHeads); // GQA: consecutive q heads share a kv head
    int32_t const slots = min(p.seqlensK[0] + 1, p.maxSeqLen); // P + S

    // rotary on q, with the softmax scale folded in (one multiply per element instead of one per slot)
    size_t const width = static_cast<size_t>(p.numHeads + 2 * p.kvNumHeads) * D;
    float const* q = p.qkv + i * width + static_cast<size_t>(h) * D;
    float const* c = p.cosTable + positionOf(p, i) * half;
    float const* s = p.sinTable + positionOf(p, i) * half;
    for (int32_t t = threadIdx.x; t < half; t += blockDim.x)
    {
        float const x1 = q[t];
        float const x2 = q[t + half];
        qShared[t] = (x1 * c[t] - x2 * s[t]) * p.scale;
        qShared[t + half] = (x2 * c[t] + x1 * s[t]) * p.scale;
    }
    __syncthreads();

    int32_t const lane = threadIdx.x % kWarpSize;
    int32_t const warp = threadIdx.x / kWarpSize;
    float qReg[kPerLane];
    float acc[kPerLane];
#pragma unroll
    for (int32_t e = 0; e < kPerLane; ++e)
    {
        int32_t const t = lane + e * kWarpSize;
        qReg[e] = t < D ? qShared[t] : 0.F;
        acc[e] = 0.F;
    }
    float m = -INFINITY;
    float l = 0.F;
    float const* biasRow = p.bias + static_cast<size_t>(i) * p.maxSeqLen;
    size_t const headBase = static_cast<size_t>(kvHead) * p.maxSeqLen * D;
    for (int32_t j = warp; j < slots; j += kAttentionWarps)
    {
        float const b = biasRow[j];
        if (b == -INFINITY) // the whole warp takes the same branch (one slot per warp), so shuffles stay safe
        {
            continue;
        }
        float const* kRow = p.presentKey + headBase + static_cast<size_t>(j) * D;
        float dot = 0.F;
#pragma unroll
        for (int32_t e = 0; e < kPerLane; ++e)
        {
            int32_t const t = lane + e * kWarpSize;
            if (t < D)
            {
                dot += qReg[e] * kRow[t];
            }
        }
#pragma unroll
        for (int32_t offset = kWarpSize / 2; offset > 0; offset /= 2)
        {
            dot += __shfl_xor_sync(0xffffffffU, dot, offset);
        }
        float const score = dot + b;
        float const mNew = fmaxf(m, score);
        float const correction = expf(m - mNew); // exp(-inf) = 0 at the first visible slot
        float const w = expf(score - mNew);
        l = l * correction + w;
        float const* vRow = p.presentValue + headBase + static_cast<size_t>(j) * D;
#pragma unroll
        for (int32_t e = 0; e < kPerLane; ++e)
        {
            int32_t const t = lane + e * kWarpSize;
            if (t < D)
            {
                acc[e] = acc[e] * correction + w * vRow[t];
            }
        }
        m = mNew;
    }

    if (lane == 0)
    {
        mShared[warp] = m;
        lShared[warp] = l;
    }
#pragma unroll
    for (int32_t e = 0; e < kPerLane; ++e)
    {
        int32_t const t = lane + e * kWarpSize;
        if (t < D)
        {
            accShared[warp][t] = acc[e];
        }
    }
    __syncthreads();

    float mMax = -INFINITY;
    for (int32_t w = 0; w < kAttentionWarps; ++w)
    {
        mMax = fmaxf(mMax, mShared[w]);
    }
    float denominator = 0.F;
    for (int32_t w = 0; w < kAttentionWarps; ++w)
    {
        if (mShared[w] != -INFINITY) // a warp that saw no visible slot contributes nothing
        {
            denominator += lShared[w] * expf(mShared[w] - mMax);
        }
    }
    float* out = p.y + static_cast<size_t>(i) * p.numHeads * D + static_cast<size_t>(h) * D;
    for (int32_t t = threadIdx.x; t < D; t += blockDim.x)
    {
        float numerator = 0.F;
        for (int32_t w = 0; w < kAttentionWarps; ++w)
        {
            if (mShared[w] != -INFINITY)
            {
                numerator += accShared[w][t] * expf(mShared[w] - mMax);
            }
        }
        // A token that sees no slot at all gets 0 (the numpy definition gives NaN); the runtime never asks for
        // one, since every token sees itself.
        out[t] = denominator > 0.F ? numerator / denominator : 0.F;
    }
}

} // namespace kernels
} // namespace speccompile
