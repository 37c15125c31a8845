// Just enough of CUDA for ../tree_attention_kernels.cuh to compile as plain C++ and run on CPU threads (see
// emulator.cpp). Found first on the emulator's include path, so it stands in for the real header.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

using cudaStream_t = void*;
enum cudaError_t
{
    cudaSuccess = 0
};

struct dim3
{
    unsigned x = 1, y = 1, z = 1;
};

namespace emu
{
extern thread_local dim3 tThreadIdx;
extern thread_local dim3 tBlockIdx;
extern dim3 gBlockDim;
void syncthreads();
float shflXor(float value, int laneMask);
} // namespace emu

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static // one block runs at a time, so a static is exactly one block's shared memory
#define threadIdx (::emu::tThreadIdx)
#define blockIdx (::emu::tBlockIdx)
#define blockDim (::emu::gBlockDim)
#define __syncthreads() ::emu::syncthreads()

inline float __shfl_xor_sync(unsigned /*mask*/, float value, int laneMask)
{
    return emu::shflXor(value, laneMask);
}

using std::min;
