"""The files a benchmark writes (--json, --plot): checked before it runs (written whole by format.atomic)."""
from __future__ import annotations

import os
import tempfile

from speccompile.errors import SpeccompileError


def check_output(path: str, option: str, formats: dict[str, str] | None = None) -> None:
    """Refuse now what would fail after the whole run: a folder, a parent that is a file, an unknown format
    (formats: extension -> description, as matplotlib lists them; a path without one is written as PNG)."""
    if os.path.isdir(path):
        raise SpeccompileError(f"{option} {path}: a folder, not a file")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not _can_create_in(parent):
        raise SpeccompileError(f"{option} {path}: {parent} is not a folder this user may write in")
    ext = os.path.splitext(path)[1][1:].lower()
    if formats is not None and ext and ext not in formats:
        raise SpeccompileError(f"{option} {path}: .{ext} is not a format matplotlib writes "
                               f"({', '.join(sorted(formats))})")


def _can_create_in(folder: str) -> bool:
    """Whether a file can be made in `folder`, by making one that leaves no trace: os.access says yes to root
    everywhere, /proc and read-only mounts included."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def check_not_overwriting(outputs: dict[str, str], bundle: str, dataset: str) -> None:
    """Refuse an output (option -> path) that would replace what the run reads or another output: the dataset, a
    file inside the bundle (a file its manifest does not list fails every later load of it), the other output."""
    bundle_dir, taken = os.path.realpath(bundle), {}
    for option, path in outputs.items():
        real = os.path.realpath(path)
        if real == os.path.realpath(dataset):
            raise SpeccompileError(f"{option} {path}: that is the dataset this run reads; write the result elsewhere")
        if os.path.commonpath([bundle_dir, real]) == bundle_dir:
            raise SpeccompileError(f"{option} {path}: inside the bundle {bundle}, whose files must all be listed in "
                                   "its manifest; write the result outside it")
        if real in taken:
            raise SpeccompileError(f"{option} {path}: the same file as {taken[real]}; give each its own")
        taken[real] = option
