"""Which CPU this is, as far as kernel costs go: its model name and the instruction sets that pick onnxruntime's
kernels. The cost model keys its cache by it; bench records it beside every result (the CI gate compares speedups
only between results of the same CPU)."""
from __future__ import annotations

import platform

KERNEL_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "sve")


def cpu_identity() -> dict:
    """The CPU's model name and the instruction sets of KERNEL_FLAGS it has (Linux; elsewhere what platform
    tells)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    model = value.strip()
                elif key.strip() in ("flags", "Features"):
                    flags = set(value.split())
                if key.strip() == "" and flags:  # the first processor's block is enough
                    break
    except OSError:
        pass
    return {"model": model, "kernel_flags": [f for f in KERNEL_FLAGS if f in flags]}
