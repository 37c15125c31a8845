"""The bundle: one directory, one manifest — the only contract between `speccompile build` and the runtime.

Layout:
  manifest.json        format version, source, models (graphs, weights, configs, KV layout, signatures),
                       drafters, tokenizer, the onnxruntime the graphs need, and the sha256 of every other file
  <model>.onnx         one decoder graph per model (target, draft model, early-exit draft)
  <weights>.bin        weights, stored once; graphs reference them by offset (ONNX external data)
  tokenizer/...        the tokenizer files as the checkpoint had them

A bundle is trusted only as far as it is checked (read_manifest; docs/guarantees.md): its schema, no file it does
not list, every file's hash, no graph's tensor data outside those files. Bundles are written into a temporary
directory beside the destination and renamed into place, under a lock on the destination, so a failed build leaves
nothing half-written and a build never replaces anything but a bundle.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import inspect
import json
import os
import shutil
import tempfile
import threading

import numpy as np

from speccompile.errors import BundleError
from speccompile.format.atomic import ASIDE, as_created, replace_folder
from speccompile.format.drafter_kinds import FUSE_MODEL_KIND, KINDS
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
def guard_output(out_param: str = "out", overwrite_param: str = "overwrite"):
    """Decorate a build function: before it does any work, lock its output directory against other builds, check
    that the directory may be written (check_replaceable) and clean the temporary folders of killed builds to it;
    the lock is held until the build returns or fails."""
    def decorate(build):
        signature = inspect.signature(build)

        @functools.wraps(build)
        def guarded(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            out = _out_path(bound.arguments[out_param])
            with output_lock(out):
                clean_stale_temps(out)  # first: it may put back the bundle a killed build had moved aside
                check_replaceable(out, bound.arguments[overwrite_param])
                return build(*args, **kwargs)
        return guarded
    return decorate


def _out_path(out: str) -> str:
    """`out` with its links resolved, refused empty first (realpath would make "" the working directory). A link
    is followed as a file write follows it: the bundle goes where it points, the link stays (replaced by the new
    folder, it left the old bundle in place), and every spelling of one folder shares its lock and temporaries."""
    if not str(out).strip():
        raise BundleError("--out is empty: name the bundle directory to write")
    return os.path.realpath(out)


def _temp_prefix(kind: str, out: str) -> str:
    """Temporary folders beside `out` are named after it (a hash of its path), so that the next build to `out`,
    holding its lock, knows those left behind are stale and its own to remove."""
    return f".speccompile-{kind}-{hashlib.sha256(out.encode(errors='surrogateescape')).hexdigest()[:16]}-"


def clean_stale_temps(out: str) -> None:
    """Remove the temporary folders of killed builds to `out` (call with its lock held: no build is running). A
    build killed between moving the old bundle aside and moving the new one in is undone first."""
    parent = os.path.dirname(out)
    stale = [n for n in os.listdir(parent) if n.startswith((_temp_prefix("build", out), _temp_prefix("old", out)))]
    for name in sorted(stale):
        path = os.path.join(parent, name)
        if os.path.islink(path) or not os.path.isdir(path):
            continue
        for kept in (os.path.join(path, ASIDE), os.path.join(path, "b")):  # "b": builds before format.atomic
            if name.startswith(_temp_prefix("old", out)) and os.path.isdir(kept) and not os.path.lexists(out):
                os.rename(kept, out)
        shutil.rmtree(path, ignore_errors=True)


_held = threading.local()  # the outputs whose lock this thread holds


@contextlib.contextmanager
def output_lock(out: str):
    """An exclusive flock on a lock file beside `out` (`.NAME.speccompile-lock`), removed when released; another
    build to the same `out` fails at once with a BundleError instead of both writing and both reporting success."""
    out = os.path.abspath(out)
    held = _held.__dict__.setdefault("paths", set())
    if out in held:  # this thread holds it already: atomic_bundle_dir inside a guarded build
        yield
        return
    created = _make_parent(os.path.dirname(out))
    lock_path = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.speccompile-lock")
    fd = _acquire(lock_path, out)
    held.add(out)
    try:
        yield
    finally:
        held.discard(out)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path)  # while still locked: a build that opened this file sees it gone and retries
        os.close(fd)
        for d in created:  # folders made for `out` alone, now empty: a failed build leaves nothing behind
            with contextlib.suppress(OSError):
                os.rmdir(d)


def _make_parent(parent: str) -> list[str]:
    """Create `parent` and its missing ancestors; returns those created, deepest first."""
    created, d = [], parent
    while d and not os.path.isdir(d) and os.path.dirname(d) != d:
        created.append(d)
        d = os.path.dirname(d)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise BundleError(f"cannot create {parent}: {e.strerror or e}") from None
    return created


def _acquire(lock_path: str, out: str) -> int:
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise BundleError(f"cannot create the lock file {lock_path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise BundleError(f"another build is writing {out} (it holds {lock_path}); wait for it to finish") from None
        try:
            if os.fstat(fd).st_ino == os.stat(lock_path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder removed this file as we opened it: lock the new one


def check_replaceable(out: str, overwrite: bool) -> None:
    """`out` may be written: it does not exist, or it is a speccompile bundle, holding nothing the manifest does
    not list, and `overwrite` is set. Never a plain file, `/`, the working directory or one of its parents, or
    the home directory or one of its parents, whatever `overwrite` says."""
    if os.path.lexists(out) and not os.path.isdir(out):
        raise BundleError(f"{out} exists and is not a directory; it is never replaced")
    if not os.path.lexists(out):
        _refuse_inside_bundle(out)
        return
    if not overwrite:
        raise BundleError(f"{out} already exists (pass --force to replace it)")
    real = os.path.realpath(out)
    for keep, what in ((os.path.realpath(os.getcwd()), "the working directory"),
                       (os.path.realpath(os.path.expanduser("~")), "the home directory")):
        if keep == real or keep.startswith(real.rstrip(os.sep) + os.sep):
            raise BundleError(f"--force never replaces {out}: it is {what} or one of its parents")
    _refuse_inside_bundle(out)
    try:
        manifest = _load_json(os.path.join(out, MANIFEST))
    except BundleError:
        manifest = None
    # of any format version: a bundle another speccompile wrote is refused on load with "rebuild the bundle"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"--force replaces only a speccompile bundle, and {out} holds no speccompile "
                          f"{MANIFEST}; it was left as it is")
    files = manifest.get("files")
    unlisted = unlisted_files(out, files if isinstance(files, dict) else {})
    if unlisted:
        raise BundleError(f"--force never replaces {out}: it holds files its manifest does not list "
                          f"({_some(unlisted)}); move them away first")


def _refuse_inside_bundle(out: str) -> None:
    """A bundle inside another: the outer manifest would not list it, so the outer bundle would stop loading."""
    folder = os.path.dirname(os.path.realpath(out))
    while True:
        path = os.path.join(folder, MANIFEST)
        try:  # a plain file only: opening a named pipe of that name would wait for a writer for ever
            found = _load_json(path) if os.path.isfile(path) else None
        except BundleError:  # none there, or none that parses
            found = None
        if isinstance(found, dict) and found.get("format") == FORMAT:
            raise BundleError(f"--out {out} is inside the bundle {folder}; name a folder outside it")
        parent = os.path.dirname(folder)
        if parent == folder:
            return
        folder = parent


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


def _some(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


@contextlib.contextmanager
def atomic_bundle_dir(out: str, overwrite: bool = False):
    """Yield a temporary directory; on success it replaces `out`, on any error it is removed and `out` is left as
    it was. A write that fails for the disk (full, read-only, ...) is a BundleError saying so."""
    out = _out_path(out)
    with output_lock(out):
        check_replaceable(out, overwrite)  # again: the directory may have changed since the build began
        tmp = None
        try:
            tmp = tempfile.mkdtemp(prefix=_temp_prefix("build", out), dir=os.path.dirname(out))
            yield tmp
            os.chmod(tmp, as_created(0o777))  # a folder as os.makedirs makes it, as the files in it are
            _swap_into_place(tmp, out)
        except OSError as e:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
            raise BundleError(f"cannot write the bundle {out}: {e.strerror or e}"
                              f"{f' ({e.filename})' if e.filename else ''}; nothing was replaced") from None
        except BaseException:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
            raise


def _swap_into_place(tmp: str, out: str) -> None:
    replace_folder(tmp, out, _temp_prefix("old", out))  # the prefix a later build's clean-up knows


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
    m = _load_json(path)
    _check_format(m, path)
    validate_manifest(m, path)
    unlisted = unlisted_files(bundle_dir, m["files"])
    if unlisted:
        raise BundleError(f"{bundle_dir} holds files its manifest does not list, so no hash vouches for them: "
                          f"{_some(unlisted)} (remove them, or rebuild the bundle)")
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


def _load_json(path: str):
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
        for key, kind in (("model", KINDS[d["kind"]].model_kind), ("fuse_model", FUSE_MODEL_KIND)):
            if key in d and d[key] not in m["models"]:
                raise BundleError(f"drafter {d['name']!r} names model {d[key]!r}, which the bundle lacks")
            if key in d and kind and m["models"][d[key]]["kind"] != kind:  # another kind's graph: other inputs
                raise BundleError(f"drafter {d['name']!r} ({d['kind']}) names model {d[key]!r} of kind "
                                  f"{m['models'][d[key]]['kind']!r}, not the {kind!r} it runs")
    tokenizer = os.path.normpath(os.path.join(m["tokenizer"]["dir"], "tokenizer.json"))
    resolve_inside(bundle_dir, m["tokenizer"]["dir"])
    if tokenizer not in files:
        raise BundleError(f"manifest lists no {tokenizer}")
