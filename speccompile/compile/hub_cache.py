"""MODEL as a hub id (`org/name`): its snapshot in the local Hugging Face cache, read offline.

The cache's layout (huggingface_hub's): <cache>/models--<org>--<name>/refs/<revision> holds a commit hash, and
snapshots/<commit>/ the files of that commit (symlinks into blobs/). The cache is $HF_HUB_CACHE, else
$HF_HOME/hub, else ~/.cache/huggingface/hub. Nothing is downloaded: an absent model is one error naming the
command that downloads it.
"""
from __future__ import annotations

import os
import re

from speccompile.errors import CheckpointError

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def looks_like_hub_id(source: str) -> bool:
    """`org/name` that is not a path on disk (a local directory of that name wins)."""
    return bool(HUB_ID.match(source)) and ".." not in source and not os.path.exists(source)


def hub_cache_dir() -> str:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(home, "hub")


def resolve_hub_id(repo_id: str, revision: str = "main") -> str:
    """The snapshot directory of `repo_id` at `revision` (a branch or tag in refs/, or a commit) in the local cache;
    a CheckpointError naming the download command when it is not there (or holds no config.json)."""
    cache = hub_cache_dir()
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    snapshots = os.path.join(repo, "snapshots")
    commit = revision
    ref = os.path.join(repo, "refs", revision)
    if os.path.isfile(ref):
        with open(ref) as f:
            commit = f.read().strip()
    snapshot = os.path.join(snapshots, commit)
    if not os.path.isdir(snapshot) and os.path.isdir(snapshots):
        found = sorted(os.listdir(snapshots))  # no ref for the revision: a single snapshot is unambiguous
        snapshot = os.path.join(snapshots, found[0]) if len(found) == 1 else snapshot
    if not os.path.isfile(os.path.join(snapshot, "config.json")):
        refuse_gguf_repo(repo_id, snapshot)
        raise CheckpointError(
            f"{repo_id}: no such path, and not in the local Hugging Face cache ({cache}); download it on a machine "
            f"with hub access with `hf download {repo_id} --include '*.json' '*.safetensors'` (or set HF_HOME / "
            "HF_HUB_CACHE to the cache that holds it)")
    return snapshot


def refuse_gguf_repo(repo_id: str, snapshot: str) -> None:
    """A GGUF repository (no config.json: one .gguf file per quantization) in the cache is built from one of its
    files, not as a Hugging Face directory: the error names them, not a download that would not help."""
    ggufs = sorted(f for f in os.listdir(snapshot) if f.endswith(".gguf")) if os.path.isdir(snapshot) else []
    if ggufs:
        shown = ", ".join(ggufs[:4]) + (f" (+{len(ggufs) - 4} more)" if len(ggufs) > 4 else "")
        raise CheckpointError(f"{repo_id}: a GGUF repository in the local cache; build from one of its files, as "
                              f"MODEL {os.path.join(snapshot, ggufs[0])}: {shown}")
