"""The same app as a Ray Serve deployment: N replicas, each loading the bundle, behind Ray's HTTP proxy.

With no address Ray starts a local instance; with one (`auto`, `ray://HOST:10001`, `HOST:6379`) the process joins
that cluster and the replicas are placed on its nodes, each reading the bundle at the same path (a shared file
system, or the bundle copied to every node), with speccompile installed in every node's Python.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import threading

from speccompile.errors import SpeccompileError
from speccompile.serve.options import ServeOptions, load_state
from speccompile.serve.runner import RETRY_AFTER_S

APP_NAME = "speccompile"


def _replica_class():
    """The deployment class, built on demand so that importing this module needs no Ray."""
    from ray import serve

    @serve.ingress()
    class SpeccompileReplica:
        def __init__(self, bundle_dir: str, opts: ServeOptions):
            self.state = load_state(bundle_dir, opts)

        def __serve_build_asgi_app__(self):
            from speccompile.serve.app import create_app
            return create_app(self.state)

    return SpeccompileReplica


def _ray():
    try:
        import ray
        from ray import serve
    except ImportError:
        raise SpeccompileError("--replicas needs Ray Serve: pip install 'speccompile[ray]'") from None
    return ray, serve


def start_ray(opts: ServeOptions, ray_address: str | None = None) -> None:
    """Join the cluster at ray_address, or start a local Ray instance."""
    ray, _ = _ray()
    # "local" starts a fresh instance even where an earlier `ray start` left its address behind
    ray.init(address=ray_address or "local", ignore_reinit_error=True, log_to_driver=False)


def deploy(bundle_dir: str, opts: ServeOptions, replicas: int) -> None:
    """Run `replicas` replicas of the app behind Ray's proxy on opts.host:opts.port (Ray started already)."""
    _, serve = _ray()
    bundle_dir = os.path.abspath(bundle_dir)  # each replica opens it by this path, on whichever node it runs
    # a replica runs the threads Ray reserves cores for (onnxruntime's own default, every core, would have N
    # replicas of one machine fight over its cores)
    opts = dataclasses.replace(opts, threads=opts.threads or 1)
    serve.start(http_options={"host": opts.host, "port": opts.port})
    deployment = serve.deployment(_replica_class(), name=APP_NAME, num_replicas=replicas,
                                  # each replica admits --max-queue (past it, its 429); past another --max-queue
                                  # waiting in Ray's router, Ray itself refuses
                                  max_ongoing_requests=opts.max_queue, max_queued_requests=opts.max_queue,
                                  graceful_shutdown_timeout_s=opts.shutdown_timeout_s,
                                  ray_actor_options=_actor_resources(opts), **_backpressure())
    serve.run(deployment.bind(bundle_dir, opts), name=APP_NAME, route_prefix="/", blocking=False)


def _actor_resources(opts: ServeOptions) -> dict:
    """What a replica asks Ray for: its threads' cores, and a GPU where it runs on one."""
    return {"num_cpus": opts.threads, **({"num_gpus": 1} if opts.device != "cpu" else {})}


def _backpressure() -> dict:
    """Ray's refusal past its queue as a 429 with Retry-After, as the server's own (Ray versions that can; older
    ones answer 503)."""
    try:
        from ray.serve.config import BackpressureConfig
    except ImportError:
        return {}
    return {"backpressure_config": BackpressureConfig(status_code=429, retry_after_s=RETRY_AFTER_S)}


def serve_replicas(bundle_dir: str, opts: ServeOptions, replicas: int, ray_address: str | None = None) -> None:
    """Deploy, then wait for SIGTERM or Ctrl-C; then remove the deployment (replicas drain for up to the
    shutdown timeout) and leave Ray (a local instance stops with it)."""
    if replicas < 1:
        raise SpeccompileError(f"--replicas {replicas}: must be at least 1")
    stop = threading.Event()
    try:
        start_ray(opts, ray_address)
        # after ray.init, which installs its own (aborting) SIGTERM handler in this process
        previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
        deploy(bundle_dir, opts, replicas)
        while not stop.wait(0.5):  # short waits: the signal handler runs between them
            pass
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    finally:
        shutdown(joined=ray_address is not None)


def shutdown(joined: bool) -> None:
    """Remove this app; on a local instance stop Serve and Ray too. On a joined cluster only this app goes: other
    Serve applications there keep running."""
    try:
        import ray
        from ray import serve
    except ImportError:
        return
    if not ray.is_initialized():
        return
    if joined:
        serve.delete(APP_NAME)
    else:
        serve.shutdown()
    ray.shutdown()
