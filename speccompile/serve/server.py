"""One server process: load the bundle, serve the app with uvicorn. SIGTERM (or Ctrl-C) closes the listening
socket, lets requests in flight finish for up to the shutdown timeout, cancels the rest, and exits 0."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import socket
import threading

from speccompile.errors import SpeccompileError
from speccompile.serve.app import ServeState, create_app
from speccompile.serve.options import ServeOptions, load_state

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class CutOffWithoutTraceback(logging.Filter):
    """A request that outlasts the shutdown timeout is cut off, as documented: uvicorn says so in one line ("Cancel
    N running task(s), timeout graceful shutdown exceeded"), then logs each cut request's CancelledError with a
    traceback ("Exception in ASGI application"), which reads like a crash. Those records are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError))


CUT_OFF_WITHOUT_TRACEBACK = CutOffWithoutTraceback()


def uvicorn_server(state: ServeState, opts: ServeOptions, **config):
    """The uvicorn Server for a state (tests run it in a thread); config: more uvicorn.Config settings."""
    import uvicorn

    class StoppingServer(uvicorn.Server):
        async def shutdown(self, sockets=None):
            # admitting stops as the drain begins, not after it (the app's lifespan ends only then): a request the
            # timeout cuts off is then known as such, and answers an error object (app._respond)
            state.runner.stop_admitting()
            await super().shutdown(sockets)

        async def startup(self, sockets=None):
            await super().startup(sockets)
            if sockets and self.started:  # uvicorn names the address only of sockets it bound itself
                for sock in sockets:
                    logging.getLogger("uvicorn.error").info("Uvicorn running on %s (Press CTRL+C to quit)",
                                                            listening_url(sock))
    cfg = uvicorn.Config(create_app(state), host=opts.host, port=opts.port, log_level=opts.log_level,
                         timeout_graceful_shutdown=opts.shutdown_timeout_s, lifespan="on", **config)
    logging.getLogger("uvicorn.error").addFilter(CUT_OFF_WITHOUT_TRACEBACK)  # after Config set its logging up
    return StoppingServer(cfg)


class StoppedWhileLoading(BaseException):
    """SIGTERM or Ctrl-C before the server runs. A BaseException, as KeyboardInterrupt is: the loading code's
    handlers of failures must not take it for one."""


def serve(bundle_dir: str, opts: ServeOptions) -> None:
    """Serve until SIGTERM or Ctrl-C, in this (the main) thread. The address is taken before the bundle loads:
    a port in use or a host that does not resolve is one error, at once."""
    sock = listening_socket(opts.host, opts.port)
    try:
        with stop_signals_exit_cleanly() as serving:
            server = uvicorn_server(load_state(bundle_dir, opts), opts)
            serving.set()
            server.run(sockets=[sock])
    except StoppedWhileLoading:
        pass  # nothing served yet: the load is abandoned, and the process exits 0 as a stop while serving does
    finally:
        sock.close()


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (uvicorn listens on it)."""
    if not 0 <= port <= 65535:
        raise SpeccompileError(f"--port {port}: must be 0..65535")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:  # socket.gaierror too: a host that does not resolve
        raise SpeccompileError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise SpeccompileError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def listening_url(sock: socket.socket) -> str:
    """Where clients reach a listening socket: its bound address, so --port 0 shows the port the system chose."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@contextlib.contextmanager
def stop_signals_exit_cleanly():
    """A stop while the bundle loads abandons the load (StoppedWhileLoading, raised in this thread). Once the
    yielded event is set, uvicorn catches SIGTERM / SIGINT while it runs, drains, then raises the signal again for
    the handler that was there before it: a no-op by then. A requested stop ends the process with status 0."""
    serving = threading.Event()

    def stop(*_):
        if not serving.is_set():
            raise StoppedWhileLoading

    previous = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
    try:
        yield serving
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run(bundle_dir: str, replicas: int | None, ray_address: str | None, shutdown_timeout: float, **options) -> None:
    """The `serve` command: one process, or with replicas a Ray Serve deployment."""
    opts = ServeOptions(shutdown_timeout_s=shutdown_timeout, **options)
    if not 0 <= shutdown_timeout < math.inf:
        raise SpeccompileError(f"--shutdown-timeout {shutdown_timeout}: must be a number of seconds, at least 0")
    if replicas is None and ray_address is not None:
        raise SpeccompileError("--ray-address needs --replicas N")
    if opts.api_key is not None and not opts.api_key.strip():  # `--api-key "$KEY"` with KEY unset or blank
        raise SpeccompileError("--api-key is empty, which would let every client in: give the key clients must send, "
                               "or leave --api-key out to serve without one")
    if opts.api_key is not None and opts.api_key != opts.api_key.strip():  # HTTP strips a header value's ends
        raise SpeccompileError("--api-key starts or ends with whitespace, which no client can send in its "
                               "Authorization header: give the key without it")
    if replicas is None:
        serve(bundle_dir, opts)
        return
    from speccompile.serve.ray_app import serve_replicas
    serve_replicas(bundle_dir, opts, replicas, ray_address)
