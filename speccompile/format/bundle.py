"""The bundle: one directory, one manifest — the only contract between `speccompile build` and the runtime.

Layout:
  manifest.json        format version, source, models (graphs, weights, configs, KV layout, signatures),
                       drafters, tokenizer, and the sha256 of every other file
  <model>.onnx         one decoder graph per model (target, draft model, early-exit draft)
  <weights>.bin        weights, stored once; graphs reference them by offset (ONNX external data)
  tokenizer/...        the tokenizer files as the checkpoint had them

Bundles are written into a temporary directory beside the destination and renamed into place, so a failed
build leaves nothing half-written.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile

import numpy as np

from speccompile.errors import BundleError

FORMAT = "speccompile-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_ALIGN = 4096  # page-aligned tensors can be memory-mapped


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 22):
            h.update(b)
    return h.hexdigest()


def write_weights(path: str, weights: dict[str, np.ndarray], location: str) -> dict[str, dict]:
    """Write each array once, page-aligned; returns name -> external-data reference."""
    refs, offset = {}, 0
    with open(path, "wb") as f:
        for name, arr in weights.items():
            pad = (-offset) % _ALIGN
            f.write(b"\0" * pad)
            offset += pad
            data = np.ascontiguousarray(arr).tobytes()
            f.write(data)
            refs[name] = {"location": location, "offset": offset, "length": len(data), "dtype": str(arr.dtype),
                          "shape": list(arr.shape)}
            offset += len(data)
    return refs


@contextlib.contextmanager
def atomic_bundle_dir(out: str, overwrite: bool = False):
    """Yield a temporary directory; on success it replaces `out`, on any error it is removed."""
    out = os.path.abspath(out)
    if os.path.exists(out) and not overwrite:
        raise BundleError(f"{out} already exists (pass --force to replace it)")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".speccompile-build-", dir=parent)
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        if os.path.exists(out):
            old = tempfile.mkdtemp(prefix=".speccompile-old-", dir=parent)
            os.rename(out, os.path.join(old, "b"))
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def finalize_manifest(bundle_dir: str, manifest: dict) -> dict:
    """Record the hash of every file in the bundle, then write manifest.json."""
    files = {}
    for root, _, names in os.walk(bundle_dir):
        for n in sorted(names):
            p = os.path.join(root, n)
            rel = os.path.relpath(p, bundle_dir)
            if rel != MANIFEST:
                files[rel] = {"sha256": _sha256(p), "bytes": os.path.getsize(p)}
    manifest = dict(manifest, format=FORMAT, format_version=FORMAT_VERSION, files=files)
    with open(os.path.join(bundle_dir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest


def resolve_inside(bundle_dir: str, rel: str) -> str:
    """A manifest path, refused if it escapes the bundle (absolute, '..', or a symlink out)."""
    root = os.path.realpath(bundle_dir)
    p = os.path.realpath(os.path.join(root, rel))
    if os.path.isabs(rel) or os.path.commonpath([root, p]) != root:
        raise BundleError(f"manifest path {rel!r} points outside the bundle")
    return p


def read_manifest(bundle_dir: str, verify_hashes: bool = True) -> dict:
    path = os.path.join(bundle_dir, MANIFEST)
    if not os.path.isdir(bundle_dir):
        raise BundleError(f"bundle not found: {bundle_dir}")
    if not os.path.isfile(path):
        raise BundleError(f"{bundle_dir} is not a bundle: no {MANIFEST}")
    try:
        with open(path) as f:
            m = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path}: corrupt manifest ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise BundleError(f"{path}: not a speccompile manifest")
    if m.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"bundle format version {m.get('format_version')} is not supported by this speccompile "
                          f"(it reads version {FORMAT_VERSION}); rebuild the bundle")
    for rel, info in m.get("files", {}).items():
        p = resolve_inside(bundle_dir, rel)
        if not os.path.isfile(p):
            raise BundleError(f"bundle file missing: {rel}")
        if os.path.getsize(p) != info["bytes"]:
            raise BundleError(f"bundle file {rel} has {os.path.getsize(p)} bytes, manifest says {info['bytes']}")
        if verify_hashes and _sha256(p) != info["sha256"]:
            raise BundleError(f"bundle file {rel} does not match its sha256 in the manifest (modified or corrupt)")
    for model in m.get("models", {}).values():
        for rel in [model["graph"], *model["weights"]]:
            resolve_inside(bundle_dir, rel)
            if rel not in m.get("files", {}):
                raise BundleError(f"manifest names {rel!r}, which has no hash entry")
    return m
