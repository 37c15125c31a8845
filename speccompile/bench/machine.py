"""What a result records about where it ran: the machine (and its memory bandwidth), versions, the bundle."""
from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime
import tokenizers

from speccompile import __version__
from speccompile.errors import SpeccompileError
from speccompile.format.summary import tree_label
from speccompile.runtime.machine_id import cpu_identity

BANDWIDTH_ARRAY_MIB = 256


def copy_bandwidth_gbps(threads: int = 1, mib: int = BANDWIDTH_ARRAY_MIB, tries: int = 5) -> float:
    """Best of a few copies of a large array, split over `threads` (numpy releases the GIL while it copies); bytes
    read + bytes written over time, as STREAM's copy counts them."""
    src = np.ones(mib * 2**20 // 8)
    dst = np.empty_like(src)
    bounds = np.linspace(0, len(src), threads + 1).astype(int)
    chunks = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(tries):
            t0 = time.perf_counter()
            list(pool.map(lambda chunk: np.copyto(dst[chunk], src[chunk]), chunks))
            best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best / 1e9


def measure_machine_bandwidth(threads: int) -> float:
    """In a child process: the probe's 512 MiB of arrays must not count in this process's peak memory."""
    code = f"from speccompile.bench.machine import copy_bandwidth_gbps; print(copy_bandwidth_gbps({int(threads)}))"
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if probe.returncode != 0:
        raise SpeccompileError(f"the memory bandwidth probe failed: {probe.stderr.strip()[-500:]}")
    return float(probe.stdout)


def peak_rss_mib() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


# instruction sets that pick onnxruntime's CPU kernels: two machines that differ in them run other kernels, whose
# relative costs (and sums) differ
def machine_info(bandwidth_gbps: float, loadavg: float, one_row_pad: bool | None = None) -> dict:
    """one_row_pad: whether the target runs one-token steps with a pad row on this machine (runtime/row_parity)."""
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu": cpu_identity(), "one_row_pad": one_row_pad, "cpu_count": os.cpu_count(),
            "loadavg_1min_before": loadavg, "memory_bandwidth_gbps": bandwidth_gbps}


def versions() -> dict:
    out = {"speccompile": __version__, "python": platform.python_version(), "numpy": np.__version__,
           "onnxruntime": onnxruntime.__version__, "tokenizers": tokenizers.__version__}
    for module in ("torch", "transformers"):  # only when --compare-transformers imported them
        if module in sys.modules:
            out[module] = sys.modules[module].__version__
    return out


def bundle_summary(bundle_dir: str, gen) -> dict:
    m = gen.manifest
    cfg = m["models"]["target"]["config"]
    return {"path": os.path.abspath(bundle_dir), "source": m["source"], "max_seq_len": m["max_seq_len"],
            "target": {"model_type": cfg["model_type"], "num_layers": m["models"]["target"]["num_layers"],
                       "hidden_size": cfg["hidden_size"], "vocab_size": cfg["vocab_size"],
                       "weight_bytes": gen.target.weight_bytes,
                       "weights": (m.get("quantization") or {}).get("option"), "dtype": m.get("dtype", "float32"),
                       "kv_dtype": m["models"]["target"].get("kv_cache", {}).get("dtype", m.get("dtype", "float32"))},
            "drafters": [_drafter_summary(d) for d in m["drafters"]]}


def _drafter_summary(d: dict) -> dict:
    """A manifest drafter as the result records it; one with a tree drafts it (as inspect spells it): its num_draft
    is only what --num-draft would replace the tree with."""
    tree = {"tree": tree_label(d["tree"])} if d.get("tree") else {}
    return {**{k: d[k] for k in ("name", "kind", "num_draft", "model") if k in d}, **tree}
