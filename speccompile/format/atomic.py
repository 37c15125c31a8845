"""Files and folders written whole or not at all: under a temporary name beside their place (".tmp-..."), renamed
onto it once complete, so a failure or an interrupt leaves the earlier one, never a truncated one. Shared by
everything that writes what a later run reads: bundles, bench results and plots, the cost model, the context
cache's disk blocks, train-head's work files and EAGLE head folders."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import IO, Callable

TEMP_PREFIX = ".tmp-"  # a writer killed mid-file leaves one of these (the context cache removes its own)
ASIDE = "earlier"  # the name an earlier folder has inside the folder replace_folder sets it aside in


def as_created(mode: int) -> int:
    """`mode` less the process's umask: what open() (0o666) or os.makedirs (0o777) would have given. mkstemp and
    mkdtemp make their files and folders the owner's alone, whatever the umask."""
    return mode & ~_umask()


def _umask() -> int:
    """The process's umask, read where Linux shows it: setting it to learn it (the only portable way) leaves a
    moment in which another thread's new file or folder would be created world-writable."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o077)  # the narrowest mask for that moment, not 0
        os.umask(umask)
        return umask


def write_atomically(path: str, write: Callable[[IO[bytes]], None], private: bool = False) -> None:
    """write(f) into a temporary file beside `path`, then renamed onto it. private: readable by the owner alone
    (mkstemp's mode), else the mode open() would give the file."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=TEMP_PREFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        if not private:
            os.chmod(tmp, as_created(0o666))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):  # an interrupt just after the rename: the file is in place
            os.unlink(tmp)
        raise


def replace_folder(staged: str, out: str, aside_prefix: str = TEMP_PREFIX) -> None:
    """Move the complete folder `staged` to `out` (both on one file system). An earlier `out` is renamed aside
    first (into a folder named with aside_prefix beside it), and put back if anything, an interrupt too, stops the
    second rename; then removed. The staged files reach the disk before the first rename: a power cut after it
    must not leave a folder of empty files where the earlier one was."""
    sync_folder(staged)
    if not os.path.lexists(out):
        os.rename(staged, out)
        return
    aside = tempfile.mkdtemp(prefix=aside_prefix, dir=os.path.dirname(os.path.abspath(out)))
    try:  # the first rename too: refused (a mount point, a busy folder), it must not leave the aside folder behind
        os.rename(out, os.path.join(aside, ASIDE))
        os.rename(staged, out)
    except BaseException:
        if not os.path.lexists(out):
            os.rename(os.path.join(aside, ASIDE), out)
        shutil.rmtree(aside, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def sync_folder(folder: str) -> None:
    """fsync every file under `folder`, then the folders themselves (their entries)."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for root, _dirs, _files in os.walk(folder, topdown=False):
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
