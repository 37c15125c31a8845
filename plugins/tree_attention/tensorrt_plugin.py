"""Where the TreeAttention TensorRT plugin library is, and loading it into TensorRT's registry: shared by the
compiler (build --backend tensorrt) and the runtime (generate --backend tensorrt). The library is always this
installation's own build (or $SPECCOMPILE_TRT_PLUGIN), never a copy inside a bundle: a bundle is data."""
from __future__ import annotations

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
