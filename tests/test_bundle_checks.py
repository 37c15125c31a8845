"""What read_manifest checks of a bundle, check by check: each test breaks one thing the loader must refuse, and
requires one BundleError naming it, from the Python API and as one `error:` line from the CLI (docs/guarantees.md,
"What is verified when a bundle is loaded")."""
import hashlib
import json
import os
import shutil

import pytest
from click.testing import CliRunner

import speccompile
from speccompile.cli import main
from speccompile.errors import BundleError
from speccompile.format.bundle import read_manifest


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(tiny_bundle, out)
    return out


def edit_manifest(bundle, fn):
    p = bundle / "manifest.json"
    m = json.loads(p.read_text())
    fn(m)
    p.write_text(json.dumps(m))


def assert_refused(bundle, *words, verify=True):
    """read_manifest raises one BundleError naming `words`; inspect prints it as one error line and exits 2."""
    with pytest.raises(BundleError) as refused:
        read_manifest(str(bundle), verify_hashes=verify)
    for w in words:
        assert w in str(refused.value), str(refused.value)
    result = CliRunner().invoke(main, ["inspect", str(bundle), *([] if verify else ["--no-verify"])])
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1, result.output
    for w in words:
        assert w in errors[0], errors[0]


def listed_files(bundle):
    return sorted(json.loads((bundle / "manifest.json").read_text())["files"])


def test_every_kind_of_file_is_hashed(bundle_copy):
    """One byte changed in any listed file (graph, weights, compaction graph, tokenizer file) is refused by its
    hash: none is exempt for its kind."""
    kinds = {rel.split("/")[0] if "/" in rel else rel.rsplit(".", 1)[-1] for rel in listed_files(bundle_copy)}
    assert {"onnx", "bin", "tokenizer"} <= kinds
    for rel in listed_files(bundle_copy):
        path = bundle_copy / rel
        original = path.read_bytes()
        changed = bytearray(original)
        changed[len(changed) // 2] ^= 0x01  # same size: only the hash can tell
        path.write_bytes(bytes(changed))
        assert_refused(bundle_copy, rel, "sha256")
        path.write_bytes(original)
    read_manifest(str(bundle_copy))


@pytest.mark.parametrize("grown", [True, False])
def test_a_file_of_another_size_is_refused_without_the_hashes(bundle_copy, grown):
    """`inspect --no-verify` and load(verify=False) skip the hashes, not the sizes: a file grown (a copy written
    over a longer one) is refused as a file cut short is."""
    path = bundle_copy / "target.bin"
    data = path.read_bytes()
    path.write_bytes(data + b"\0" * 4096 if grown else data[:-4096])
    assert_refused(bundle_copy, "target.bin", "bytes", verify=False)


def test_a_batched_graph_of_a_newer_contract_is_refused_at_load(bundle_copy):
    """The batched graph records its own contract version (graphs.BATCH_GRAPH_VERSION): one from a newer
    speccompile is refused at load, not run mid-request beside the target."""
    from speccompile.graphs import BATCH_GRAPH_VERSION
    m = read_manifest(str(bundle_copy))
    assert m["models"]["target_batch"]["kind"] == "decoder_batch"
    edit_manifest(bundle_copy, lambda m: m["models"]["target_batch"].update(graph_version=BATCH_GRAPH_VERSION + 1))
    assert_refused(bundle_copy, "target_batch", "newer speccompile")
    edit_manifest(bundle_copy, lambda m: m["models"]["target_batch"].update(graph_version=BATCH_GRAPH_VERSION))
    read_manifest(str(bundle_copy))


def _rehash(bundle, rel):
    data = (bundle / rel).read_bytes()
    edit_manifest(bundle, lambda m: m["files"].update({rel: {"sha256": hashlib.sha256(data).hexdigest(),
                                                             "bytes": len(data)}}))


def test_weights_a_model_names_must_be_hashed_files(bundle_copy):
    """A model's weight file that the manifest gives no hash (here: none at all) is refused by name when the
    bundle is read, not as an OSError when the runtime first sizes the file."""
    edit_manifest(bundle_copy, lambda m: m["models"]["draft"].update(weights=["draft.bin", "nowhere.bin"]))
    assert_refused(bundle_copy, "nowhere.bin", "no hash entry")
    with pytest.raises(BundleError, match="nowhere.bin"):
        speccompile.load(str(bundle_copy), threads=1)


def test_a_tokenizer_folder_without_its_tokenizer_json_is_refused(bundle_copy):
    (bundle_copy / "tokenizer" / "tokenizer.json").unlink()
    edit_manifest(bundle_copy, lambda m: m["files"].pop("tokenizer/tokenizer.json"))
    assert_refused(bundle_copy, "tokenizer/tokenizer.json")


@pytest.mark.parametrize("models, edit, words", [
    (("target", "target_batch"), lambda e: [e.update(num_layers=3), e["kv_cache"].update(num_layers=3)],
     ["3 layers", "4 caches"]),
    (("target", "target_batch"), lambda e: e["kv_cache"].update(max_seq_len=128),
     ["KV cache holds {128} slots", "{256}"]),  # plus the lowering's scratch slots
    (("target",), lambda e: e["inputs"].pop(next(i for i, t in enumerate(e["inputs"]) if t["name"] == "position_ids")),
     ["inputs the manifest does not list", "position_ids"]),
])
def test_a_manifest_unlike_its_graph_is_refused_when_the_graph_is_opened(bundle_copy, models, edit, words):
    """The KV cache the runtime allocates and the inputs it binds are read from the manifest: a manifest that
    says otherwise than the target's graph (the batched graph's, which shares its cache, edited alike) is refused
    naming the difference when the graph is opened, not left to fail (or to bind a cache of the wrong size) in the
    first pass."""
    with open(bundle_copy / "manifest.json") as f:
        scratch = json.load(f)["models"]["target"]["kv_cache"]["scratch_slots"]
    edit_manifest(bundle_copy, lambda m: [edit(m["models"][name]) for name in models])
    with pytest.raises(BundleError) as refused:
        speccompile.load(str(bundle_copy), threads=1)
    for w in words:
        w = w.replace("{128}", str(128 + scratch)).replace("{256}", str(256 + scratch))
        assert w in str(refused.value), str(refused.value)


@pytest.mark.parametrize("edit, field", [
    (lambda m: m["drafters"][2].update(tree={"kind": "static", "size": 2, "depth": 1, "paths": [[0], [-1]]}),
     "drafters/2/tree"),
    (lambda m: m["drafters"][2].update(num_draft=10**6), "drafters/2/num_draft"),
    (lambda m: m["drafters"][2].update(kind="python"), "drafters/2/kind"),
])
def test_drafter_fields_out_of_range_are_refused_by_the_schema(bundle_copy, edit, field):
    """A drafter's tree ranks index the drafter's top-k candidates and its num_draft sizes its pass: a negative
    rank or a count past the tree-node limit is refused naming the field, before the runtime reads it."""
    assert json.loads((bundle_copy / "manifest.json").read_text())["drafters"][2]["kind"] == "model"
    edit_manifest(bundle_copy, edit)
    assert_refused(bundle_copy, "invalid manifest field", field)


@pytest.mark.parametrize("value, words", [("nowhere.onnx", ["nowhere.onnx", "no hash entry"]),
                                          (["target.kv_compact.onnx"], ["models/target/kv_compact"])])
def test_a_compaction_graph_must_be_a_hashed_file(bundle_copy, value, words):
    """A model's KV compaction graph (opened only on a GPU) is a hashed file of the bundle, checked on any
    device."""
    edit_manifest(bundle_copy, lambda m: m["models"]["target"].update(kv_compact=value))
    assert_refused(bundle_copy, *words)


@pytest.mark.parametrize("edit, words", [
    (lambda m: [o.update(shape=[o["shape"][0], 500]) for o in m["models"]["target"]["outputs"]
                if o["name"] == "logits"], ["target.onnx", "logits a width of 500"]),
    (lambda m: m["models"]["draft"]["config"].update(hidden_size=96), ["draft.onnx", "hidden_states a width of 96"]),
])
def test_output_widths_unlike_the_graphs_are_refused_when_the_graph_is_opened(bundle_copy, edit, words):
    """The runtime sizes the logits and hidden-state buffers from the manifest before any pass."""
    edit_manifest(bundle_copy, edit)
    with pytest.raises(BundleError) as refused:
        speccompile.load(str(bundle_copy), threads=1)
    for w in words:
        assert w in str(refused.value), str(refused.value)


def test_a_graph_file_replaced_after_loading_by_one_of_the_same_size_is_refused(bundle_copy):
    """The batched graph opens at the first shared pass: a file replaced since loading (another inode and time,
    here the same bytes) is one error, not opened, even where its size did not change."""
    from conftest import random_prompts
    g = speccompile.load(str(bundle_copy), threads=1)
    path = bundle_copy / "target_batch.onnx"
    (bundle_copy / "replacement").write_bytes(path.read_bytes())
    os.replace(bundle_copy / "replacement", path)
    with pytest.raises(BundleError, match="changed on disk since it was loaded"):
        g.generate(random_prompts(2, seed=3), 8)


def test_a_listed_file_missing_is_a_bundle_error(bundle_copy):
    """Through the API too: a BundleError naming the file, not an OSError from a later stat."""
    (bundle_copy / "draft.bin").unlink()
    assert_refused(bundle_copy, "bundle file missing", "draft.bin", verify=False)


def test_sequence_slots_past_the_limit_are_refused_by_the_schema(bundle_copy):
    """max_batch sizes the batched KV cache and the scheduler's slots: bounded before anything is sized from it."""
    edit_manifest(bundle_copy, lambda m: m["models"]["target_batch"].update(max_batch=10**9))
    assert_refused(bundle_copy, "invalid manifest field", "models/target_batch/max_batch")
