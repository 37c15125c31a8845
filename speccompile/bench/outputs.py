"""The files a benchmark writes (--json, --plot): checked before it runs, written whole or not at all."""
from __future__ import annotations

import os
import tempfile
from typing import Callable, IO

from speccompile.errors import SpeccompileError


def check_output(path: str, option: str, formats: dict[str, str] | None = None) -> None:
    """Refuse now what would fail after the whole run: a folder, a parent that is a file, an unknown format
    (formats: extension -> description, as matplotlib lists them; a path without one is written as PNG)."""
    if os.path.isdir(path):
        raise SpeccompileError(f"{option} {path}: a folder, not a file")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise SpeccompileError(f"{option} {path}: {parent} is not a folder this user may write in")
    ext = os.path.splitext(path)[1][1:].lower()
    if formats is not None and ext and ext not in formats:
        raise SpeccompileError(f"{option} {path}: .{ext} is not a format matplotlib writes "
                               f"({', '.join(sorted(formats))})")


def write_atomically(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """write(f) into a temporary file beside `path`, then renamed onto it: a failure leaves `path` as it was."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as open() would have made it (mkstemp's file is the owner's alone)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
