"""What a server is started with, and the loaded state a process (or a Ray replica) serves."""
from __future__ import annotations

import dataclasses
import os

from speccompile.runtime.context_cache import DEFAULT_CACHE_BYTES
from speccompile.runtime.generator import Generator
from speccompile.serve.app import ServeState, make_state


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_queue: int = 64
    threads: int | None = None  # onnxruntime intra-op threads per loaded bundle
    device: str = "cpu"  # cpu, cuda, or tensorrt (the runtime's device names)
    shutdown_timeout_s: float = 10.0
    log_level: str = "info"
    context_cache: bool = True  # reuse the K/V of prompt prefixes seen before (runtime/context_cache.py)
    cache_bytes: int = DEFAULT_CACHE_BYTES  # its memory, per loaded bundle
    cache_dir: str | None = None  # its disk tier, across restarts (replicas may share it)


def model_name(bundle_dir: str) -> str:
    """The one model a server offers: the bundle directory's name."""
    return os.path.basename(os.path.normpath(os.path.abspath(bundle_dir)))


def load_state(bundle_dir: str, opts: ServeOptions) -> ServeState:
    gen = Generator.load(bundle_dir, threads=opts.threads, device=opts.device, context_cache=opts.context_cache,
                         cache_bytes=opts.cache_bytes, cache_dir=opts.cache_dir)
    gen.warm_up()  # the first requests should not pay the process's first passes
    return make_state(gen, model_name(bundle_dir), opts.max_queue, opts.api_key, opts.shutdown_timeout_s)
