"""The one dependency pyproject.toml cannot state: which onnxruntime wheel. `onnxruntime` (CPU) and
`onnxruntime-gpu` install the same `onnxruntime` module and must never both be installed, and an extra can add a
dependency but never replace one. So the wheel is chosen when the package is installed:

    pip install -e .                                          # CPU: onnxruntime
    SPECCOMPILE_ONNXRUNTIME=gpu pip install -e ".[build]"     # GPU: onnxruntime-gpu with its CUDA and cuDNN wheels

Everything else is declared in pyproject.toml."""
import os

from setuptools import setup

# CPU: the batched graph's attention takes each sequence's query rows from 1.32 on; GPU (no batched graph there):
# the oldest release the device path has run on
ONNXRUNTIME = {"cpu": "onnxruntime>=1.32", "gpu": "onnxruntime-gpu[cuda,cudnn]>=1.31"}
choice = os.environ.get("SPECCOMPILE_ONNXRUNTIME", "cpu")
if choice not in ONNXRUNTIME:
    raise SystemExit(f"SPECCOMPILE_ONNXRUNTIME={choice!r}: choose cpu or gpu")

setup(install_requires=[
    ONNXRUNTIME[choice],
    "numpy>=1.26",
    "tokenizers>=0.20",
    "click>=8.1",
    "jinja2>=3.1",
    "jsonschema>=4.18",  # the bundle manifest's schema, checked on every load
])
