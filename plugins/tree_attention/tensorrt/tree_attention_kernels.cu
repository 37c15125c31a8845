// CUDA kernels of speccompile::TreeAttention, fp32, mirroring `reference_numpy` in ../__init__.py:
//
//   q, k, v   = split(qkv) per head; q and k rotated (half-split rotary) at position_ids
//   cache     = past with the S new (k, v) rows at slots [P, P+S), P = seqlens_k + 1 - S
//   y[i, h]   = softmax_j(scale * q[i, h] . K[kv(h), j] + bias[i, j]) . V[kv(h), j]  over slots j in [0, P+S)
//
// Two kernels on one stream, because a query token reads the K/V rows of the other tokens of its step (its
// ancestors): the first writes all S new rows into the cache, the second (stream-ordered after it) attends over
// the cache alone. Checked against the definition on a GPU by kernel_check.cu (see README.md).
#include "tree_attention_kernels.cuh"

namespace speccompile
{

using kernels::kAttentionWarps;
using kernels::kWarpSize;
using kernels::kWriteThreads;

cudaError_t launchTreeAttention(TreeAttentionParams const& p, cudaStream_t stream)
{
    size_t const cacheBytes = static_cast<size_t>(p.kvNumHeads) * p.maxSeqLen * p.headDim * sizeof(float);
    // The runtime binds past and present to one buffer, so the cache is updated in place and nothing is copied.
    // Distinct buffers are still correct: the present cache starts as a copy of the past one.
    if (p.presentKey != p.pastKey)
    {
        cudaError_t const e = cudaMemcpyAsync(p.presentKey, p.pastKey, cacheBytes, cudaMemcpyDeviceToDevice, stream);
        if (e != cudaSuccess)
        {
            return e;
        }
    }
    if (p.presentValue != p.pastValue)
    {
        cudaError_t const e
            = cudaMemcpyAsync(p.presentValue, p.pastValue, cacheBytes, cudaMemcpyDeviceToDevice, stream);
        if (e != cudaSuccess)
        {
            return e;
        }
    }
    if (p.S == 0)
    {
        return cudaSuccess;
    }
    kernels::writeNewKVKernel<<<dim3(p.S, p.kvNumHeads), kWriteThreads, 0, stream>>>(p);
    kernels::attentionKernel<<<dim3(p.S, p.numHeads), kAttentionWarps * kWarpSize, 0, stream>>>(p);
    return cudaGetLastError();
}

} // namespace speccompile
