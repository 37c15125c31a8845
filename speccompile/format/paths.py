"""A path a bundle names, inside the bundle: shared by the manifest's checks (bundle.py) and the graphs'
(external_data.py); and the user's cache folder (cost models, compiled kernels)."""
from __future__ import annotations

import os

from speccompile.errors import BundleError


def resolve_inside(bundle_dir: str, rel: str) -> str:
    """A manifest path, refused if it escapes the bundle (absolute, '..', or a symlink out)."""
    if not isinstance(rel, str) or not rel or "\0" in rel:
        raise BundleError(f"manifest path {rel!r:.80} is not a file name")
    root = os.path.realpath(bundle_dir)
    p = os.path.realpath(os.path.join(root, rel))
    if os.path.isabs(rel) or os.path.commonpath([root, p]) != root:
        raise BundleError(f"manifest path {rel!r} points outside the bundle")
    return p


def user_cache_dir(name: str) -> str | None:
    """$SPECCOMPILE_CACHE/name, else speccompile/name in $XDG_CACHE_HOME or ~/.cache; None where neither names an
    absolute folder (a relative XDG_CACHE_HOME is invalid by the XDG spec; with HOME unset and no passwd entry
    expanduser leaves "~"): such a path would put a folder in the working directory, maybe a bundle, whose next
    load then refuses the file its manifest does not list."""
    if os.environ.get("SPECCOMPILE_CACHE"):
        return os.path.join(os.environ["SPECCOMPILE_CACHE"], name)
    xdg, home = os.environ.get("XDG_CACHE_HOME", ""), os.path.expanduser("~")
    base = xdg if os.path.isabs(xdg) else os.path.join(home, ".cache") if os.path.isabs(home) else None
    return os.path.join(base, "speccompile", name) if base else None
