"""What several commands share: progress on stderr, the device and context-cache options, the runtime's device."""
from __future__ import annotations

import click

from speccompile.cli.generate_options import CACHE_BYTES


def progress(msg: str) -> None:
    click.echo(msg, err=True)


def device_options(command):
    """--device and --backend, as generate and serve take them."""
    backend = click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime",
                           show_default=True,
                           help="tensorrt: the bundle's TensorRT engines (build --backend tensorrt) on the GPU.")
    command = backend(command)
    return click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
                        help="cuda: onnxruntime's CUDA provider, the KV caches in GPU memory (docs/gpu.md).")(command)


def context_cache_options(command):
    """--no-context-cache, --cache-bytes and --cache-dir, as generate and serve take them."""
    for option in reversed([
            click.option("--no-context-cache", is_flag=True,
                         help="Do not reuse the K/V of prompt prefixes seen before."),
            click.option("--cache-bytes", default=CACHE_BYTES, show_default=True, help="Memory for the context cache."),
            click.option("--cache-dir", type=click.Path(), default=None,
                         help="Also keep the context cache here, across runs (replicas may share it).")]):
        command = option(command)
    return command


def runtime_device(device: str, backend: str) -> str:
    """The runtime's device name: cpu, cuda, or tensorrt (TensorRT engines, on the GPU)."""
    return "tensorrt" if backend == "tensorrt" else device
