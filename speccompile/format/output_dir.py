"""Where a build writes its bundle: a lock on the destination against other builds, a temporary folder beside it
renamed into place, and the rule that only a bundle is ever replaced. A failed or killed build leaves nothing
half-written: the next build to the same destination, holding its lock, removes what one left behind.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import inspect
import os
import shutil
import tempfile
import threading

from speccompile.errors import BundleError, given, option
from speccompile.format.atomic import ASIDE, as_created, replace_folder
from speccompile.format.bundle import FORMAT, MANIFEST, load_json, some_names, unlisted_files

FORCE = given("overwrite", True, flag="--force")  # build_bundle's overwrite=True, build's --force


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
            overwrite = bound.arguments[overwrite_param]
            if not isinstance(overwrite, bool):  # the string "no" would replace a bundle
                raise BundleError(f"{given(overwrite_param, overwrite, flag='--force')}: expected True or False")
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
    if not isinstance(out, (str, os.PathLike)) or not isinstance(os.fspath(out), str):
        raise BundleError(f"{given('out', out)}: expected the bundle directory's path")
    if not str(out).strip():
        raise BundleError(f"{option('out')} is empty: name the bundle directory to write")
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
        raise BundleError(f"{out} already exists ({FORCE} replaces it)")
    real = os.path.realpath(out)
    for keep, what in ((os.path.realpath(os.getcwd()), "the working directory"),
                       (os.path.realpath(os.path.expanduser("~")), "the home directory")):
        if keep == real or keep.startswith(real.rstrip(os.sep) + os.sep):
            raise BundleError(f"{FORCE} never replaces {out}: it is {what} or one of its parents")
    _refuse_inside_bundle(out)
    try:
        manifest = load_json(os.path.join(out, MANIFEST))
    except BundleError:
        manifest = None
    # of any format version: a bundle another speccompile wrote is refused on load with "rebuild the bundle"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{FORCE} replaces only a speccompile bundle, and {out} holds no speccompile "
                          f"{MANIFEST}; it was left as it is")
    files = manifest.get("files")
    unlisted = unlisted_files(out, files if isinstance(files, dict) else {})
    if unlisted:
        raise BundleError(f"{FORCE} never replaces {out}: it holds files its manifest does not list "
                          f"({some_names(unlisted)}); move them away first")


def _refuse_inside_bundle(out: str) -> None:
    """A bundle inside another: the outer manifest would not list it, so the outer bundle would stop loading."""
    folder = os.path.dirname(os.path.realpath(out))
    while True:
        path = os.path.join(folder, MANIFEST)
        try:  # a plain file only: opening a named pipe of that name would wait for a writer for ever
            found = load_json(path) if os.path.isfile(path) else None
        except BundleError:  # none there, or none that parses
            found = None
        if isinstance(found, dict) and found.get("format") == FORMAT:
            raise BundleError(f"{given('out', out)} is inside the bundle {folder}; name a folder outside it")
        parent = os.path.dirname(folder)
        if parent == folder:
            return
        folder = parent


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
