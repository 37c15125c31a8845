"""Where the TreeAttention TensorRT plugin library is, loading it into TensorRT's registry, and whether a CUDA GPU
is there: shared by the compiler (build --backend tensorrt) and the runtime (generate --backend tensorrt). The
library is always this installation's own build (or $SPECCOMPILE_TRT_PLUGIN), never a copy inside a bundle: a bundle is data."""
from __future__ import annotations

import ctypes
import os

from speccompile.errors import SpeccompileError

OP_TYPE = "TreeAttention"
PLUGIN_ENV = "SPECCOMPILE_TRT_PLUGIN"  # the plugin library to use, if not the one built in the source tree
PLUGIN_SOURCE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tensorrt")
PLUGIN_LIBRARY = os.path.join(PLUGIN_SOURCE_DIR, "build", "libspeccompile_trt_plugins.so")
BUILD_PLUGIN = (f"cmake -S {PLUGIN_SOURCE_DIR} -B {os.path.dirname(PLUGIN_LIBRARY)} -DTENSORRT_ROOT=<TensorRT dir> "
                f"&& cmake --build {os.path.dirname(PLUGIN_LIBRARY)} -j")

_loaded_libraries = {}  # path -> handle: a library registers its creators once per process


def plugin_library_path() -> str:
    return os.environ.get(PLUGIN_ENV) or PLUGIN_LIBRARY


def load_plugin(trt, library: str) -> None:
    """Register the TreeAttention creator from `library`, unless one is registered already."""
    registry = trt.get_plugin_registry()
    if registry.get_creator(OP_TYPE, "1", "") is not None:
        return
    handle = registry.load_library(library)
    if handle is None:
        raise SpeccompileError(f"TensorRT could not load the plugin library {library}")
    _loaded_libraries[library] = handle


def cuda_gpu() -> tuple[str | None, str]:
    """(name of CUDA device 0, "") or (None, why there is none). Asks the NVIDIA driver (libcuda) directly, so
    it needs no CUDA Python package and works before TensorRT is even installed."""
    lib = None
    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if lib is None:
        return None, "no NVIDIA driver: libcuda.so.1 not found"
    rc = lib.cuInit(0)
    if rc != 0:
        return None, f"the NVIDIA driver found no usable GPU (cuInit error {rc})"
    count = ctypes.c_int(0)
    if lib.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
        return None, "the NVIDIA driver reports no CUDA device"
    device, name = ctypes.c_int(0), ctypes.create_string_buffer(256)
    if lib.cuDeviceGet(ctypes.byref(device), 0) != 0 or lib.cuDeviceGetName(name, 256, device) != 0:
        return "CUDA device 0", ""
    return name.value.decode(errors="replace"), ""
