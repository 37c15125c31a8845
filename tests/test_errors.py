"""Bad input: one clear error naming the problem, a non-zero CLI exit, nothing half-written, nothing lost."""
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import onnxruntime
import pytest
from click.testing import CliRunner

import speccompile
import speccompile.compile.driver as driver
import speccompile.format.bundle as bundle_module

from speccompile.compile.driver import build_bundle
from speccompile.format.bundle import read_manifest
from speccompile.format.output_dir import _temp_prefix, output_lock
from speccompile.cli import main
from speccompile.errors import (BundleError, CheckpointError, ContextLengthError, SpeccompileError,
                               TokenizerMismatchError, UnsupportedModelError, given, option, prefixed, reworded)
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


def test_same_tokenizer_in_the_older_merges_spelling(tmp_path):
    """A draft model whose tokenizer.json is the target's, saved with merges as "a b" strings (tokenizers < 0.20,
    most hub checkpoints) rather than ["a", "b"] pairs, shares the target's tokenizer."""
    save_hf_dir(load_checkpoint("tiny:llama-draft"), str(tmp_path / "draft"))
    path = tmp_path / "draft" / "tokenizer.json"
    tok = json.loads(path.read_text())
    assert tok["model"]["merges"] and all(isinstance(m, list) for m in tok["model"]["merges"])
    tok["model"]["merges"] = [" ".join(m) for m in tok["model"]["merges"]]
    path.write_text(json.dumps(tok))
    build_bundle("tiny:llama", str(tmp_path / "out"), drafts=[f"model:{tmp_path / 'draft'}"], max_seq_len=64,
                 progress=quiet)


def test_bad_draft_spec(tmp_path):
    for spec in ("lookup:65", "lookup:100"):  # the manifest schema's bound: such a bundle could never load
        assert_cli_error(cli("build", "tiny:llama", "--out", tmp_path / "o", "--draft", spec), "at most 64")
    assert not (tmp_path / "o").exists()
    build_bundle("tiny:llama", str(tmp_path / "lk"), drafts=["lookup:64"], max_seq_len=64, progress=quiet)
    speccompile.load(str(tmp_path / "lk"), threads=1)
    assert_cli_error(cli("build", "tiny:llama", "--out", tmp_path / "o", "--draft", "layerskip:99"), "layers")
    assert_cli_error(cli("build", "tiny:llama", "--out", tmp_path / "o", "--draft", "hydra"), "unknown drafter")
    assert_cli_error(cli("build", "tiny:llama", "--out", tmp_path / "o", "--draft", "medusa"), "heads file")


@pytest.mark.parametrize("drafts", [["mtp:a.safetensors", "mtp:b.safetensors"], ["lookup", "lookup:4"],
                                    ["layerskip:2", "layerskip:02"]])
def test_two_drafters_of_one_name_are_refused_before_any_work(tmp_path, monkeypatch, drafts):
    """A bundle holds one drafter per name (their graphs and weights go by it): refused before the checkpoint is
    read, not after the target's graph pass."""
    import speccompile.compile.driver as driver

    def no_work(*args, **kwargs):
        raise AssertionError("the checkpoint was read")
    monkeypatch.setattr(driver, "load_checkpoint", no_work)
    with pytest.raises(SpeccompileError, match="two drafters named"):
        build_bundle("tiny:llama", str(tmp_path / "o"), drafts=drafts, max_seq_len=64, progress=quiet)
    assert not (tmp_path / "o").exists()


def test_a_bad_mla_cache_is_refused_before_any_work_by_its_keyword(tmp_path, monkeypatch):
    """mla_cache is build_bundle's keyword alone (the CLI has no --mla-cache): the error names the keyword, and
    comes before the checkpoint, maybe many GB, is read."""
    def no_work(*args, **kwargs):
        raise AssertionError("the checkpoint was read")
    monkeypatch.setattr(driver, "load_checkpoint", no_work)
    with pytest.raises(SpeccompileError, match="^mla_cache='compressed': choose latent or expanded$"):
        build_bundle("tiny:llama", str(tmp_path / "o"), mla_cache="compressed", progress=quiet)
    assert not (tmp_path / "o").exists()


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


def test_an_empty_out_is_named_as_empty(tmp_path, monkeypatch):
    """`--out ""` (an unset shell variable) is refused as empty, not as the working directory it resolves to
    ('already exists', or with --force 'never replaces the working directory')."""
    monkeypatch.chdir(tmp_path)
    for force in ([], ["--force"]):
        assert_cli_error(cli("build", "tiny:llama", "--out", "", "--max-seq-len", 64, *force), "--out is empty")
    assert not os.listdir(tmp_path)


def test_options_are_named_as_each_caller_spells_them():
    """A message names an option as the Python keyword in str() and as the flag in cli_message(); a value shows as
    repr() in Python, and as typed on a command line where it is a plain word."""
    e = SpeccompileError(f"{given('max_new_tokens', 0)}: bad; {option('tree')} or {given('drafts', 'none', '--draft')}"
                         f", {given('overwrite', True, '--force')}, {given('tree', 'a b')}")
    assert str(e) == "max_new_tokens=0: bad; tree or drafts='none', overwrite=True, tree='a b'"
    assert e.cli_message() == "--max-new-tokens 0: bad; --tree or --draft none, --force, --tree 'a b'"


def test_a_value_cannot_forge_an_option_mention():
    """The characters that delimit a mention are escaped by repr() in any value, so a value holding them shows as
    given rather than being read as another option's mention."""
    forged = option("x")[:-1] + "oops" + option("y")[-1:]
    e = SpeccompileError(f"{given('tree', forged)}: bad")
    assert str(e).startswith("tree='\\ue000x") and str(e).endswith(": bad")
    assert e.cli_message().startswith("--tree '\\ue000x")


def test_a_reworded_or_prefixed_refusal_is_the_same_refusal():
    """reworded and prefixed change the words alone: the copy keeps the refusal's class (a SamplingParamsError is
    a ValueError too) and its cause, and the mentions they leave are still spelled for each caller."""
    from speccompile.runtime.sampling import SamplingParamsError
    try:
        try:
            raise OSError("underneath")
        except OSError as cause:
            raise SamplingParamsError(f"{given('acceptance', 'x')} or {option('top_k')}: bad") from cause
    except SamplingParamsError as e:
        original = e
    for copy, says in ((reworded(original, {"acceptance": given("drafters", "d~x", "--drafter")}),
                        ("drafters='d~x' or top_k: bad", "--drafter d~x or --top-k: bad")),
                       (prefixed(original, "prompt 2"), ("prompt 2: acceptance='x' or top_k: bad",
                                                         "prompt 2: --acceptance x or --top-k: bad"))):
        assert type(copy) is SamplingParamsError and copy.__cause__ is original.__cause__
        assert (str(copy), copy.cli_message()) == says


def test_a_refusals_settings_are_cut_short():
    """The settings a sampling refusal lists show each value cut short: a long string would fill the line."""
    from speccompile.runtime.sampling import SamplingParams, SamplingParamsError
    with pytest.raises(SamplingParamsError) as refusal:
        SamplingParams(temperature="x" * 200)
    assert "x" * 23 in str(refusal.value) and "x" * 24 not in str(refusal.value)


def test_prompt_longer_than_context(tiny_generator):
    with pytest.raises(ContextLengthError, match="compiled context"):
        tiny_generator.generate(list(range(3, 300)), 4)
    with pytest.raises(ContextLengthError, match=r"\+ max_new_tokens=1000 exceeds"):  # Python's spelling
        tiny_generator.generate([5, 6, 7], 1000)


def test_cli_context_errors(tiny_bundle):
    assert_cli_error(cli("generate", tiny_bundle, "hello " * 400, "--max-new-tokens", 4), "compiled context")
    assert_cli_error(cli("generate", tiny_bundle, "hello", "--max-new-tokens", 100000),
                     "+ --max-new-tokens 100000 exceeds")  # the CLI's spelling of the same failure
    assert_cli_error(cli("generate", tiny_bundle, "hello", "--drafter", "eagle"), "not in this bundle")
    assert_cli_error(cli("generate", tiny_bundle, "hello", "--top-p", 0), "--top-p must be in (0, 1]")
    with pytest.raises(SpeccompileError, match=r"top_p must be in \(0, 1\]"):  # the same check, from Python
        speccompile.SamplingParams(top_p=0)


def test_sampling_refusals_list_the_settings_as_each_caller_spells_them(tiny_bundle):
    """The settings a sampling refusal lists are named as the caller gave them: keywords in Python, flags on the
    command line (no Python keyword in an error line), a seed only where one was given."""
    with pytest.raises(SpeccompileError) as refused:
        speccompile.SamplingParams(temperature=1.0, top_p=0)
    assert str(refused.value).endswith("top_p must be in (0, 1] (1 = off) (temperature=1.0, top_k=0, top_p=0)")
    assert refused.value.cli_message().endswith("(--temperature 1.0, --top-k 0, --top-p 0)")
    with pytest.raises(SpeccompileError, match=r"\(temperature=1.0, top_k=0, top_p=1.0, seed=-1\)$"):
        speccompile.SamplingParams(temperature=1.0, seed=-1)
    r = cli("generate", tiny_bundle, "hi", "--temperature", 1, "--top-p", 0)
    assert_cli_error(r, "--top-p must be in (0, 1]", "(--temperature 1.0, --top-k 0, --top-p 0.0)")
    assert "top_k=" not in r.output and "seed" not in r.output


def test_acceptance_on_a_bundle_without_drafters_is_named_as_each_caller_spells_it(tmp_path):
    out = str(tmp_path / "plain")
    build_bundle("tiny:llama", out, drafts=["none"], max_seq_len=64, progress=quiet)
    with pytest.raises(SpeccompileError, match="so acceptance='typical' would change nothing"):
        speccompile.load(out, threads=1).generate("hi", 4, temperature=1.0, acceptance="typical")
    assert_cli_error(cli("generate", out, "hi", "--max-new-tokens", 4, "--temperature", 1, "--acceptance", "typical"),
                     "so --acceptance typical would change nothing")


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


def _read_from(graph, location, constant=False):
    """The onnx ModelProto `graph` reading its initializers' data (or a Constant node's) from `location`."""
    import onnx
    if constant:
        tensor = onnx.TensorProto(name="c", data_type=onnx.TensorProto.FLOAT, dims=[4],
                                  data_location=onnx.TensorProto.EXTERNAL)
        for key, value in (("location", location), ("offset", "0"), ("length", "16")):
            tensor.external_data.add(key=key, value=value)
        graph.graph.node.append(onnx.helper.make_node("Constant", [], ["unused"], value=tensor))
        return
    for tensor in graph.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location


@pytest.mark.parametrize("graph_file, where", [("target.onnx", "parent"), ("target.onnx", "absolute"),
                                               ("target.onnx", "constant"), ("target.onnx", "manifest"),
                                               ("draft.kv_compact.onnx", "constant")])
def test_a_graph_reading_tensor_data_from_outside_the_bundle_is_refused_before_it_is_opened(
        bundle_copy, tmp_path, monkeypatch, graph_file, where):
    """A graph's external data names the file onnxruntime reads a tensor from: one outside the bundle (a copy of
    its weights, so that the graph would run) was read by onnxruntime releases that do not check the path, while
    inspect called the bundle verified. Refused by read_manifest, before onnxruntime opens any graph: a model's
    graph (its initializers, or a Constant node's tensor) or its KV compaction graph (opened on a GPU)."""
    import onnx
    shutil.copy(bundle_copy / "target.bin", tmp_path / "outside.bin")
    location = {"absolute": str(tmp_path / "outside.bin"), "manifest": "manifest.json"}.get(where, "../outside.bin")
    graph = onnx.load(str(bundle_copy / graph_file), load_external_data=False)
    _read_from(graph, location, constant=where == "constant")
    onnx.save(graph, str(bundle_copy / graph_file))
    _rehash(bundle_copy, graph_file)
    opened = []
    monkeypatch.setattr(onnxruntime, "InferenceSession", lambda *args, **kw: opened.append(args))
    name = "manifest.json" if where == "manifest" else "outside.bin"  # inside the bundle, but not hashed
    with pytest.raises(BundleError, match=f"{graph_file} reads tensor data from .*{name}"):
        speccompile.load(str(bundle_copy), threads=1)
    assert not opened
    assert_cli_error(cli("inspect", bundle_copy, "--no-verify"), graph_file, name, "does not list")


def test_not_a_bundle(tmp_path):
    assert_cli_error(cli("inspect", tmp_path), "no manifest.json")
    assert_cli_error(cli("generate", tmp_path / "missing", "hi"), "not found")


# ---- a bundle is trusted only as far as it is verified ------------------------------------------------------------
def test_unlisted_file_refused(bundle_copy):
    (bundle_copy / "tokenizer" / "chat_template.jinja").write_text("{{ cycler.__init__.__globals__ }}")
    with pytest.raises(BundleError, match="tokenizer/chat_template.jinja"):
        read_manifest(str(bundle_copy), verify_hashes=False)  # refused before any hash is read, too
    assert_cli_error(cli("inspect", bundle_copy), "does not list", "chat_template.jinja")
    assert_cli_error(cli("generate", bundle_copy, "hi"), "does not list")


def test_unlisted_link_refused(bundle_copy, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", bundle_copy / "extra")
    assert_cli_error(cli("inspect", bundle_copy), "does not list", "extra")


def test_manifest_linked_from_outside_refused(bundle_copy, tmp_path):
    """inspect (read_manifest) once read a manifest.json linked in from another folder, which load refused."""
    (tmp_path / "elsewhere").mkdir()
    os.rename(bundle_copy / "manifest.json", tmp_path / "elsewhere" / "manifest.json")
    os.symlink(tmp_path / "elsewhere" / "manifest.json", bundle_copy / "manifest.json")
    with pytest.raises(BundleError, match="outside the bundle"):
        read_manifest(str(bundle_copy))
    assert_cli_error(cli("inspect", bundle_copy), "manifest.json", "outside the bundle")


@pytest.mark.parametrize("edit, words", [
    (lambda m: m.pop("models"), ["(top level)", "models"]),
    (lambda m: m.pop("tokenizer"), ["tokenizer"]),
    (lambda m: m["models"]["target"]["kv_cache"].update(num_layers="4"), ["models/target/kv_cache/num_layers"]),
    (lambda m: m["models"]["target"].update(weights="target.bin"), ["models/target/weights"]),
    (lambda m: m["models"]["target"]["config"].update(hidden_size=-64), ["hidden_size"]),
    (lambda m: m.update(max_seq_len=10**12), ["max_seq_len"]),
    (lambda m: m["files"]["target.bin"].update(sha256="xyz"), ["files/target.bin/sha256"]),
    (lambda m: m["drafters"][0].update(num_draft=[4]), ["drafters/0/num_draft"]),
    (lambda m: m["drafters"][1].update(model="nowhere"), ["nowhere"]),
    (lambda m: m["models"]["target"].update(kind="medusa"), ["models/target"]),
])
def test_manifest_schema(bundle_copy, edit, words):
    _edit_manifest(bundle_copy, edit)
    with pytest.raises(BundleError):
        read_manifest(str(bundle_copy))
    assert_cli_error(cli("inspect", bundle_copy), *words)


def _rehash(bundle, rel):
    """Make the manifest vouch for the file as it now is (a bad build, not tampering)."""
    data = (bundle / rel).read_bytes()
    _edit_manifest(bundle, lambda m: m["files"].update({rel: {"sha256": hashlib.sha256(data).hexdigest(),
                                                              "bytes": len(data)}}))


def test_truncated_graph_with_matching_hash(bundle_copy):
    g = bundle_copy / "target.onnx"
    g.write_bytes(g.read_bytes()[: g.stat().st_size // 2])
    _rehash(bundle_copy, "target.onnx")
    read_manifest(str(bundle_copy))  # the hashes agree: only onnxruntime can tell
    with pytest.raises(BundleError, match="cannot load target.onnx"):
        speccompile.load(str(bundle_copy))
    assert_cli_error(cli("generate", bundle_copy, "hi"), "cannot load target.onnx")


def test_runtime_requirements_recorded_and_checked(bundle_copy):
    m = read_manifest(str(bundle_copy))
    assert m["runtime"]["onnxruntime"] == onnxruntime.__version__
    assert {"", "com.microsoft"} <= set(m["runtime"]["op_domains"])  # the fused attention is com.microsoft's
    _edit_manifest(bundle_copy, lambda m: m["runtime"]["op_domains"].update({"org.example.missing": 1}))
    assert_cli_error(cli("inspect", bundle_copy), "org.example.missing", "does not provide")


def test_a_graph_of_a_newer_contract_is_refused_at_load(bundle_copy):
    """A bundle from a newer speccompile (a graph version past the one this runtime reads) is one error naming the
    upgrade, not a failure mid-run; the current version loads."""
    from speccompile.graphs import DECODER_GRAPH_VERSION
    _edit_manifest(bundle_copy, lambda m: m["models"]["target"].update(graph_version=DECODER_GRAPH_VERSION + 1))
    assert_cli_error(cli("inspect", bundle_copy), "built by a newer speccompile", "upgrade speccompile")
    _edit_manifest(bundle_copy, lambda m: m["models"]["target"].update(graph_version=str(DECODER_GRAPH_VERSION + 1)))
    assert_cli_error(cli("inspect", bundle_copy), "graph_version")  # not a number: the version check cannot skip it
    _edit_manifest(bundle_copy, lambda m: m["models"]["target"].update(graph_version=DECODER_GRAPH_VERSION))
    read_manifest(str(bundle_copy))


def test_older_onnxruntime_warns(bundle_copy):
    _edit_manifest(bundle_copy, lambda m: m["runtime"].update(onnxruntime="99.0.0"))
    with pytest.warns(UserWarning, match="older than the 99.0.0"):
        read_manifest(str(bundle_copy))


def test_a_warning_is_one_line_on_the_command_line(bundle_copy):
    """As an error is one `error:` line: not Python's form, with a path and a source line from inside speccompile."""
    _edit_manifest(bundle_copy, lambda m: m["runtime"].update(onnxruntime="99.0.0"))
    result = subprocess.run([sys.executable, "-m", "speccompile.cli", "inspect", str(bundle_copy)],
                            capture_output=True, text=True)
    lines = result.stderr.splitlines()
    assert result.returncode == 0 and len(lines) == 1, result.stderr
    assert lines[0].startswith("warning: ") and "older than the 99.0.0" in lines[0], result.stderr


def test_bundle_without_runtime_section_still_loads(bundle_copy):
    """Bundles of this format version built before the section was recorded load as before."""
    _edit_manifest(bundle_copy, lambda m: m.pop("runtime"))
    result = cli("generate", bundle_copy, "hi", "--max-new-tokens", 4)
    assert result.exit_code == 0, result.output


def test_manifest_larger_than_any_build_writes_is_refused_unread(bundle_copy, monkeypatch):
    """The manifest is read before anything vouches for it: a huge (or sparse) one was read whole into memory."""
    path = bundle_copy / "manifest.json"
    limit = path.stat().st_size + 100
    monkeypatch.setattr(bundle_module, "MAX_MANIFEST_BYTES", limit, raising=False)
    path.write_text(path.read_text() + " " * 101)  # still valid JSON: only its size is wrong
    with pytest.raises(BundleError, match="larger than"):
        read_manifest(str(bundle_copy))
    assert_cli_error(cli("inspect", bundle_copy), "manifest.json", "larger than")


@pytest.mark.parametrize("drafter, model, kind", [("model", "target_batch", "decoder_batch"),
                                                  ("layerskip:2", "draft", None),
                                                  ("model", "draft", "batch_model")])
def test_drafter_naming_a_model_of_another_kind_is_refused(bundle_copy, drafter, model, kind):
    """A drafter naming the batched graph ran it with the inputs of a plain decoder: onnxruntime failed mid-run
    (exit 3); a drafter kind over another kind's graph failed in numpy; a batched form (batch_model) that is a
    single-sequence graph would take the slots' rows as one sequence's."""
    def edit(m):
        entry = next(d for d in m["drafters"] if d["name"] == drafter)
        entry["batch_model" if kind == "batch_model" else "model"] = model
        if kind is None:  # an MTP drafter over a plain decoder
            entry["kind"] = "mtp"
    _edit_manifest(bundle_copy, edit)
    with pytest.raises(BundleError, match=f"names model '{model}' of kind"):
        read_manifest(str(bundle_copy))
    assert_cli_error(cli("generate", bundle_copy, "hi", "--drafter", drafter), model, "it runs")


def test_graph_that_fails_when_run_is_a_bundle_error(bundle_copy):
    """A graph whose tensors do not fit together but whose hash matches (a bad build) loads, then fails in its first
    pass: onnxruntime raises a plain RuntimeError there, which reached the user as a bug (exit 3)."""
    import onnx
    graph = onnx.load(str(bundle_copy / "target.onnx"), load_external_data=False)
    norm = next(t for t in graph.graph.initializer if t.name == "final_norm")
    norm.dims[0] //= 2  # half the hidden size, read from the same place
    next(e for e in norm.external_data if e.key == "length").value = str(norm.dims[0] * 4)
    onnx.save(graph, str(bundle_copy / "target.onnx"))
    _rehash(bundle_copy, "target.onnx")
    with pytest.raises(BundleError, match="could not run target.onnx"):
        speccompile.load(str(bundle_copy), threads=1)
    assert_cli_error(cli("generate", bundle_copy, "hi"), "could not run target.onnx")


@pytest.mark.parametrize("edit, words", [
    (lambda m: m["models"]["target"]["config"].update(n_routed_experts="8"), ["n_routed_experts"]),
    (lambda m: m["models"]["target"]["config"].update(num_experts_per_tok=-1), ["num_experts_per_tok"]),
    (lambda m: m.update(dtype=["float16"]), ["dtype"]),
])
def test_manifest_fields_inspect_and_load_read_are_in_the_schema(bundle_copy, edit, words):
    """inspect and load (format/summary.py) read these too: a wrong type was a TypeError or KeyError (exit 3)."""
    _edit_manifest(bundle_copy, edit)
    with pytest.raises(BundleError, match="invalid manifest field"):
        read_manifest(str(bundle_copy))
    assert_cli_error(cli("inspect", bundle_copy), *words)


def test_expert_tensors_named_in_a_dense_model(bundle_copy):
    """A manifest naming an expert tensor for a model without routed experts: its step reads it whole (the
    estimate divided by n_routed_experts = 0)."""
    def edit(m):
        m["models"]["target"]["initializers"].append("l0.experts.down")
        m["weights"]["target.bin"]["l0.experts.down"] = {"offset": 0, "length": 4096}
        m["models"]["target"]["config"].update(n_routed_experts=0)
    _edit_manifest(bundle_copy, edit)
    result = cli("inspect", bundle_copy)
    assert result.exit_code == 0 and "decode step reads" in result.output, result.output


# ---- nothing lost on build ---------------------------------------------------------------------------------------
def test_force_refuses_what_is_not_a_bundle(tmp_path, monkeypatch):
    user = tmp_path / "notes"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    assert_cli_error(cli("build", "tiny:llama", "--out", user, "--force"), "only a speccompile bundle")
    plain = tmp_path / "file.txt"
    plain.write_text("keep")
    assert_cli_error(cli("build", "tiny:llama", "--out", plain, "--force"), "not a directory")
    assert (user / "thesis.tex").read_text() == "years of work" and plain.read_text() == "keep"
    assert no_leftovers(tmp_path) and sorted(os.listdir(tmp_path)) == ["file.txt", "notes"]


def test_force_refuses_working_and_home_directories(bundle_copy, monkeypatch):
    monkeypatch.chdir(bundle_copy / "tokenizer")
    assert_cli_error(cli("build", "tiny:llama", "--out", ".", "--force"), "working directory")
    assert_cli_error(cli("build", "tiny:llama", "--out", "..", "--force"), "working directory")
    monkeypatch.chdir(bundle_copy.parent.parent)
    monkeypatch.setenv("HOME", str(bundle_copy))
    assert_cli_error(cli("build", "tiny:llama", "--out", bundle_copy, "--force"), "home directory")
    read_manifest(str(bundle_copy))  # untouched


@pytest.mark.parametrize("version", [2, 0, None])
def test_force_replaces_a_bundle_of_another_format_version(bundle_copy, version):
    """Loading a bundle of another format version says to rebuild it; the rebuild with --force was refused as
    "holds no speccompile manifest.json". Still a bundle: replaced, but never with files its manifest does not list."""
    _edit_manifest(bundle_copy, lambda m: m.update(format_version=version))
    assert_cli_error(cli("inspect", bundle_copy), "rebuild the bundle")
    (bundle_copy / "my-notes.txt").write_text("mine")
    assert_cli_error(cli("build", "tiny:llama", "--out", bundle_copy, "--force"), "my-notes.txt")
    (bundle_copy / "my-notes.txt").unlink()
    result = cli("build", "tiny:llama", "--out", bundle_copy, "--force", "--max-seq-len", 64)
    assert result.exit_code == 0, result.output
    assert read_manifest(str(bundle_copy))["max_seq_len"] == 64


def test_force_refuses_a_bundle_holding_user_files(bundle_copy):
    (bundle_copy / "my-notes.txt").write_text("mine")
    assert_cli_error(cli("build", "tiny:llama", "--out", bundle_copy, "--force"), "my-notes.txt")
    assert (bundle_copy / "my-notes.txt").read_text() == "mine"


def test_empty_out_is_named(tmp_path, monkeypatch):
    """--out "" once became the working directory: "<cwd> already exists (pass --force to replace it)"."""
    monkeypatch.chdir(tmp_path)
    assert_cli_error(cli("build", "tiny:llama", "--out", ""), "--out is empty")
    with pytest.raises(BundleError, match="^out is empty"):  # build_bundle's keyword
        build_bundle("tiny:llama", " ", progress=quiet)
    assert os.listdir(tmp_path) == []


def test_an_out_of_bytes_is_refused_by_name(tmp_path):
    """A bytes path, or a path-like one that is bytes underneath (a folder os.scandir listed in bytes), would pass
    realpath and fail later, where the build joins it with str names."""
    (tmp_path / "b").mkdir()
    listed = next(os.scandir(os.fsencode(tmp_path)))
    for out in (os.fsencode(tmp_path / "c"), listed):
        with pytest.raises(BundleError, match=r"^out=.*b'.*: expected the bundle directory's path"):
            build_bundle("tiny:llama", out, progress=quiet)
    assert os.listdir(tmp_path) == ["b"] and os.listdir(tmp_path / "b") == []


def test_guard_output_refuses_an_overwrite_that_is_no_bool(tmp_path):
    """The decorator checks overwrite itself, before check_replaceable reads it: the string "no" is true, and
    would let the build replace a bundle."""
    from speccompile.format.output_dir import guard_output
    built = []

    @guard_output()
    def build(out, overwrite=False):
        built.append(out)

    with pytest.raises(BundleError, match="^overwrite='no': expected True or False"):
        build(str(tmp_path / "b"), overwrite="no")
    assert built == [] and os.listdir(tmp_path) == []


@pytest.mark.parametrize("umask", [0o077, 0o002], ids=["077", "002"])
def test_bundle_folder_mode_follows_the_umask(tmp_path, umask):
    """The bundle's folder was 0755 whatever the umask, unlike the files and the tokenizer folder in it."""
    old = os.umask(umask)
    try:
        build_bundle("tiny:llama", str(tmp_path / "b"), drafts=["lookup"], max_seq_len=64, progress=quiet)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "b", tmp_path / "b" / "tokenizer")}
    assert modes == {"b": 0o777 & ~umask, "tokenizer": 0o777 & ~umask}
    assert (tmp_path / "b" / "manifest.json").stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="the umask is read from /proc on Linux only")
def test_the_umask_is_read_without_setting_it(monkeypatch):
    """Learning the umask by setting it to 0 left a moment in which another thread's new files (a server's context
    cache) were created world-writable."""
    from speccompile.format.atomic import as_created
    old = os.umask(0o027)
    os.umask(old)
    try:
        os.umask(0o027)
        monkeypatch.setattr(os, "umask", lambda mask: pytest.fail(f"umask set to {mask:o}"))
        assert as_created(0o777) == 0o750
    finally:
        monkeypatch.undo()
        os.umask(old)


def test_force_through_a_link_to_a_bundle_rebuilds_where_it_points(tmp_path):
    """--out a symbolic link to a bundle, with --force: the new folder replaced the link, the old bundle stayed."""
    build_bundle("tiny:llama", str(tmp_path / "v1"), drafts=["lookup"], max_seq_len=64, progress=quiet)
    (tmp_path / "current").symlink_to(tmp_path / "v1")
    build_bundle("tiny:llama", str(tmp_path / "current"), drafts=["lookup"], max_seq_len=96, overwrite=True,
                 progress=quiet)
    assert (tmp_path / "current").is_symlink() and os.readlink(tmp_path / "current") == str(tmp_path / "v1")
    assert read_manifest(str(tmp_path / "v1"))["max_seq_len"] == 96
    assert sorted(os.listdir(tmp_path)) == ["current", "v1"]


def test_an_interrupt_just_after_an_atomic_rename_stays_an_interrupt(tmp_path, monkeypatch):
    """Ctrl-C right after the temporary file was renamed into place: the cleanup's unlink of the gone temporary
    raised FileNotFoundError, which replaced the interrupt."""
    from speccompile.format import atomic
    replace = os.replace

    def replaced_then_interrupted(src, dst):
        replace(src, dst)
        raise KeyboardInterrupt
    monkeypatch.setattr(atomic.os, "replace", replaced_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic.write_atomically(str(tmp_path / "f.json"), lambda f: f.write(b"{}"))
    assert os.listdir(tmp_path) == ["f.json"]


def test_a_folder_reaches_the_disk_before_it_replaces_the_earlier_one(tmp_path, monkeypatch):
    """replace_folder (a bundle, an EAGLE head folder) fsyncs every staged file before its first rename: else a
    power cut after the rename could leave empty files where the earlier folder was."""
    from speccompile.format import atomic
    staged, out = tmp_path / "staged", tmp_path / "out"
    (staged / "sub").mkdir(parents=True)
    (staged / "a.bin").write_bytes(b"a")
    (staged / "sub" / "b.bin").write_bytes(b"b")
    out.mkdir()
    synced, rename = [], os.rename
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")))
    monkeypatch.setattr(atomic.os, "rename", lambda a, b: (synced.append("rename"), rename(a, b)))
    atomic.replace_folder(str(staged), str(out))
    first_rename = synced.index("rename")
    assert {str(staged / "a.bin"), str(staged / "sub" / "b.bin"), str(staged)} <= set(synced[:first_rename])
    assert (out / "sub" / "b.bin").read_bytes() == b"b"


def test_a_named_pipe_called_manifest_above_out_does_not_hang_the_build(tmp_path):
    """build --out looks for a bundle in every folder above it; a named pipe named manifest.json there made it wait
    for a writer for ever."""
    import threading
    from speccompile.format import output_dir as bundle_format
    os.mkfifo(tmp_path / "manifest.json")
    checked = threading.Thread(target=bundle_format._refuse_inside_bundle, args=(str(tmp_path / "out"),), daemon=True)
    checked.start()
    checked.join(timeout=10)
    hung = checked.is_alive()
    if hung:  # let the old code's open() return, so the thread ends
        os.close(os.open(tmp_path / "manifest.json", os.O_WRONLY | os.O_NONBLOCK))
    assert not hung


def test_a_refused_move_aside_leaves_nothing_beside_out(bundle_copy, monkeypatch):
    """The old bundle could not be moved aside (--out a mount point: EBUSY): its empty aside folder stayed."""
    from speccompile.format import output_dir as bundle_format
    before = read_manifest(str(bundle_copy))
    real_rename = os.rename

    def rename(src, dst):
        if os.path.abspath(src) == os.path.abspath(bundle_copy):
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), src)
        real_rename(src, dst)
    monkeypatch.setattr(bundle_format.os, "rename", rename)
    assert_cli_error(cli("build", "tiny:llama", "--out", bundle_copy, "--force", "--max-seq-len", 64),
                     os.strerror(errno.EBUSY), "nothing was replaced")
    monkeypatch.undo()
    assert read_manifest(str(bundle_copy)) == before and no_leftovers(bundle_copy.parent)


def test_existence_checked_before_any_work(bundle_copy, monkeypatch):
    def never(*a, **k):
        raise AssertionError("the checkpoint was loaded before --out was checked")
    monkeypatch.setattr(driver, "load_checkpoint", never)
    assert_cli_error(cli("build", "tiny:llama", "--out", bundle_copy), "already exists")


def test_force_replaces_a_bundle(bundle_copy):
    result = cli("build", "tiny:llama", "--out", bundle_copy, "--force", "--max-seq-len", 64)
    assert result.exit_code == 0, result.output
    assert read_manifest(str(bundle_copy))["max_seq_len"] == 64
    assert no_leftovers(bundle_copy.parent) and not [n for n in os.listdir(bundle_copy.parent) if "lock" in n]


def test_a_bundle_is_never_built_inside_another(bundle_copy):
    """Its manifest would not list the new folder: the outer bundle would stop loading, and --force refuse it."""
    assert_cli_error(cli("build", "tiny:llama", "--out", bundle_copy / "sub", "--max-seq-len", 64), "inside the bundle")
    assert_cli_error(cli("build", "tiny:llama", "--out", bundle_copy / "tokenizer" / "b", "--max-seq-len", 64),
                     "inside the bundle")
    assert not (bundle_copy / "sub").exists()
    read_manifest(str(bundle_copy))


def test_an_interrupt_between_the_renames_leaves_the_old_bundle(bundle_copy, monkeypatch):
    """Ctrl-C after the old bundle was moved aside and before the new one took its place once left --out missing."""
    from speccompile.format import output_dir as bundle_format
    before = read_manifest(str(bundle_copy))
    renames = []
    real_rename = os.rename

    def rename(src, dst):
        renames.append(dst)
        if len(renames) == 2 and os.path.abspath(dst) == os.path.abspath(bundle_copy):
            raise KeyboardInterrupt
        real_rename(src, dst)
    monkeypatch.setattr(bundle_format.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        driver.build_bundle("tiny:llama", str(bundle_copy), max_seq_len=64, overwrite=True, progress=lambda m: None)
    monkeypatch.undo()
    assert len(renames) == 3 and read_manifest(str(bundle_copy)) == before  # aside, refused, put back
    assert no_leftovers(bundle_copy.parent)


def test_sigterm_during_a_build_cleans_up(tmp_path):
    """A kill (SIGTERM) exits as Ctrl-C does: no lock or temporary folder left beside --out, no half bundle."""
    import signal
    import time
    out = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, "-m", "speccompile.cli", "build", "tiny:llama", "--out", str(out),
                             "--max-seq-len", "64"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None and not any(".speccompile" in n for n in os.listdir(tmp_path)):
        time.sleep(0.01)  # until the build holds its lock
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    assert proc.returncode in (0, 128 + signal.SIGTERM), proc.stderr.read()
    assert os.listdir(tmp_path) in ([], ["b"]) and no_leftovers(tmp_path)
    if out.exists():
        read_manifest(str(out))


def test_two_builds_to_one_out(tmp_path):
    out = tmp_path / "b"
    with output_lock(str(out)):
        other = subprocess.run([sys.executable, "-m", "speccompile.cli", "build", "tiny:llama", "--out", str(out)],
                               capture_output=True, text=True)
    assert other.returncode == 2 and "another build is writing" in other.stderr, other.stderr
    assert not out.exists() and os.listdir(tmp_path) == []  # the lock file goes with the lock


def test_stale_temp_folders_cleaned(tmp_path):
    out, other = tmp_path / "b", tmp_path / "c"
    stale = tmp_path / (_temp_prefix("build", str(out)) + "killed")
    stale.mkdir()
    (stale / "target.bin").write_bytes(b"\0" * 1000)
    not_ours = tmp_path / (_temp_prefix("build", str(other)) + "running")
    not_ours.mkdir()
    build_bundle("tiny:llama", str(out), drafts=["lookup"], max_seq_len=64, progress=quiet)
    assert not stale.exists() and not_ours.exists()


@pytest.mark.parametrize("inner", ["earlier", "b"], ids=["today", "builds before format.atomic"])
def test_killed_swap_restores_the_old_bundle(bundle_copy, monkeypatch, inner):
    """A build killed between moving the old bundle aside and moving the new one in: the next build puts it back
    before deciding anything."""
    from speccompile.format.atomic import ASIDE
    assert ASIDE == "earlier"
    aside = bundle_copy.parent / (_temp_prefix("old", str(bundle_copy)) + "killed")
    aside.mkdir()
    os.rename(bundle_copy, aside / inner)
    monkeypatch.setattr(driver, "load_checkpoint", lambda *a, **k: pytest.fail("--out checked after work began"))
    assert_cli_error(cli("build", "tiny:llama", "--out", bundle_copy), "already exists")
    read_manifest(str(bundle_copy))
    assert not aside.exists()


def test_full_disk_keeps_the_old_bundle(bundle_copy, monkeypatch):
    before = (bundle_copy / "manifest.json").read_bytes()

    def disk_full(path, weights, location):
        with open(path, "wb") as f:
            f.write(b"\0" * 4096)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    monkeypatch.setattr(driver, "write_weights", disk_full)
    assert_cli_error(cli("build", "tiny:llama", "--out", bundle_copy, "--force"), "No space left on device",
                     "nothing was replaced")
    assert (bundle_copy / "manifest.json").read_bytes() == before
    read_manifest(str(bundle_copy))
    assert no_leftovers(bundle_copy.parent)


# ---- numbers checked at the edge ---------------------------------------------------------------------------------
@pytest.mark.parametrize("change, words", [
    (dict(num_attention_heads=0), ["num_attention_heads"]),
    (dict(num_attention_heads=[4]), ["num_attention_heads", "[4]"]),
    (dict(hidden_size="64"), ["hidden_size", "integer"]),
    (dict(num_hidden_layers=10**9), ["num_hidden_layers", "out of range"]),
    (dict(vocab_size=-5), ["vocab_size"]),
    (dict(num_attention_heads=3, head_dim=None), ["multiple of num_attention_heads"]),
    (dict(num_key_value_heads=3), ["num_key_value_heads"]),
    (dict(eos_token_id=10**6), ["eos_token_id"]),
    (dict(rms_norm_eps=float("nan")), ["rms_norm_eps"]),
    (dict(tie_word_embeddings="yes"), ["tie_word_embeddings"]),
    (dict(rope_scaling=[1, 2]), ["rope_scaling"]),
    (dict(model_type="qwen2", use_sliding_window=True, sliding_window=8, max_window_layers="1"),
     ["max_window_layers", "'1'"]),
    (dict(model_type="gemma3_text", sliding_window=8, sliding_window_pattern=0), ["sliding_window_pattern", "0"]),
    (dict(hidden_act=["silu"]), ["activation", "['silu']"]),
    (dict(quantization_config={"quant_method": "bitsandbytes", "load_in_8bit": True}),
     ["quant_method", "bitsandbytes"]),
    (dict(quantization_config={"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}),  # written before quant_method
     ["quant_method", "bitsandbytes"]),
])
def test_bad_config_values(hf_dir, tmp_path, change, words):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg.update(change)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    t0 = time.perf_counter()
    assert_cli_error(cli("build", hf_dir, "--out", tmp_path / "out"), *words)
    assert time.perf_counter() - t0 < 30  # fails at the config, before sizing anything from it
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)


@pytest.mark.parametrize("change, words", [
    (dict(model_type="qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=None),
     ["max_window_layers", "None"]),
    (dict(model_type="gemma3_text", sliding_window=8, sliding_window_pattern=None), ["sliding_window_pattern"]),
])
def test_null_config_values(hf_dir, tmp_path, change, words):
    """JSON null where a number belongs: one error line, as for any other value of the wrong type."""
    cfg = json.loads((hf_dir / "config.json").read_text()) | change
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    assert_cli_error(cli("build", hf_dir, "--out", tmp_path / "out"), *words)


# ---- tensors that are not float weights --------------------------------------------------------------------------
def retype_tensor(st, name: str, dtype: str, data: bytes, shape, extra: dict | None = None) -> None:
    """Rewrite the safetensors file st with tensor `name` stored as `dtype` (a safetensors dtype numpy may lack:
    the file format is an 8-byte header length, the JSON header, then the data)."""
    from safetensors.numpy import load_file
    tensors = {k: ("F32", v.shape, v.astype("<f4").tobytes()) for k, v in load_file(str(st)).items()}
    tensors[name] = (dtype, shape, data)
    for k, v in (extra or {}).items():
        tensors[k] = ("F32", v.shape, v.astype("<f4").tobytes())
    header, blob = {}, b""
    for k, (dt, shp, raw) in tensors.items():
        header[k] = {"dtype": dt, "shape": list(shp), "data_offsets": [len(blob), len(blob) + len(raw)]}
        blob += raw
    head = json.dumps(header).encode()
    st.write_bytes(len(head).to_bytes(8, "little") + head + blob)


@pytest.mark.parametrize("dtype, width", [("I8", 1), ("I32", 4), ("BOOL", 1), ("U8", 1), ("F8_E5M2", 1)])
def test_integer_and_other_tensors_refused(hf_dir, tmp_path, dtype, width):
    """Integer and boolean tensors are a quantization's codes (int8, bitsandbytes, GPTQ packs) or masks, not
    weights, and float8 e5m2 is not read: each is one error naming the tensor and its dtype, never a float32 cast."""
    retype_tensor(hf_dir / "model.safetensors", "model.norm.weight", dtype, bytes(64 * width), (64,))
    assert_cli_error(cli("build", hf_dir, "--out", tmp_path / "out"), "model.norm.weight", dtype)


def test_fp8_vector_with_block_scales(hf_dir, tmp_path):
    import numpy as np
    retype_tensor(hf_dir / "model.safetensors", "model.norm.weight", "F8_E4M3", bytes(64), (64,),
                  {"model.norm.weight_scale_inv": np.ones(1, np.float32)})
    assert_cli_error(cli("build", hf_dir, "--out", tmp_path / "out"), "model.norm.weight", "(64,)", "matrices")


def test_per_tensor_fp8_is_refused_naming_its_scale(hf_dir, tmp_path):
    """AutoFP8's and llm-compressor's FP8 (a per-tensor or per-channel X.weight_scale, no block scales): one error
    naming that layout and what to use instead (it said only that the block scales were missing)."""
    import numpy as np
    retype_tensor(hf_dir / "model.safetensors", "model.layers.0.mlp.up_proj.weight", "F8_E4M3", bytes(128 * 64),
                  (128, 64), {"model.layers.0.mlp.up_proj.weight_scale": np.ones((), np.float32)})
    assert_cli_error(cli("build", hf_dir, "--out", tmp_path / "out"), "model.layers.0.mlp.up_proj.weight_scale'",
                     "per-tensor or per-channel FP8", "float original")


def test_quantized_tensors_refused_before_any_weight_is_read(hf_dir, tmp_path, monkeypatch):
    """A tensor that is no float weight, in the last of several files (a quantized checkpoint without a
    quantization_config), is refused from the headers, before any file is hashed or read."""
    from speccompile.compile import sources
    for i in (1, 2):
        shutil.copy(hf_dir / "model.safetensors", hf_dir / f"model-0000{i}-of-00002.safetensors")
    (hf_dir / "model.safetensors").unlink()
    retype_tensor(hf_dir / "model-00002-of-00002.safetensors", "model.layers.0.mlp.up_proj.qweight", "I32",
                  bytes(8 * 128 * 4), (8, 128))

    def no_hashing(path, *_):
        raise AssertionError(f"{path} hashed")
    monkeypatch.setattr(sources, "sha256_file", no_hashing)
    with pytest.raises(CheckpointError, match=r"00002\.safetensors: tensor 'model\.layers\.0\.mlp\.up_proj\.qweight' "
                                              r"is stored as I32 \(qweight/qzeros tensors: a GPTQ or AWQ checkpoint\)"):
        load_checkpoint(str(hf_dir), progress=quiet)


@pytest.mark.parametrize("text, words", [
    ('{"eos_token_id": "2"}', ["eos_token_id", "'2'"]), ('{"eos_token_id": [2, true]}', ["eos_token_id", "True"]),
    ('{"eos_token_id": [[2]]}', ["eos_token_id"]), ('{"eos_token_id": 100000}', ["eos_token_id", "vocabulary"]),
    ("[1]", ["JSON object"]), ("{not json", ["corrupt"]),
])
def test_bad_generation_config(hf_dir, tmp_path, text, words):
    (hf_dir / "generation_config.json").write_text(text)
    assert_cli_error(cli("build", hf_dir, "--out", tmp_path / "out"), "generation_config.json", *words)


def test_weight_index_naming_a_missing_file(hf_dir, tmp_path):
    os.rename(hf_dir / "model.safetensors", hf_dir / "model-00001-of-00002.safetensors")  # the index is read then
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}))
    assert_cli_error(cli("build", hf_dir, "--out", tmp_path / "out"), "model-00002-of-00002.safetensors", "missing")
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "../elsewhere.safetensors"}}))
    assert_cli_error(cli("build", hf_dir, "--out", tmp_path / "out"), "elsewhere")


# ---- one error path in the CLI -----------------------------------------------------------------------------------
def test_prompt_not_utf8(tiny_bundle):
    assert_cli_error(cli("generate", tiny_bundle, "caf\udce9"), "PROMPT", "UTF-8")
    # as a shell passes it: bytes that are not UTF-8 reach Python as surrogate escapes
    result = subprocess.run([sys.executable, "-m", "speccompile.cli", "generate", tiny_bundle.encode(), b"caf\xe9"],
                            capture_output=True, env={**os.environ, "LC_ALL": "C.UTF-8"})
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == 2 and stderr.count("error:") == 1 and "UTF-8" in stderr, stderr


def test_unexpected_error_is_one_line_and_a_hint(tiny_bundle, monkeypatch):
    def bug(*a, **k):
        raise KeyError("a bug")
    monkeypatch.setattr(bundle_module, "read_manifest", bug)
    result = cli("inspect", tiny_bundle)
    assert result.exit_code == 3 and "Traceback" not in result.output, result.output
    assert result.output.startswith("error: internal error (KeyError") and "report it" in result.output
    debug = CliRunner().invoke(main, ["--debug", "inspect", str(tiny_bundle)])
    assert debug.exit_code == 3 and "Traceback" in debug.output and "a bug" in debug.output
    monkeypatch.setenv("SPECCOMPILE_DEBUG", "1")
    assert "Traceback" in cli("inspect", tiny_bundle).output


def test_os_and_onnxruntime_errors_are_error_lines(tiny_bundle, tmp_path, monkeypatch):
    assert_cli_error(cli("bench", tiny_bundle, "--dataset", tmp_path / "missing.jsonl", "--limit", 1))

    def run_fails(self, *a, **k):
        raise onnxruntime.capi.onnxruntime_pybind11_state.RuntimeException("[ONNXRuntimeError] : 6 : boom\nline 2")
    monkeypatch.setattr(onnxruntime.InferenceSession, "run_with_iobinding", run_fails)
    assert_cli_error(cli("generate", tiny_bundle, "hi"), "onnxruntime", "boom line 2")


def test_a_draft_head_graph_onnxruntime_cannot_load_is_a_bundle_error(tmp_path):
    """Draft heads' own sessions (Medusa, EAGLE-3's fc) open through the engine's one door: a corrupt graph is one
    BundleError, not onnxruntime's exception."""
    from speccompile.errors import BundleError
    from speccompile.runtime.engine import open_session, session_options
    bad = tmp_path / "medusa.onnx"
    bad.write_bytes(b"\x08\x07not a model")
    with pytest.raises(BundleError, match="cannot load medusa.onnx"):
        open_session(str(bad), session_options(1), ["CPUExecutionProvider"])


def test_tokenizer_checked_before_the_weights_are_read(hf_dir, tmp_path):
    """A directory with a sentencepiece tokenizer.model and no tokenizer.json fails at once, saying so, without
    reading (possibly hundreds of GB of) weights first."""
    os.remove(hf_dir / "tokenizer.json")
    (hf_dir / "tokenizer.model").write_bytes(b"\n\x05hello")
    said = []
    with pytest.raises(CheckpointError, match="no tokenizer.json.*tokenizer.model alone is not read"):
        load_checkpoint(str(hf_dir), progress=said.append)
    assert not [s for s in said if "loading weights" in s]
    assert_cli_error(cli("build", hf_dir, "--out", tmp_path / "out"), "tokenizer.json", "tokenizer.model")


def test_an_output_head_the_config_does_not_name_is_refused(tmp_path):
    """Tied in config.json, a lm_head.weight unlike the embedding has two readings (transformers 5 takes it,
    transformers 4 and vLLM the embedding): refused, never guessed; one equal to it builds. Untied, a missing
    lm_head.weight names tie_word_embeddings."""
    from safetensors.numpy import load_file, save_file
    tied, untied = tmp_path / "tied", tmp_path / "untied"
    save_hf_dir(load_checkpoint("tiny:llama"), str(tied))  # tie_word_embeddings: true
    weights = load_file(str(tied / "model.safetensors"))
    save_file(weights | {"lm_head.weight": weights["model.embed_tokens.weight"] + 1}, str(tied / "model.safetensors"))
    assert_cli_error(cli("build", tied, "--out", tmp_path / "o1"), "tie_word_embeddings", "lm_head.weight")
    assert not (tmp_path / "o1").exists()
    save_file(weights | {"lm_head.weight": weights["model.embed_tokens.weight"]}, str(tied / "model.safetensors"))
    build_bundle(str(tied), str(tmp_path / "o2"), drafts=[], max_seq_len=64, progress=quiet)
    save_hf_dir(load_checkpoint("tiny:qwen2"), str(untied))  # tie_word_embeddings: false
    weights = load_file(str(untied / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if k != "lm_head.weight"}, str(untied / "model.safetensors"))
    assert_cli_error(cli("build", untied, "--out", tmp_path / "o3"), "'lm_head.weight'", "tie_word_embeddings")
