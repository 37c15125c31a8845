"""Bad input: one clear error naming the problem, a non-zero CLI exit, nothing half-written."""
import json
import os
import shutil

import pytest
from click.testing import CliRunner

from speccompile.compile.driver import build_bundle
from speccompile.format.bundle import read_manifest
from speccompile.cli import main
from speccompile.errors import (BundleError, CheckpointError, ContextLengthError, TokenizerMismatchError, UnsupportedModelError)
from speccompile.compile.presets import tiny_tokenizer_files
from speccompile.compile.sources import load_checkpoint, save_hf_dir

from conftest import quiet


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_cli_error(result, *words):
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.output
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture
def hf_dir(tmp_path):
    d = tmp_path / "hf"
    save_hf_dir(load_checkpoint("tiny:llama"), str(d))
    return d


def no_leftovers(parent):
    return not [n for n in os.listdir(parent) if n.startswith(".speccompile-")]


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        build_bundle(str(tmp_path / "nope"), str(tmp_path / "out"), progress=quiet)
    assert_cli_error(cli("build", tmp_path / "nope", "--out", tmp_path / "out"), "not found")
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)


def test_corrupt_and_truncated_checkpoints(hf_dir, tmp_path):
    st = hf_dir / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    assert_cli_error(cli("build", hf_dir, "--out", tmp_path / "out"), "truncated")
    st.write_bytes(b"garbage" * 10)
    assert_cli_error(cli("build", hf_dir, "--out", tmp_path / "out"), "corrupt")
    (hf_dir / "config.json").write_text("{not json")
    assert_cli_error(cli("build", hf_dir, "--out", tmp_path / "out"), "config.json")
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)


def test_truncated_gguf(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 20)
    with pytest.raises(CheckpointError, match="GGUF"):
        load_checkpoint(str(f))
    f.write_bytes(b"NOPE" * 10)
    assert_cli_error(cli("build", f, "--out", tmp_path / "out"), "not a GGUF")


def test_missing_tensor(hf_dir, tmp_path):
    from safetensors.numpy import load_file, save_file
    t = load_file(str(hf_dir / "model.safetensors"))
    del t["model.layers.1.mlp.up_proj.weight"]
    save_file(t, str(hf_dir / "model.safetensors"))
    assert_cli_error(cli("build", hf_dir, "--out", tmp_path / "out"), "model.layers.1.mlp.up_proj.weight")


def test_pickle_refused(hf_dir, tmp_path):
    os.remove(hf_dir / "model.safetensors")
    (hf_dir / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    assert_cli_error(cli("build", hf_dir, "--out", tmp_path / "out"), "safetensors")
    with pytest.raises(CheckpointError, match="pickled"):
        load_checkpoint(str(hf_dir / "pytorch_model.bin"))


def test_unsupported_architecture(hf_dir, tmp_path):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        load_checkpoint(str(hf_dir))
    assert_cli_error(cli("build", hf_dir, "--out", tmp_path / "out"), "unsupported architecture")


def test_tokenizer_mismatch(tmp_path):
    draft = load_checkpoint("tiny:llama-draft")
    draft.tokenizer_files = tiny_tokenizer_files(300)  # a different vocabulary
    d = tmp_path / "draft"
    save_hf_dir(draft, str(d))
    with pytest.raises(TokenizerMismatchError):
        build_bundle("tiny:llama", str(tmp_path / "out"), drafts=[f"model:{d}"], progress=quiet)
    assert_cli_error(cli("build", "tiny:llama", "--out", tmp_path / "out", "--draft", f"model:{d}"), "tokenizer")
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)


def test_bad_draft_spec(tmp_path):
    assert_cli_error(cli("build", "tiny:llama", "--out", tmp_path / "o", "--draft", "layerskip:99"), "layers")
    assert_cli_error(cli("build", "tiny:llama", "--out", tmp_path / "o", "--draft", "hydra"), "unknown drafter")
    assert_cli_error(cli("build", "tiny:llama", "--out", tmp_path / "o", "--draft", "medusa"), "heads file")


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    import speccompile.compile.driver as b

    def boom(*a, **k):
        raise CheckpointError("disk on fire")
    monkeypatch.setattr(b, "write_weights", boom)
    with pytest.raises(CheckpointError):
        build_bundle("tiny:llama", str(tmp_path / "out"), progress=quiet)
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)


def test_existing_bundle_not_clobbered(tiny_bundle, tmp_path):
    out = tmp_path / "b"
    shutil.copytree(tiny_bundle, out)
    assert_cli_error(cli("build", "tiny:llama", "--out", out), "exists")
    read_manifest(str(out))  # untouched


def test_prompt_longer_than_context(tiny_generator):
    with pytest.raises(ContextLengthError, match="compiled context"):
        tiny_generator.generate(list(range(3, 300)), 4)
    with pytest.raises(ContextLengthError, match="max-new-tokens"):
        tiny_generator.generate([5, 6, 7], 1000)


def test_cli_context_errors(tiny_bundle):
    assert_cli_error(cli("generate", tiny_bundle, "hello " * 400, "--max-new-tokens", 4), "compiled context")
    assert_cli_error(cli("generate", tiny_bundle, "hello", "--max-new-tokens", 100000), "max-new-tokens")
    assert_cli_error(cli("generate", tiny_bundle, "hello", "--drafter", "eagle"), "not in this bundle")
    assert_cli_error(cli("generate", tiny_bundle, "hello", "--top-p", 0), "top_p")


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(tiny_bundle, out)
    return out


def test_hash_mismatch(bundle_copy):
    w = bundle_copy / "target.bin"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one bit pattern changed: only the hash can tell
    w.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="target.bin"):
        read_manifest(str(bundle_copy))
    assert_cli_error(cli("inspect", bundle_copy), "sha256")
    assert_cli_error(cli("generate", bundle_copy, "hi"), "sha256")


def test_truncated_weights(bundle_copy):
    w = bundle_copy / "target.bin"
    w.write_bytes(w.read_bytes()[:100])
    assert_cli_error(cli("generate", bundle_copy, "hi"), "target.bin")


def _edit_manifest(bundle, fn):
    p = bundle / "manifest.json"
    m = json.loads(p.read_text())
    fn(m)
    p.write_text(json.dumps(m))


def test_other_format_version(bundle_copy):
    _edit_manifest(bundle_copy, lambda m: m.update(format_version=99))
    assert_cli_error(cli("inspect", bundle_copy), "format version 99")


def test_manifest_path_outside_bundle(bundle_copy, tmp_path):
    (tmp_path / "evil.onnx").write_bytes(b"x")

    def escape(m):
        m["models"]["target"]["graph"] = "../evil.onnx"
        m["files"]["../evil.onnx"] = {"sha256": "0" * 64, "bytes": 1}
    _edit_manifest(bundle_copy, escape)
    assert_cli_error(cli("inspect", bundle_copy), "outside the bundle")


def test_not_a_bundle(tmp_path):
    assert_cli_error(cli("inspect", tmp_path), "no manifest.json")
    assert_cli_error(cli("generate", tmp_path / "missing", "hi"), "not found")
