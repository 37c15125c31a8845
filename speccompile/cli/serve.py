"""`speccompile serve`: a bundle behind the OpenAI HTTP API."""
from __future__ import annotations

import click

from speccompile.cli.common import context_cache_options, device_options, runtime_device
from speccompile.cli.errors import errors_to_exit
from speccompile.cli.generate_options import check_cache_options


@click.command()
@click.argument("bundle", type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True)
@click.option("--api-key", default=None, envvar="SPECCOMPILE_API_KEY",
              help="Require 'Authorization: Bearer KEY' (also: $SPECCOMPILE_API_KEY).")
@click.option("--max-queue", default=64, show_default=True, help="Requests in the server at once; past it, 429.")
@click.option("--threads", default=None, type=int, help="onnxruntime intra-op threads (per replica).")
@click.option("--shutdown-timeout", default=10.0, show_default=True, help="Seconds SIGTERM lets requests finish.")
@click.option("--replicas", default=None, type=int, help="Serve N replicas through Ray Serve (the ray extra).")
@click.option("--ray-address", default=None, help="With --replicas: join this Ray cluster (default: a local one).")
@device_options
@context_cache_options
@errors_to_exit
def serve(bundle, replicas, ray_address, device, backend, no_context_cache, **options):
    """Serve BUNDLE over the OpenAI API (/v1/chat/completions, /v1/completions), with /metrics."""
    from speccompile.serve.command import run
    check_cache_options({"no_context_cache": no_context_cache, **options})
    run(bundle, replicas, ray_address, device=runtime_device(device, backend), context_cache=not no_context_cache,
        **options)
