"""MODEL as a hub id (`org/name`): resolved offline from the local Hugging Face cache's snapshots layout
(HF_HUB_CACHE, else HF_HOME/hub), and one error line naming the download command when absent."""
import os
import shutil

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from speccompile.compile.driver import build_bundle  # noqa: E402
from speccompile.compile.hub_cache import resolve_hub_id  # noqa: E402
from speccompile.format.bundle import read_manifest  # noqa: E402

from conftest import quiet  # noqa: E402
from models_util import write_checkpoint  # noqa: E402
from test_errors import assert_cli_error, cli  # noqa: E402

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_cache(root, repo_id: str, checkpoint_dir) -> str:
    """A cache laid out as huggingface_hub writes it: blobs, a snapshot of symlinks to them, refs/main."""
    repo = os.path.join(root, "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(repo, "snapshots", COMMIT)
    os.makedirs(snapshot)
    os.makedirs(os.path.join(repo, "blobs"))
    for i, name in enumerate(sorted(os.listdir(checkpoint_dir))):
        blob = os.path.join(repo, "blobs", f"blob{i}")
        shutil.copy(os.path.join(checkpoint_dir, name), blob)
        os.symlink(os.path.relpath(blob, snapshot), os.path.join(snapshot, name))
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(COMMIT + "\n")
    return snapshot


@pytest.mark.parametrize("variable", ["HF_HUB_CACHE", "HF_HOME"])
def test_hub_id_builds_from_the_local_cache(tmp_path, monkeypatch, variable):
    write_checkpoint("qwen3", str(tmp_path / "ck"))
    root = tmp_path / "cache"
    snapshot = fake_cache(str(root / "hub") if variable == "HF_HOME" else str(root), "tiny-org/Tiny-Qwen3",
                          tmp_path / "ck")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv(variable, str(root))
    monkeypatch.chdir(tmp_path)
    assert resolve_hub_id("tiny-org/Tiny-Qwen3") == snapshot
    build_bundle("tiny-org/Tiny-Qwen3", str(tmp_path / "b"), drafts=["lookup"], progress=quiet)
    assert read_manifest(str(tmp_path / "b"))["source"]["path"] == os.path.abspath(snapshot)


def test_absent_hub_id_names_the_download_command(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.chdir(tmp_path)
    assert_cli_error(cli("build", "meta-llama/Llama-3.2-1B-Instruct", "--out", tmp_path / "b"),
                     "meta-llama/Llama-3.2-1B-Instruct", "not in the local Hugging Face cache",
                     "hf download meta-llama/Llama-3.2-1B-Instruct")
