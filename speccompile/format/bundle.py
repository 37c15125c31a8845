"""The bundle: one directory, one manifest — the only contract between `speccompile build` and the runtime.

Layout:
  manifest.json        format version, source, models (graphs, weights, configs, KV layout, signatures),
                       drafters, tokenizer, the onnxruntime the graphs need, and the sha256 of every other file
  <model>.onnx         one graph per model (the target and its batched form, a draft model or early exit, a
                       draft head), and <model>.kv_compact.onnx per KV cache (docs/design.md, "Bundle format")
  <weights>.bin        weights, stored once; graphs reference them by offset (ONNX external data)
  tokenizer/...        the tokenizer files as the checkpoint had them

A bundle is trusted only as far as it is checked (read_manifest; docs/guarantees.md): its schema, no file it does
not list, every file's hash, no graph's tensor data outside those files. How a build writes one (a lock, a
temporary folder renamed into place, never replacing anything but a bundle) is format/output_dir.py.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from speccompile.errors import BundleError
from speccompile.format.drafter_kinds import FUSE_MODEL_KIND, KINDS, batched_kind
from speccompile.format.external_data import check_graph_data
from speccompile.format.manifest_schema import validate_manifest
from speccompile.format.paths import resolve_inside
from speccompile.format.requirements import check_graph_versions, check_runtime, runtime_requirements

FORMAT = "speccompile-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# the manifest is read before anything vouches for it: whole, but never more than this (a build writes far less,
# even for the largest vocabularies' draft-to-target maps), so a huge or sparse file is refused before it is read
MAX_MANIFEST_BYTES = 256 << 20
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


# ---- the output directory: never lose a user's files, one build at a time -------------------------------------
def unlisted_files(bundle_dir: str, files: dict) -> list[str]:
    """Every file (or link) under `bundle_dir` that `files` (the manifest's list) does not name, but the manifest."""
    listed = {os.path.normpath(rel) for rel in files} | {MANIFEST}
    found = []
    for root, dirs, names in os.walk(bundle_dir):
        links = [d for d in dirs if os.path.islink(os.path.join(root, d))]  # walk does not enter them: report
        for n in names + links:
            rel = os.path.relpath(os.path.join(root, n), bundle_dir)
            if rel not in listed:
                found.append(rel)
    return sorted(found)


def some_names(names: list[str], n: int = 5) -> str:
    """The first `n` of `names` for a message, and how many more."""
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def finalize_manifest(bundle_dir: str, manifest: dict) -> dict:
    """Record the hash of every file in the bundle and what onnxruntime must provide to run its graphs, then write
    manifest.json."""
    files = {}
    for root, _, names in os.walk(bundle_dir):
        for n in sorted(names):
            p = os.path.join(root, n)
            rel = os.path.relpath(p, bundle_dir)
            if rel != MANIFEST:
                files[rel] = {"sha256": _sha256(p), "bytes": os.path.getsize(p)}
    # the graphs onnxruntime runs (a TensorRT build's <model>.trt.onnx are TensorRT's, with its plugin's domain)
    graphs = [os.path.join(bundle_dir, model["graph"]) for model in manifest.get("models", {}).values()]
    manifest = dict(manifest, format=FORMAT, format_version=FORMAT_VERSION, files=files,
                    runtime=runtime_requirements(graphs))
    with open(os.path.join(bundle_dir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest


def read_manifest(bundle_dir: str, verify_hashes: bool = True) -> dict:
    """The manifest of `bundle_dir`, trusted only as far as it is checked: its format version, its schema (before
    any field is used), no file in the bundle that it does not list, every listed file's size and sha256, the names
    it cross-references, the files its graphs read, the onnxruntime they need. Any failure is a BundleError."""
    path = os.path.join(bundle_dir, MANIFEST)
    if not os.path.isdir(bundle_dir):
        raise BundleError(f"bundle not found: {bundle_dir}")
    if not os.path.isfile(path):
        raise BundleError(f"{bundle_dir} is not a bundle: no {MANIFEST}")
    resolve_inside(bundle_dir, MANIFEST)  # a manifest linked in from outside is refused, as any file is
    m = load_json(path)
    _check_format(m, path)
    validate_manifest(m, path)
    unlisted = unlisted_files(bundle_dir, m["files"])
    if unlisted:
        raise BundleError(f"{bundle_dir} holds files its manifest does not list, so no hash vouches for them: "
                          f"{some_names(unlisted)} (remove them, or rebuild the bundle)")
    for rel, info in m["files"].items():
        p = resolve_inside(bundle_dir, rel)
        if not os.path.isfile(p):
            raise BundleError(f"bundle file missing: {rel}")
        if os.path.getsize(p) != info["bytes"]:
            raise BundleError(f"bundle file {rel} has {os.path.getsize(p)} bytes, manifest says {info['bytes']}")
        if verify_hashes and _sha256(p) != info["sha256"]:
            raise BundleError(f"bundle file {rel} does not match its sha256 in the manifest (modified or corrupt)")
    _check_references(bundle_dir, m)
    check_graph_data(bundle_dir, m)  # before any graph is opened: what each reads besides itself
    check_graph_versions(m["models"])
    check_runtime(m.get("runtime"))
    return m


def _stamp(path: str) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def file_stamps(bundle_dir: str, files: dict) -> dict[str, tuple]:
    """Each file of a loaded bundle as it is on disk now (device, inode, size, modification time), its manifest
    too: check_unchanged compares a later look with these."""
    return {rel: _stamp(resolve_inside(bundle_dir, rel)) for rel in [MANIFEST, *files]}


def check_unchanged(bundle_dir: str, stamps: dict[str, tuple]) -> None:
    """Refuse to open more of a loaded bundle's files (the runtime opens some only when a request first needs
    them) once the bundle at its path is not the one loaded: rebuilt with --force, replaced or moved since. Its
    graphs would run unchecked beside the loaded ones, and from another model's weights."""
    for rel, stamp in stamps.items():
        try:
            now = _stamp(resolve_inside(bundle_dir, rel))
        except (OSError, BundleError):
            now = None
        if now != stamp:
            raise BundleError(f"the bundle {bundle_dir} changed on disk since it was loaded ({rel} was replaced, "
                              "moved or modified); load it again (restart the server) to use it")


def load_json(path: str):
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
        if len(data) > MAX_MANIFEST_BYTES:
            raise BundleError(f"{path}: larger than the {MAX_MANIFEST_BYTES >> 20} MiB a manifest may be; not read")
        return json.loads(data)
    except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, nesting too deep
        raise BundleError(f"{path}: corrupt manifest ({type(e).__name__}: {str(e)[:120]})") from None
    except OSError as e:
        raise BundleError(f"{path}: cannot read ({e.strerror or e})") from None


def _check_format(m, path: str) -> None:
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise BundleError(f"{path}: not a speccompile manifest")
    if m.get("format_version") != FORMAT_VERSION or isinstance(m.get("format_version"), bool):
        raise BundleError(f"bundle format version {m.get('format_version')!r:.40} is not supported by this "
                          f"speccompile (it reads version {FORMAT_VERSION}); rebuild the bundle")


def _check_references(bundle_dir: str, m: dict) -> None:
    """Names the manifest gives in one place and uses in another: graphs and weight files are hashed files,
    drafters name models of the bundle, the tokenizer folder holds a hashed tokenizer.json."""
    files = {os.path.normpath(rel) for rel in m["files"]}
    for model in m["models"].values():
        for rel in [model["graph"], *model["weights"]]:
            resolve_inside(bundle_dir, rel)
            if os.path.normpath(rel) not in files:
                raise BundleError(f"manifest names {rel!r}, which has no hash entry")
    for d in m["drafters"]:
        model_kind = KINDS[d["kind"]].model_kind
        for key, kind in (("model", model_kind), ("fuse_model", FUSE_MODEL_KIND),
                          ("batch_model", batched_kind(model_kind))):
            if key in d and d[key] not in m["models"]:
                raise BundleError(f"drafter {d['name']!r} names model {d[key]!r}, which the bundle lacks")
            if key in d and kind and m["models"][d[key]]["kind"] != kind:  # another kind's graph: other inputs
                raise BundleError(f"drafter {d['name']!r} ({d['kind']}) names model {d[key]!r} of kind "
                                  f"{m['models'][d[key]]['kind']!r}, not the {kind!r} it runs")
    tokenizer = os.path.normpath(os.path.join(m["tokenizer"]["dir"], "tokenizer.json"))
    resolve_inside(bundle_dir, m["tokenizer"]["dir"])
    if tokenizer not in files:
        raise BundleError(f"manifest lists no {tokenizer}")
