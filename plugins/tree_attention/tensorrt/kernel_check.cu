// The TreeAttention kernels on a real GPU without TensorRT, for tests/test_tensorrt.py: the same C entry point as
// emulator/emulator.cpp (host arrays in, host arrays out), so one test checks both against `reference_numpy`.
// Every buffer is copied to the device, launchTreeAttention runs on the default stream, the outputs come back.
//
//   nvcc -std=c++17 -O2 -shared -Xcompiler -fPIC kernel_check.cu tree_attention_kernels.cu
//        -o libtree_attention_check.so   (one command)
#include "tree_attention_kernels.h"

#include <cuda_runtime_api.h>
#include <vector>

namespace
{

// Device copies of the inputs, freed together; the first CUDA error is kept.
struct DeviceBuffers
{
    std::vector<void*> owned;
    cudaError_t error = cudaSuccess;

    void* copyIn(void const* host, size_t bytes)
    {
        void* dev = nullptr;
        if (error == cudaSuccess)
        {
            error = cudaMalloc(&dev, bytes);
        }
        if (error == cudaSuccess)
        {
            owned.push_back(dev);
            error = cudaMemcpy(dev, host, bytes, cudaMemcpyHostToDevice);
        }
        return dev;
    }

    void copyOut(void* host, void const* dev, size_t bytes)
    {
        if (error == cudaSuccess)
        {
            error = cudaMemcpy(host, dev, bytes, cudaMemcpyDeviceToHost);
        }
    }

    ~DeviceBuffers()
    {
        for (void* p : owned)
        {
            cudaFree(p);
        }
    }
};

} // namespace

extern "C" int speccompile_tree_attention_cuda(float const* qkv, float const* pastKey, float const* pastValue,
    int32_t const* seqlensK, float const* cosTable, float const* sinTable, void const* positionIds,
    int positionIdsInt64, float const* bias, float* y, float* presentKey, float* presentValue, int S, int numHeads,
    int kvNumHeads, int headDim, int maxSeqLen, int ropeRows, float scale)
{
    using namespace speccompile;
    size_t const f = sizeof(float);
    size_t const cacheBytes = static_cast<size_t>(kvNumHeads) * maxSeqLen * headDim * f;
    size_t const tableBytes = static_cast<size_t>(ropeRows) * (headDim / 2) * f;
    DeviceBuffers d;
    auto* dQkv = static_cast<float*>(d.copyIn(qkv, static_cast<size_t>(S) * (numHeads + 2 * kvNumHeads) * headDim * f));
    bool const inPlace = presentKey == pastKey;
    auto* dPastKey = static_cast<float*>(d.copyIn(pastKey, cacheBytes));
    auto* dPastValue = static_cast<float*>(d.copyIn(pastValue, cacheBytes));
    // a separate present cache starts as the caller's (poisoned) buffer, so rows the kernels skip would show
    auto* dPresentKey = inPlace ? dPastKey : static_cast<float*>(d.copyIn(presentKey, cacheBytes));
    auto* dPresentValue = inPlace ? dPastValue : static_cast<float*>(d.copyIn(presentValue, cacheBytes));
    auto* dSeqlens = static_cast<int32_t*>(d.copyIn(seqlensK, sizeof(int32_t)));
    auto* dCos = static_cast<float*>(d.copyIn(cosTable, tableBytes));
    auto* dSin = static_cast<float*>(d.copyIn(sinTable, tableBytes));
    void* dPos = d.copyIn(positionIds, static_cast<size_t>(S) * (positionIdsInt64 ? 8 : 4));
    auto* dBias = static_cast<float*>(d.copyIn(bias, static_cast<size_t>(S) * maxSeqLen * f));
    size_t const yBytes = static_cast<size_t>(S) * numHeads * headDim * f;
    std::vector<float> poison(yBytes / f, -7.0f);
    auto* dY = static_cast<float*>(d.copyIn(poison.data(), yBytes));
    if (d.error != cudaSuccess)
    {
        return static_cast<int>(d.error);
    }
    TreeAttentionParams p{dQkv, dPastKey, dPastValue, dSeqlens, dCos, dSin, dPos, dBias, dY, dPresentKey,
        dPresentValue, S, numHeads, kvNumHeads, headDim, maxSeqLen, ropeRows, scale, positionIdsInt64 != 0};
    d.error = launchTreeAttention(p, nullptr);
    if (d.error == cudaSuccess)
    {
        d.error = cudaDeviceSynchronize();
    }
    d.copyOut(y, dY, yBytes);
    d.copyOut(presentKey, dPresentKey, cacheBytes);
    d.copyOut(presentValue, dPresentValue, cacheBytes);
    return static_cast<int>(d.error);
}
