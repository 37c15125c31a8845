"""The cost model's file (runtime/cost_model.py): one JSON file per bundle, machine, device and thread count in the user's
cache directory, never inside the hashed bundle and never pickled; read back if it parses as a cost model, else
measured again."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os

from speccompile.format.atomic import write_atomically
from speccompile.format.paths import user_cache_dir
from speccompile.runtime.calibration import calibrate
from speccompile.runtime.cost_model import CostModel, machine_key


def _cache_dir() -> str | None:
    """The cost models' cache folder (paths.user_cache_dir); None where there is none: each process measures its
    own."""
    return user_cache_dir("cost")


def _bundle_id(bundle_dir: str) -> str:
    with open(os.path.join(bundle_dir, "manifest.json"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:20]


def cache_path(bundle_dir: str, threads: int | None, device: str = "cpu") -> str | None:
    """The cost model's file: the user cache directory, named after the manifest's hash, the machine, threads
    (None: no cache directory)."""
    key = machine_key(threads, device)
    machine = hashlib.sha256(key["machine"].encode()).hexdigest()[:12]
    folder = _cache_dir()
    return os.path.join(folder, f"{_bundle_id(bundle_dir)}-{machine}-t{key['threads']}.json") if folder else None


def cached_models(bundle_dir: str) -> list[CostModel]:
    """Every cost model measured for this bundle (any machine, any thread count), for `inspect`."""
    folder = _cache_dir()
    try:
        prefix = _bundle_id(bundle_dir)
        names = sorted(n for n in os.listdir(folder) if n.startswith(prefix) and n.endswith(".json")) if folder else []
    except OSError:
        return []
    out = []
    for name in names:
        try:
            with open(os.path.join(folder, name)) as f:
                out.append(CostModel.from_dict(json.load(f)))
        except (OSError, ValueError, RecursionError):
            continue
    return out


def load_cached(bundle_dir: str, threads: int | None, device: str = "cpu") -> CostModel | None:
    """The cached cost model of this bundle on this machine, or None (none yet, or unreadable: recalibrate)."""
    try:
        path = cache_path(bundle_dir, threads, device)
        if path is None:
            return None
        with open(path) as f:
            return CostModel.from_dict(json.load(f))
    except (OSError, ValueError, RecursionError):
        return None


def cached_or_calibrated(bundle_dir: str, target, drafters: dict, threads: int | None, lookup,
                         recalibrate: bool = False, prompt_ids=None) -> CostModel:
    """The cached cost model, or one measured now (the caller holds the engines) and cached for the next load;
    prompt_ids: calibrate()'s."""
    if not recalibrate and (cached := load_cached(bundle_dir, threads, target.device)) is not None:
        return cached
    save(measured := calibrate(target, drafters, threads, lookup, prompt_ids), bundle_dir, threads, target.device)
    return measured


def save(model: CostModel, bundle_dir: str, threads: int | None, device: str = "cpu") -> None:
    with contextlib.suppress(OSError):  # a read-only home, or the bundle moved since it was loaded: it still serves
        if (path := cache_path(bundle_dir, threads, device)) is not None:
            write_atomically(path, lambda f: f.write(json.dumps(model.to_dict(), indent=1).encode()))
