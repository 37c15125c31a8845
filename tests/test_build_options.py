"""Every option of `speccompile build` reaches the bundle and is recorded in its manifest as the runtime reads it,
and the defaults are the documented ones (README "CLI", docs/design.md "Bundle format")."""
import dataclasses
import json

import onnx
import pytest
from click.testing import CliRunner

import speccompile
from speccompile.cli import main
from speccompile.compile.presets import tiny_checkpoint, tiny_mtp_head
from speccompile.format.trees import TreeSpec
from speccompile.graphs import BATCH_GRAPH_VERSION, DECODER_GRAPH_VERSION

safetensors_numpy = pytest.importorskip("safetensors.numpy")


def build(out, *args):
    """`speccompile build` through the CLI; the manifest it wrote."""
    r = CliRunner().invoke(main, ["build", *map(str, args), "--out", str(out)])
    assert r.exit_code == 0, r.output
    return json.loads((out / "manifest.json").read_text())


def refused(out, *args) -> str:
    r = CliRunner().invoke(main, ["build", *map(str, args), "--out", str(out)])
    assert r.exit_code != 0 and r.output.startswith("error: ") and len(r.output.strip().splitlines()) == 1, r.output
    return r.output


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    path = tmp_path_factory.mktemp("head") / "head.safetensors"
    safetensors_numpy.save_file(tiny_mtp_head(tiny_checkpoint("llama").config), str(path))
    return path


def test_the_sizes_and_drafters_asked_for_are_what_the_bundle_loads_with(tmp_path):
    m = build(tmp_path / "b", "tiny:llama", "--max-seq-len", 96, "--max-batch", 3, "--num-draft", 6,
              "--draft", "layerskip:2", "--draft", "lookup:5", "--draft", "model:tiny:llama-draft")
    assert m["max_seq_len"] == 96
    assert {name: e["kv_cache"]["max_seq_len"] for name, e in m["models"].items()} == dict.fromkeys(m["models"], 96)
    assert m["models"]["target_batch"]["max_batch"] == 3
    assert [(d["name"], d["num_draft"], d["tree"]) for d in m["drafters"]] == [
        ("layerskip:2", 6, None), ("lookup", 6, None), ("model", 6, None)]
    assert m["drafters"][1]["max_ngram"] == 5
    assert m["models"]["draft"]["source"]["path"] == "tiny:llama-draft"
    g = speccompile.load(str(tmp_path / "b"), threads=1)
    assert g.max_seq_len == 96 and g.drafter_names == ["layerskip:2", "lookup", "model"]
    assert g.num_draft == {"layerskip:2": 6, "lookup": 6, "model": 6} and g.drafters["lookup"].max_ngram == 5
    assert len(g.scheduler.slots) == 3


def test_every_model_records_the_contract_of_its_graph(tmp_path, head):
    m = build(tmp_path / "b", "tiny:llama", "--max-seq-len", 64, "--draft", f"mtp:{head}", "--draft", "layerskip:1")
    versions = {name: e.get("graph_version") for name, e in m["models"].items()}
    assert versions == {"target": DECODER_GRAPH_VERSION, "target_batch": BATCH_GRAPH_VERSION,
                        "mtp_head": DECODER_GRAPH_VERSION, "mtp_head_batch": BATCH_GRAPH_VERSION,
                        "early_exit_1": DECODER_GRAPH_VERSION, "early_exit_1_batch": BATCH_GRAPH_VERSION}
    source = m["models"]["mtp_head"]["source"]
    assert source["path"] == str(head) and len(source["sha256"]) == 64


def test_a_tree_reaches_every_drafter(tmp_path, head):
    tree = "dynamic:3+lookup:2"
    m = build(tmp_path / "b", "tiny:llama", "--max-seq-len", 64, "--tree", tree, "--draft", "lookup",
              "--draft", f"mtp:{head}")
    assert [(d["name"], d["tree"]) for d in m["drafters"]] == [(n, TreeSpec.parse(tree).to_dict())
                                                                for n in ("lookup", "mtp")]
    g = speccompile.load(str(tmp_path / "b"), threads=1)
    assert g.trees == dict.fromkeys(["lookup", "mtp"], TreeSpec.parse(tree))


def test_the_defaults_are_the_documented_ones(tmp_path, head):
    m = build(tmp_path / "b", "tiny:llama", "--draft", f"mtp:{head}", "--draft", "lookup")
    assert (m["max_seq_len"], m["dtype"], m["backend"], m["quantization"]["option"]) == (
        2048, "float32", "onnxruntime", "source")
    assert m["models"]["target_batch"]["max_batch"] == 4
    assert {e["attention"] for e in m["models"].values()} == {"ort"}
    assert "head_screen.codes" in m["weights"]["target.bin"]  # --head-screen
    assert [(d["name"], d["num_draft"], d["tree"]) for d in m["drafters"]] == [
        ("mtp", 2, TreeSpec.parse("dynamic:2+lookup:6").to_dict()), ("lookup", 4, None)]
    assert m["drafters"][1]["max_ngram"] == 3
    assert any(r["dtype"] == "uint8" for r in m["weights"]["mtp.bin"].values())  # --draft-precision int8
    # over a 4-bit target, whose passes verify one path (docs: adaptive+lookup:6, lookup adaptive)
    m = build(tmp_path / "q", "tiny:llama", "--max-seq-len", 64, "--weights", "int4", "--draft", f"mtp:{head}",
              "--draft", "lookup")
    assert [d["tree"] for d in m["drafters"]] == [TreeSpec.parse(t).to_dict() for t in ("adaptive+lookup:6",
                                                                                          "adaptive")]


def test_the_build_options_of_the_graphs_reach_them(tmp_path, head):
    m = build(tmp_path / "b", "tiny:llama", "--max-seq-len", 64, "--draft", f"mtp:{head}", "--draft-precision",
              "float32", "--no-head-screen", "--weights", "int8", "--max-batch", 1)
    assert "target_batch" not in m["models"] and m["quantization"]["option"] == "int8"
    assert {r["dtype"] for r in m["weights"]["mtp.bin"].values()} == {"float32"}
    assert not any(n.startswith("head_screen.") for n in m["weights"]["target.bin"])
    m = build(tmp_path / "r", "tiny:llama", "--max-seq-len", 64, "--attention", "reference", "--draft", "layerskip:1")
    assert {e["attention"] for e in m["models"].values()} == {"reference"}
    assert not any(n.startswith("head_screen.") for n in m["weights"]["target.bin"])  # it needs the fused kernels
    for name in m["models"]:  # standard ONNX ops only
        graph = onnx.load(str(tmp_path / "r" / m["models"][name]["graph"]), load_external_data=False).graph
        assert {n.domain for n in graph.node} <= {"", "ai.onnx"}, name
    m = build(tmp_path / "h", "tiny:llama", "--max-seq-len", 64, "--dtype", "float16", "--draft", "none")
    assert m["dtype"] == "float16" and m["models"]["target"]["kv_cache"]["dtype"] == "float16"
    assert speccompile.load(str(tmp_path / "r"), threads=1).generate([5, 6, 7], 4).token_ids


def test_an_existing_bundle_is_replaced_only_with_force(tmp_path):
    build(tmp_path / "b", "tiny:llama", "--max-seq-len", 64, "--draft", "none")
    assert "--force" in refused(tmp_path / "b", "tiny:llama", "--max-seq-len", 32, "--draft", "none")
    assert build(tmp_path / "b", "tiny:llama", "--max-seq-len", 32, "--draft", "none", "--force")["max_seq_len"] == 32


@pytest.mark.parametrize("option", [["--num-draft", "3"], ["--tree", "chain:3"]])
def test_drafting_options_for_no_drafter_are_refused(tmp_path, option):
    """A bundle without drafters verifies nothing: its drafting options would be dropped without a word (generate
    refuses them on such a bundle alike)."""
    assert "--draft none" in refused(tmp_path / "b", "tiny:llama", "--max-seq-len", 64, "--draft", "none", *option)
    assert not (tmp_path / "b").exists()


def test_the_longest_chain_asked_for_is_the_one_recorded(tmp_path):
    """--num-draft's upper bound reaches every drafter as given: a cut is said (Medusa's head count), never silent."""
    r = CliRunner().invoke(main, ["build", "tiny:llama", "--max-seq-len", "64", "--num-draft", "16", "--draft",
                                  "lookup", "--draft", "layerskip:1", "--out", str(tmp_path / "b")])
    assert r.exit_code == 0 and "is cut" not in r.output, r.output
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert [d["num_draft"] for d in m["drafters"]] == [16, 16]
    assert speccompile.load(str(tmp_path / "b"), threads=1).num_draft == {"lookup": 16, "layerskip:1": 16}


def test_the_compiler_drivers_defaults_are_the_clis():
    """build_bundle (the API README names) builds what `speccompile build` does when an option is left out."""
    from speccompile.cli.build import build as build_command
    from speccompile.compile.drafters.base import BuildOptions
    api = BuildOptions()
    shared = [p for p in build_command.params if p.name in {f.name for f in dataclasses.fields(api)}]
    assert {p.name for p in shared} >= {"weights", "dtype", "draft_precision", "max_batch", "attention", "backend"}
    assert {p.name: p.default for p in shared} == {p.name: getattr(api, p.name) for p in shared}


@pytest.mark.parametrize("keywords, says", [
    (dict(max_seq_len="64"), "max_seq_len='64': expected a whole number"),
    (dict(max_batch=None), "max_batch=None: expected a whole number"),  # None only where the field takes it
    (dict(dtype=None), "dtype=None: expected a string"),
    (dict(num_draft=2.5), "num_draft=2.5: expected a whole number"),
    (dict(max_batch=True), "max_batch=True: expected a whole number"),
    (dict(tree=3), "tree=3: expected a string"),
    (dict(fused="no"), "fused='no': expected True or False"),
    (dict(overwrite="no"), "overwrite='no': expected True or False"),  # "no" is true: it would replace a bundle
    (dict(drafts="lookup"), "drafts='lookup': expected a list of drafter specs"),  # else read one letter a drafter
    (dict(drafts=[3]), "drafts=[3]: expected a list of drafter specs"),
    (dict(attention="bogus"), "attention='bogus': choose auto, ort, kernel, reference, plugin"),
    (dict(out=3), "out=3: expected the bundle directory's path"),
    (dict(source=3), "source=3: expected a checkpoint's path or name"),
])
def test_build_bundle_refuses_keywords_of_the_wrong_type(tmp_path, keywords, says):
    """build_bundle's keywords are checked as click checks the CLI's flags: one SpeccompileError naming the
    keyword, before anything is written (they were TypeErrors and AttributeErrors from deep in the build, or
    read wrongly)."""
    from speccompile.compile.driver import build_bundle
    from speccompile.errors import SpeccompileError
    args = dict(source="tiny:llama", out=str(tmp_path / "b"), progress=lambda m: None) | keywords
    with pytest.raises(SpeccompileError) as refusal:
        build_bundle(**args)
    assert str(refusal.value).startswith(says), refusal.value
    assert not (tmp_path / "b").exists()


def test_build_bundle_takes_numpy_integers(tmp_path):
    """A numpy integer is a whole number: taken, and written into the manifest as a plain one."""
    import numpy as np
    from speccompile.compile.driver import build_bundle
    build_bundle("tiny:llama", str(tmp_path / "b"), drafts=["none"], max_seq_len=np.int64(32), progress=lambda m: None)
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["max_seq_len"] == 32


def test_the_default_drafters_put_first_what_decodes_faster(monkeypatch):
    """With a head shipped for the target: over speccompile's kernels prompt lookup first (the head's pass no longer
    pays for itself there), over onnxruntime's products the head first; without one, lookup alone."""
    from speccompile.compile import driver
    monkeypatch.setattr(driver, "shipped_head", lambda target: "head.safetensors")
    kinds = lambda kernels: [d.kind for d in driver._default_drafters(None, kernels, lambda *_: None)]  # noqa: E731
    assert kinds(True) == ["lookup", "mtp"] and kinds(False) == ["mtp", "lookup"]
    monkeypatch.setattr(driver, "shipped_head", lambda target: None)
    assert kinds(True) == kinds(False) == ["lookup"]
