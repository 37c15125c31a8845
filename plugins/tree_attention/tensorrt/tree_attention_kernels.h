// CUDA kernels of speccompile::TreeAttention (fp32). The definition they follow is `reference_numpy` in
// plugins/tree_attention/__init__.py; README.md beside this file says how they are built and what is untested.
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

namespace speccompile
{

// The largest head_dim the attention kernel holds in registers (8 floats per lane of a warp).
constexpr int32_t kMaxHeadDim = 256;

struct TreeAttentionParams
{
    // inputs
    float const* qkv;          // [1, S, (Hq + 2 Hkv) D]: q, then k, then v of each token, before rotary
    float const* pastKey;      // [1, Hkv, LMAX, D]
    float const* pastValue;    // [1, Hkv, LMAX, D]
    int32_t const* seqlensK;   // [1]: committed length P + S - 1 (read on the device: no host sync)
    float const* cosTable;     // [ropeRows, D/2]
    float const* sinTable;     // [ropeRows, D/2]
    void const* positionIds;   // [1, S], int32 or int64 (positionIdsInt64)
    float const* bias;         // [1, 1, S, LMAX], additive
    // outputs
    float* y;                  // [1, S, Hq D]
    float* presentKey;         // [1, Hkv, LMAX, D]; may be the same buffer as pastKey (in-place cache)
    float* presentValue;       // [1, Hkv, LMAX, D]; may be the same buffer as pastValue
    // sizes and attributes
    int32_t S;
    int32_t numHeads;
    int32_t kvNumHeads;
    int32_t headDim;
    int32_t maxSeqLen;         // LMAX: the cache's slots
    int32_t ropeRows;          // rows of the rotary tables (positions are clamped to them)
    float scale;               // softmax scale, usually 1/sqrt(D)
    bool positionIdsInt64;
};

// Enqueue the op on `stream`: (1) the past cache copied to the present one when they are distinct buffers,
// (2) the S new K rows (rotated) and V rows written to cache slots [P, P+S), (3) attention of each (query
// token, head) over slots [0, P+S) with the additive bias. Returns the first CUDA error, cudaSuccess otherwise.
cudaError_t launchTreeAttention(TreeAttentionParams const& p, cudaStream_t stream);

} // namespace speccompile
