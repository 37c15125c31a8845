"""Property-based fuzzing of every file speccompile reads from outside: a bundle's manifest, a checkpoint's
config.json, safetensors headers and GGUF headers, each mutated field by field and byte by byte. Every mutation
must end in success or a clean SpeccompileError (through the CLI: one `error:` line and exit 2): never another
exception, never a hang. Bounded for CI: few examples, derandomized (the same examples every run), a deadline per
example and an alarm that turns a hang into a failure."""
import contextlib
import json
import shutil
import signal
import struct

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from speccompile.cli import main
from speccompile.compile.config import ModelConfig
from speccompile.compile.weights.decoder import check_checkpoint
from speccompile.compile.safetensors_files import read_safetensors
from speccompile.compile.sources import load_checkpoint, save_hf_dir
from speccompile.errors import SpeccompileError
from speccompile.format.bundle import read_manifest

HANG_S = 20  # far above any example's time: only a hang reaches it


def fuzz_settings(examples: int):
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@contextlib.contextmanager
def no_hang(seconds: int = HANG_S):
    def hang(*_):
        raise AssertionError(f"no answer within {seconds} s: a hang")
    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def clean(fn, *args, **kwargs):
    """Run fn: it succeeds or raises a SpeccompileError; anything else fails the test."""
    with no_hang():
        try:
            return fn(*args, **kwargs)
        except SpeccompileError:
            return None


# ---- mutations -----------------------------------------------------------------------------------------------------
WEIRD = st.one_of(st.none(), st.booleans(), st.sampled_from([0, -1, 1, 3, 2**31, 2**63, 10**9, -(10**12)]),
                  st.integers(), st.floats(), st.text(max_size=12), st.lists(st.integers(-3, 3), max_size=3),
                  st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))


def paths(doc, prefix=(), limit=400):
    """Every (container path, key) in a JSON document, breadth first."""
    out, queue = [], [(prefix, doc)]
    while queue and len(out) < limit:
        path, node = queue.pop(0)
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for k, v in items:
            out.append(path + (k,))
            queue.append((path + (k,), v))
    return out


@st.composite
def mutated_json(draw, doc, mutations=3):
    """doc with a few fields replaced by a value of another type or range, deleted, or joined by a stray one."""
    doc = json.loads(json.dumps(doc))
    for _ in range(draw(st.integers(1, mutations))):
        where = paths(doc)
        if not where:
            break
        *parent_path, key = draw(st.sampled_from(where))
        parent = doc
        for k in parent_path:
            parent = parent[k]
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if action == "replace":
            parent[key] = draw(WEIRD)
        elif action == "delete":
            del parent[key]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(WEIRD)
    return doc


@st.composite
def mutated_bytes(draw, data: bytes, region: int | None = None):
    """data with a few bytes flipped (within its first `region` bytes), or cut short, or both."""
    data = bytearray(data)
    end = min(region or len(data), len(data))
    for _ in range(draw(st.integers(0, 4))):
        i = draw(st.integers(0, end - 1))
        data[i] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[:draw(st.integers(0, len(data)))]
    return bytes(data)


# ---- bundles ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fuzz_bundle(tiny_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("fuzz") / "bundle"
    shutil.copytree(tiny_bundle, out)
    return out


def _write_manifest(bundle, content):
    (bundle / "manifest.json").write_text(content) if isinstance(content, str) else \
        (bundle / "manifest.json").write_bytes(content)


@pytest.fixture
def manifest_text(fuzz_bundle):
    original = (fuzz_bundle / "manifest.json").read_bytes()
    yield json.loads(original)
    (fuzz_bundle / "manifest.json").write_bytes(original)


@given(data=st.data())
@fuzz_settings(150)
def test_manifest_fields(fuzz_bundle, manifest_text, data):
    _write_manifest(fuzz_bundle, json.dumps(data.draw(mutated_json(manifest_text))))
    clean(read_manifest, str(fuzz_bundle))


@given(data=st.data())
@fuzz_settings(60)
def test_manifest_bytes(fuzz_bundle, manifest_text, data):
    raw = json.dumps(manifest_text).encode()
    _write_manifest(fuzz_bundle, data.draw(mutated_bytes(raw)))
    clean(read_manifest, str(fuzz_bundle))


@given(data=st.data())
@fuzz_settings(15)
def test_manifest_through_the_cli(fuzz_bundle, manifest_text, data):
    """A mutated manifest that passes every check loads and decodes, or the CLI says why in one line."""
    _write_manifest(fuzz_bundle, json.dumps(data.draw(mutated_json(manifest_text, mutations=2))))
    for args in (["inspect", fuzz_bundle], ["generate", fuzz_bundle, "hi", "--max-new-tokens", 3]):
        with no_hang():
            result = CliRunner().invoke(main, [str(a) for a in args])
        errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
        assert result.exit_code == 0 or (result.exit_code == 2 and len(errors) == 1), result.output


# ---- checkpoints -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz-hf") / "hf"
    save_hf_dir(load_checkpoint("tiny:llama-draft"), str(d))
    return d


def _load_and_check(path):
    """The build's first steps: read the checkpoint, check its config and its tensors against the config."""
    ckpt = load_checkpoint(str(path), progress=lambda *_: None)
    ckpt.config.check_lowerable(64)
    check_checkpoint(ckpt.config, ckpt.tensors)


@given(data=st.data())
@fuzz_settings(120)
def test_config_fields(hf_checkpoint, data):
    config = json.loads((hf_checkpoint / "config.json").read_text())
    clean(ModelConfig.from_hf, data.draw(mutated_json(config)))


@given(data=st.data())
@fuzz_settings(25)
def test_config_file(hf_checkpoint, data):
    path = hf_checkpoint / "config.json"
    original = path.read_bytes()
    try:
        if data.draw(st.booleans()):
            path.write_text(json.dumps(data.draw(mutated_json(json.loads(original)))))
        else:
            path.write_bytes(data.draw(mutated_bytes(original)))
        clean(_load_and_check, hf_checkpoint)
    finally:
        path.write_bytes(original)


def _safetensors_parts(path):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


@given(data=st.data())
@fuzz_settings(60)
def test_safetensors_header(hf_checkpoint, tmp_path_factory, data):
    header, body = _safetensors_parts(hf_checkpoint / "model.safetensors")
    target = tmp_path_factory.getbasetemp() / "fuzz.safetensors"
    if data.draw(st.booleans()):
        text = json.dumps(data.draw(mutated_json(header))).encode()
        if data.draw(st.booleans()):
            text += b" " * (-len(text) % 8)
        target.write_bytes(struct.pack("<Q", len(text)) + text + body)
    else:
        raw = (hf_checkpoint / "model.safetensors").read_bytes()
        target.write_bytes(data.draw(mutated_bytes(raw, region=8 + len(json.dumps(header)))))
    clean(read_safetensors, str(target))


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    gguf = pytest.importorskip("gguf")
    path = tmp_path_factory.mktemp("fuzz-gguf") / "model.gguf"
    # an architecture speccompile does not lower: a header that parses ends there, without dequantizing anything
    w = gguf.GGUFWriter(str(path), "gemma")
    w.add_block_count(2)
    w.add_context_length(64)
    w.add_embedding_length(16)
    w.add_head_count(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tensor("token_embd.weight", np.zeros((8, 16), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@given(data=st.data())
@fuzz_settings(80)
def test_gguf_header(gguf_file, tmp_path_factory, data):
    raw = gguf_file.read_bytes()
    target = tmp_path_factory.getbasetemp() / "fuzz.gguf"
    if data.draw(st.booleans()):  # the counts and version a reader sizes its tables from
        field = data.draw(st.sampled_from([(4, "<I"), (8, "<Q"), (16, "<Q")]))  # version, tensors, key-values
        value = data.draw(st.sampled_from([0, 1, 2, 3, 255, 2**31, 2**32 - 1, 2**63, 2**64 - 1]))
        offset, fmt = field
        if value < 2 ** (8 * struct.calcsize(fmt)):
            raw = raw[:offset] + struct.pack(fmt, value) + raw[offset + struct.calcsize(fmt):]
    raw = data.draw(mutated_bytes(raw, region=len(raw) - 512))
    target.write_bytes(raw)
    clean(load_checkpoint, str(target), progress=lambda *_: None)
