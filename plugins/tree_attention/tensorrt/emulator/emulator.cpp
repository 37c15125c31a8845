// A CPU emulator of the TreeAttention kernels, for tests on machines without a GPU: the kernels' own source
// (../tree_attention_kernels.cuh) compiled as C++, each CUDA thread of a block a std::thread, with barriers for
// __syncthreads and for the warp shuffles. Blocks run one after another. It checks the kernels' arithmetic and
// indexing (rotary, GQA mapping, cache slots, online softmax, warp merge) against the numpy definition; it says
// nothing about races between blocks, memory-model subtleties or performance on a real GPU.
//
//   g++ -std=c++20 -O2 -shared -fPIC -pthread -I emulator emulator/emulator.cpp -o libtree_attention_emulator.so
#include "cuda_runtime_api.h"

#include "../tree_attention_kernels.cuh"

#include <barrier>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

namespace emu
{
thread_local dim3 tThreadIdx;
thread_local dim3 tBlockIdx;
dim3 gBlockDim;

namespace
{
constexpr unsigned kWarp = 32;

struct Warp
{
    std::barrier<> barrier{kWarp};
    float slots[kWarp];
};

std::unique_ptr<std::barrier<>> gBlockBarrier;
std::vector<std::unique_ptr<Warp>> gWarps;
} // namespace

void syncthreads()
{
    gBlockBarrier->arrive_and_wait();
}

float shflXor(float value, int laneMask)
{
    Warp& w = *gWarps[tThreadIdx.x / kWarp];
    unsigned const lane = tThreadIdx.x % kWarp;
    w.slots[lane] = value;
    w.barrier.arrive_and_wait(); // every lane has written
    float const other = w.slots[lane ^ static_cast<unsigned>(laneMask)];
    w.barrier.arrive_and_wait(); // every lane has read, before any writes again
    return other;
}

template <typename Kernel>
void launch(Kernel kernel, dim3 grid, unsigned threads, speccompile::TreeAttentionParams const& p)
{
    gBlockDim = dim3{threads, 1, 1};
    for (unsigned by = 0; by < grid.y; ++by)
    {
        for (unsigned bx = 0; bx < grid.x; ++bx)
        {
            gBlockBarrier = std::make_unique<std::barrier<>>(threads);
            gWarps.clear();
            for (unsigned w = 0; w < threads / kWarp; ++w)
            {
                gWarps.push_back(std::make_unique<Warp>());
            }
            std::vector<std::thread> pool;
            for (unsigned t = 0; t < threads; ++t)
            {
                pool.emplace_back([=, &p] {
                    tThreadIdx = dim3{t, 0, 0};
                    tBlockIdx = dim3{bx, by, 0};
                    kernel(p);
                });
            }
            for (auto& th : pool)
            {
                th.join();
            }
        }
    }
}
} // namespace emu

// What launchTreeAttention (tree_attention_kernels.cu) enqueues, run on the CPU. Returns 0.
extern "C" int speccompile_tree_attention_emulate(float const* qkv, float const* pastKey, float const* pastValue,
    int32_t const* seqlensK, float const* cosTable, float const* sinTable, void const* positionIds,
    int positionIdsInt64,
    float const* bias, float* y, float* presentKey, float* presentValue, int S, int numHeads, int kvNumHeads,
    int headDim, int maxSeqLen, int ropeRows, float scale)
{
    using namespace speccompile;
    TreeAttentionParams p{qkv, pastKey, pastValue, seqlensK, cosTable, sinTable, positionIds, bias, y, presentKey,
        presentValue, S, numHeads, kvNumHeads, headDim, maxSeqLen, ropeRows, scale, positionIdsInt64 != 0};
    size_t const cacheBytes = static_cast<size_t>(kvNumHeads) * maxSeqLen * headDim * sizeof(float);
    if (presentKey != pastKey)
    {
        std::memcpy(presentKey, pastKey, cacheBytes);
    }
    if (presentValue != pastValue)
    {
        std::memcpy(presentValue, pastValue, cacheBytes);
    }
    if (S == 0)
    {
        return 0;
    }
    emu::launch(kernels::writeNewKVKernel, dim3{static_cast<unsigned>(S), static_cast<unsigned>(kvNumHeads), 1},
        kernels::kWriteThreads, p);
    emu::launch(kernels::attentionKernel, dim3{static_cast<unsigned>(S), static_cast<unsigned>(numHeads), 1},
        kernels::kAttentionWarps * kernels::kWarpSize, p);
    return 0;
}
