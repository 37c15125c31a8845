"""One server process: load the bundle, serve the app with uvicorn. SIGTERM (or Ctrl-C) closes the listening
socket, lets requests in flight finish for up to the shutdown timeout, cancels the rest, and exits 0."""
from __future__ import annotations

import contextlib
import signal

from speccompile.errors import SpeccompileError
from speccompile.serve.app import ServeState, create_app
from speccompile.serve.options import ServeOptions, load_state

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def uvicorn_server(state: ServeState, opts: ServeOptions, **config):
    """The uvicorn Server for a state (tests run it in a thread); config: more uvicorn.Config settings."""
    import uvicorn
    cfg = uvicorn.Config(create_app(state), host=opts.host, port=opts.port, log_level=opts.log_level,
                         timeout_graceful_shutdown=opts.shutdown_timeout_s, lifespan="on", **config)
    return uvicorn.Server(cfg)


def serve(bundle_dir: str, opts: ServeOptions) -> None:
    """Serve until SIGTERM or Ctrl-C, in this (the main) thread."""
    server = uvicorn_server(load_state(bundle_dir, opts), opts)
    with stop_signals_exit_cleanly():
        server.run()


@contextlib.contextmanager
def stop_signals_exit_cleanly():
    """uvicorn catches SIGTERM / SIGINT while it runs, drains, then raises the signal again for the handler that
    was there before it: make that handler a no-op, so a requested stop ends the process with status 0."""
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run(bundle_dir: str, replicas: int | None, ray_address: str | None, shutdown_timeout: float, **options) -> None:
    """The `serve` command: one process, or with replicas a Ray Serve deployment."""
    opts = ServeOptions(shutdown_timeout_s=shutdown_timeout, **options)
    if replicas is None and ray_address is not None:
        raise SpeccompileError("--ray-address needs --replicas N")
    if replicas is None:
        serve(bundle_dir, opts)
        return
    from speccompile.serve.ray_app import serve_replicas
    serve_replicas(bundle_dir, opts, replicas, ray_address)
