"""Writing a run's files whole or not at all: each is written under a temporary name beside its place and renamed
onto it, so a run that fails (a full disk, an interrupt) leaves the earlier file, never a truncated one that a later
run would take for finished work."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

from safetensors import SafetensorError

from speccompile.errors import SpeccompileError
from speccompile.format.atomic import as_created, replace_folder as replace_folder_whole, write_atomically


@contextlib.contextmanager
def staging_folder(beside: str):
    """A temporary folder beside the path `beside`, removed on exit; a failure to write (OSError, or safetensors'
    own error for the same) is one SpeccompileError naming `beside`."""
    parent = os.path.dirname(os.path.abspath(beside))
    tmp = None
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(beside)}.tmp-", dir=parent)
        yield tmp
    except (OSError, SafetensorError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise SpeccompileError(f"cannot write {beside}: {reason}; nothing was replaced") from None
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def write_file(path: str, write) -> None:
    """write(f) writes the file into a binary file object, under a temporary name; then it replaces `path`. A
    failure to write is one SpeccompileError naming `path`."""
    try:
        write_atomically(path, write)
    except (OSError, SafetensorError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise SpeccompileError(f"cannot write {path}: {reason}; nothing was replaced") from None


def write_json(path: str, value, indent: int = 1) -> None:
    write_file(path, lambda f: f.write(json.dumps(value, indent=indent).encode()))


def replace_folder(staged: str, out: str) -> None:
    """Move the folder `staged` to `out` whole (format.atomic.replace_folder), with the mode os.makedirs would give
    it (mkdtemp's folder is the owner's alone)."""
    os.chmod(staged, as_created(0o777))
    replace_folder_whole(staged, out)
