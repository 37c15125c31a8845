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


def test_only_the_indexed_weight_files_are_read(tmp_path):
    """Mistral's repos ship consolidated.safetensors (their own names, the same weights) beside the Hugging Face
    shards: with model.safetensors.index.json only the files it maps are read and hashed; without one,
    consolidated*.safetensors is passed over."""
    import json

    import numpy as np
    from safetensors.numpy import save_file

    from speccompile.compile.sources import load_hf_dir
    ck = tmp_path / "ck"
    model = write_checkpoint("mistral-window", str(ck))
    single = load_hf_dir(str(ck), progress=quiet)
    os.remove(ck / "model.safetensors")
    model.save_pretrained(str(ck), max_shard_size="100KB")
    indexed = json.loads((ck / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(indexed.values())) > 1
    sharded = load_hf_dir(str(ck), progress=quiet)
    save_file({"layers.0.attention.wq.weight": np.ones((64, 64), np.float32)}, str(ck / "consolidated.safetensors"))
    both = load_hf_dir(str(ck), progress=quiet)
    assert set(both.tensors) == set(indexed) and both.source["sha256"] == sharded.source["sha256"]
    for name in os.listdir(ck):
        if name.startswith("model-") or name.endswith("index.json"):
            os.remove(ck / name)
    model.save_pretrained(str(ck), max_shard_size="100GB")  # one model.safetensors again, no index
    assert (ck / "consolidated.safetensors").exists() and not (ck / "model.safetensors.index.json").exists()
    alone = load_hf_dir(str(ck), progress=quiet)
    assert set(alone.tensors) == set(single.tensors) and alone.source["sha256"] == single.source["sha256"]


def test_model_safetensors_is_read_alone(tmp_path):
    """transformers reads model.safetensors alone where there is one: another safetensors file beside it (an
    optimizer's state, a copy in another precision) is not the model's and changes nothing. Without
    model.safetensors or an index, a tensor in two files is one error line, never the later file's copy."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    from speccompile.compile.sources import load_hf_dir
    ck = tmp_path / "ck"
    write_checkpoint("llama3", str(ck))
    alone = load_hf_dir(str(ck), progress=quiet)
    save_file({k: np.full_like(v, 0.5) for k, v in load_file(str(ck / "model.safetensors")).items()},
              str(ck / "optimizer.safetensors"))
    beside = load_hf_dir(str(ck), progress=quiet)
    assert beside.source["sha256"] == alone.source["sha256"] and set(beside.tensors) == set(alone.tensors)
    assert all(np.array_equal(beside.tensors[k], v) for k, v in alone.tensors.items())
    os.rename(ck / "model.safetensors", ck / "weights.safetensors")
    assert_cli_error(cli("build", ck, "--out", tmp_path / "b"), "weights.safetensors", "in an earlier weight file")
    assert not (tmp_path / "b").exists()


def test_gguf_repo_in_the_cache_names_its_files(tmp_path, monkeypatch):
    """A GGUF repository (.gguf files, no config.json) in the cache: one error naming its files to build from,
    not a download command for a model that is already there."""
    from test_gguf import write_tiny_llama_gguf
    (tmp_path / "repo").mkdir()
    write_tiny_llama_gguf(tmp_path / "repo" / "tiny-Q8_0.gguf")
    snapshot = fake_cache(str(tmp_path / "cache"), "tiny-org/Tiny-GGUF", tmp_path / "repo")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    assert_cli_error(cli("build", "tiny-org/Tiny-GGUF", "--out", tmp_path / "b"), "a GGUF repository",
                     os.path.join(snapshot, "tiny-Q8_0.gguf"))
