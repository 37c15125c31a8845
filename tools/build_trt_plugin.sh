#!/usr/bin/env bash
# Build the TreeAttention TensorRT plugin (plugins/tree_attention/tensorrt) with whatever this machine has:
#
#   bash tools/build_trt_plugin.sh [PYTHON]
#
# nvcc: $CUDA_HOME, /usr/local/cuda, the PATH, else the nvidia-cuda-nvcc-cu12 / nvidia-cuda-runtime-cu12 wheels of
# PYTHON's environment (merged into one toolkit directory, since CMake wants nvcc, the headers and libcudart in one
# place). TensorRT's C++ headers: $TENSORRT_ROOT, the system, /usr/local, /opt (TensorRT's pip wheels ship none).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
SRC=plugins/tree_attention/tensorrt
BUILD=$SRC/build
SITE=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

NVCC=""
for c in ${CUDA_HOME:+$CUDA_HOME/bin/nvcc} /usr/local/cuda/bin/nvcc $(command -v nvcc || true); do
  [ -x "$c" ] && { NVCC=$c; break; }
done
if [ -z "$NVCC" ] && [ -x "$SITE/nvidia/cuda_nvcc/bin/nvcc" ]; then
  TK=$BUILD/cuda-toolkit  # the wheels' pieces side by side: bin/nvvm from nvcc's wheel, headers and cudart beside
  rm -rf "$TK" && mkdir -p "$TK/include" "$TK/lib64"
  for d in bin nvvm; do ln -s "$SITE/nvidia/cuda_nvcc/$d" "$TK/$d"; done
  for inc in "$SITE"/nvidia/cuda_nvcc/include "$SITE"/nvidia/cuda_runtime/include; do
    [ -d "$inc" ] && cp -rs "$inc"/. "$TK/include/" 2>/dev/null || true
  done
  for so in "$SITE"/nvidia/cuda_runtime/lib/libcudart.so*; do ln -sf "$so" "$TK/lib64/"; done
  ln -sf "$(ls "$SITE"/nvidia/cuda_runtime/lib/libcudart.so.* | head -n1)" "$TK/lib64/libcudart.so"
  NVCC=$TK/bin/nvcc
fi
[ -n "$NVCC" ] || { echo "no nvcc: install a CUDA toolkit or pip install nvidia-cuda-nvcc-cu12"; exit 1; }
CUDA_ROOT=$(cd "$(dirname "$NVCC")/.." && pwd)

HDR=$( (ls ${TENSORRT_ROOT:-/nonexistent}/include/NvInferRuntime.h /usr/include/x86_64-linux-gnu/NvInferRuntime.h \
          /usr/include/NvInferRuntime.h 2>/dev/null || true; find /usr/local /opt -maxdepth 6 -name NvInferRuntime.h \
          2>/dev/null || true) | head -n1)
[ -n "$HDR" ] || { echo "no TensorRT C++ headers (NvInferRuntime.h): TensorRT's pip wheels ship none; set TENSORRT_ROOT to a TensorRT SDK"; exit 1; }
TRT_ROOT=$(dirname "$(dirname "$HDR")")
echo "nvcc: $NVCC; TensorRT headers: $HDR"

CMAKE=$(command -v cmake || echo "$(dirname "$PY")/cmake")
"$CMAKE" -S "$SRC" -B "$BUILD" -DTENSORRT_ROOT="$TRT_ROOT" -DCMAKE_CUDA_COMPILER="$NVCC" \
         -DCUDAToolkit_ROOT="$CUDA_ROOT" -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHS:-native}
"$CMAKE" --build "$BUILD" -j "$(nproc)"
ls -l "$BUILD"/*.so
