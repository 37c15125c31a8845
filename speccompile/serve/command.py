"""The `serve` command's entry: refuse clearly when the serve extra is missing, before importing what needs it."""
from __future__ import annotations

import importlib.util

from speccompile.errors import SpeccompileError

SERVE_DEPENDENCIES = ("fastapi", "uvicorn", "prometheus_client")


def run(bundle_dir: str, replicas: int | None, ray_address: str | None, **options) -> None:
    missing = [m for m in SERVE_DEPENDENCIES if importlib.util.find_spec(m) is None]
    if missing:
        raise SpeccompileError(f"serve needs {', '.join(missing)}, not installed: pip install 'speccompile[serve]'")
    from speccompile.serve.server import run as serve
    serve(bundle_dir, replicas, ray_address, **options)
