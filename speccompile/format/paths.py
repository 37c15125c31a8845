"""A path a bundle names, inside the bundle: shared by the manifest's checks (bundle.py) and the graphs'
(external_data.py)."""
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
