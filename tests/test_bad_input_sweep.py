"""The hardening sweep: every entry point fed bad input as a careless user or an attacker would. Each CLI case must
end in exactly one `error:` line, exit 2, no traceback, nothing deleted; each API case in a SpeccompileError.

The focused tests (test_errors.py, test_api.py, test_fuzz.py) say *why* each case fails; this file holds the
whole list in one place, so a new entry point or option is swept by adding a line."""
import json
import math
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from speccompile.cli import main
from speccompile.compile.sources import load_checkpoint, save_hf_dir
from speccompile.errors import SpeccompileError
from speccompile.format.bundle import read_manifest
from speccompile.runtime.sampling import SamplingParams


# ---- places the cases point at -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def places(tiny_bundle, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    hf = root / "hf"
    save_hf_dir(load_checkpoint("tiny:llama"), str(hf))
    (root / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (root / "not-json.json").write_text("{ nope")
    (root / "tree-list.json").write_text("[1, 2, 3]")
    (root / "tree-cycle.json").write_text(json.dumps({"parents": [1, 0]}))
    (root / "plain.txt").write_text("a user's file")
    (root / "user-dir").mkdir()
    (root / "user-dir" / "notes.txt").write_text("keep me")
    (root / "empty.gguf").write_bytes(b"")
    (root / "bad-magic.gguf").write_bytes(b"NOPE" + b"\0" * 64)
    (root / "model.bin").write_bytes(b"\x80\x04not a pickle you may load")
    for name, doc in {"nan.json": {"overall": {"speedup": math.nan}}, "list.json": [1, 2], "empty.json": {}}.items():
        (root / name).write_text(json.dumps(doc, allow_nan=True))
    return {"bundle": str(tiny_bundle), "root": root, "hf": hf}


def edited_copy(places, source: str, prefix: str, name: str, edit) -> str:
    """A copy of places[source] changed by `edit(path)`; made once per name."""
    out = places["root"] / (prefix + name)
    if not out.exists():
        shutil.copytree(places[source], out)
        edit(out)
    return str(out)


def variant(places, name, edit):
    return edited_copy(places, "bundle", "bundle-", name, edit)


def hf_variant(places, name, edit):
    return edited_copy(places, "hf", "hf-", name, edit)


def edit_manifest(change):
    def edit(path):
        m = json.loads((path / "manifest.json").read_text())
        change(m)
        (path / "manifest.json").write_text(json.dumps(m))
    return edit


def edit_tokenizer_config(**change):
    def edit(path):
        f = path / "tokenizer" / "tokenizer_config.json"
        cfg = json.loads(f.read_text()) if f.exists() else {}
        cfg.update(change)
        f.write_text(json.dumps(cfg))
        (path / "tokenizer" / "chat_template.jinja").unlink(missing_ok=True)
    return edit


def edit_config(**change):
    def edit(path):
        cfg = json.loads((path / "config.json").read_text())
        cfg.update(change)
        (path / "config.json").write_text(json.dumps(cfg))
    return edit


def flip_byte(name):
    def edit(path):
        data = bytearray((path / name).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (path / name).write_bytes(bytes(data))
    return edit


def truncate(name, keep=100):
    def edit(path):
        (path / name).write_bytes((path / name).read_bytes()[:keep])
    return edit


def remove(name):
    return lambda path: os.remove(path / name)


def write(name, text):
    return lambda path: (path / name).write_text(text)


def rehashed(edit):
    """`edit`, then the manifest's hashes recomputed over every file, as an attacker can."""
    def run(path):
        import hashlib
        edit(path)
        m = json.loads((path / "manifest.json").read_text())
        for rel in list(m["files"]):
            data = (path / rel).read_bytes()
            m["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        (path / "manifest.json").write_text(json.dumps(m))
    return run


def set_model(model, **fields):
    return edit_manifest(lambda m: m["models"][model].update(fields))


def set_kv(model, **fields):
    return edit_manifest(lambda m: m["models"][model]["kv_cache"].update(fields))


def drop_tensor(path):
    from safetensors.numpy import load_file, save_file
    f = next(p for p in path.iterdir() if p.suffix == ".safetensors")
    tensors = load_file(str(f))
    tensors.pop(sorted(tensors)[0])
    save_file(tensors, str(f))


def misshape_tensor(path):
    from safetensors.numpy import load_file, save_file
    f = next(p for p in path.iterdir() if p.suffix == ".safetensors")
    tensors = load_file(str(f))
    name = sorted(tensors)[-1]
    tensors[name] = np.zeros((3, 5), tensors[name].dtype)
    save_file(tensors, str(f))


# ---- the cases: (name, args given the places) -------------------------------------------------------------------
def no_drafters(places) -> str:
    """The bundle built with --draft none, as far as generate can tell (its drafters' graphs stay, unused)."""
    return variant(places, "no-drafters", edit_manifest(lambda m: m.update(drafters=[])))


B = "bundle"
GENERATE = [
    ("tree chain of a million", lambda p: [p[B], "hi", "--tree", "chain:1000000"]),
    ("num-draft zero", lambda p: [p[B], "hi", "--num-draft", "0"]),
    ("no-speculate with a tree", lambda p: [p[B], "hi", "--no-speculate", "--tree", "chain:3"]),
    ("drafter of a bundle without drafters", lambda p: [no_drafters(p), "hi", "--drafter", "lookup"]),
    ("tree of a bundle without drafters", lambda p: [no_drafters(p), "hi", "--tree", "chain:3"]),
    ("num-draft of a bundle without drafters", lambda p: [no_drafters(p), "hi", "--num-draft", "3"]),
    # it decoded plainly, and the summary said "typical acceptance (lossy)"
    ("typical acceptance of a bundle without drafters", lambda p: [no_drafters(p), "hi", "--temperature", "0.7",
                                                                   "--acceptance", "typical"]),
    ("acceptance empty", lambda p: [p[B], "hi", "--temperature", "0.7", "--acceptance", ""]),
    ("num-draft and a tree", lambda p: [p[B], "hi", "--num-draft", "3", "--tree", "dynamic:8"]),
    ("no-speculate compared", lambda p: [p[B], "hi", "--no-speculate", "--compare"]),
    ("typical acceptance while greedy", lambda p: [p[B], "hi", "--acceptance", "typical"]),
    # a temperature below sampling.GREEDY_BELOW decodes greedily, as 0 does: what only sampling reads is refused
    ("top-k at a greedy temperature", lambda p: [p[B], "hi", "--temperature", "1e-8", "--top-k", "5"]),
    ("typical acceptance at a greedy temperature", lambda p: [p[B], "hi", "--temperature", "1e-8", "--acceptance",
                                                              "typical"]),
    ("temperature nan", lambda p: [p[B], "hi", "--temperature", "nan"]),
    ("temperature inf", lambda p: [p[B], "hi", "--temperature", "inf"]),
    ("temperature negative", lambda p: [p[B], "hi", "--temperature", "-0.5"]),
    ("temperature word", lambda p: [p[B], "hi", "--temperature", "hot"]),
    ("top-p zero", lambda p: [p[B], "hi", "--top-p", "0"]),
    ("top-p above one", lambda p: [p[B], "hi", "--top-p", "1.5"]),
    ("top-p nan", lambda p: [p[B], "hi", "--top-p", "nan"]),
    ("top-k negative", lambda p: [p[B], "hi", "--top-k", "-1"]),
    ("top-k a word", lambda p: [p[B], "hi", "--top-k", "some"]),
    ("max-new-tokens zero", lambda p: [p[B], "hi", "--max-new-tokens", "0"]),
    ("max-new-tokens negative", lambda p: [p[B], "hi", "--max-new-tokens", "-5"]),
    ("max-new-tokens past context", lambda p: [p[B], "hi", "--max-new-tokens", str(10 ** 9)]),
    ("seed negative", lambda p: [p[B], "hi", "--seed", "-1"]),
    ("seed huge", lambda p: [p[B], "hi", "--seed", str(2 ** 70)]),
    ("threads zero", lambda p: [p[B], "hi", "--threads", "0"]),
    ("threads negative", lambda p: [p[B], "hi", "--threads", "-2"]),
    ("threads absurd", lambda p: [p[B], "hi", "--threads", str(10 ** 6)]),
    ("num-draft negative", lambda p: [p[B], "hi", "--num-draft", "-1"]),
    ("num-draft past the verify limit", lambda p: [p[B], "hi", "--num-draft", "1000"]),
    ("unknown drafter", lambda p: [p[B], "hi", "--drafter", "nosuch"]),
    ("empty drafter", lambda p: [p[B], "hi", "--drafter", ""]),
    ("tree word", lambda p: [p[B], "hi", "--tree", "bushy"]),
    ("tree dynamic zero", lambda p: [p[B], "hi", "--tree", "dynamic:0"]),
    ("tree dynamic huge", lambda p: [p[B], "hi", "--tree", "dynamic:100000"]),
    ("tree chain negative", lambda p: [p[B], "hi", "--tree", "chain:-3"]),
    ("tree static missing", lambda p: [p[B], "hi", "--tree", f"static:{p['root'] / 'nope.json'}"]),
    ("tree static not json", lambda p: [p[B], "hi", "--tree", f"static:{p['root'] / 'not-json.json'}"]),
    ("tree static a list", lambda p: [p[B], "hi", "--tree", f"static:{p['root'] / 'tree-list.json'}"]),
    ("tree static a cycle", lambda p: [p[B], "hi", "--tree", f"static:{p['root'] / 'tree-cycle.json'}"]),
    ("tree lookup negative", lambda p: [p[B], "hi", "--tree", "dynamic:2+lookup:-1"]),
    ("stop string not utf-8", lambda p: [p[B], "hi", "--stop", "\udcff"]),
    ("prompt not utf-8", lambda p: [p[B], "caf\udce9"]),
    ("bundle missing", lambda p: [str(p["root"] / "nope"), "hi"]),
    ("bundle a plain file", lambda p: [str(p["root"] / "plain.txt"), "hi"]),
    ("bundle a user folder", lambda p: [str(p["root"] / "user-dir"), "hi"]),
    ("manifest missing", lambda p: [variant(p, "no-manifest", remove("manifest.json")), "hi"]),
    ("manifest not json", lambda p: [variant(p, "bad-json", write("manifest.json", "{")), "hi"]),
    ("manifest empty", lambda p: [variant(p, "empty-manifest", write("manifest.json", "")), "hi"]),
    ("manifest a list", lambda p: [variant(p, "list-manifest", write("manifest.json", "[]")), "hi"]),
    ("manifest without models", lambda p: [variant(p, "no-models", edit_manifest(lambda m: m.pop("models"))), "hi"]),
    ("manifest max_seq_len a string", lambda p: [variant(p, "seq-str", edit_manifest(
        lambda m: m.__setitem__("max_seq_len", "big"))), "hi"]),
    ("manifest drafters an object", lambda p: [variant(p, "drafters-obj", edit_manifest(
        lambda m: m.__setitem__("drafters", {}))), "hi"]),
    ("manifest format from the future", lambda p: [variant(p, "future", edit_manifest(
        lambda m: m.__setitem__("format_version", 999))), "hi"]),
    ("manifest path escapes the bundle", lambda p: [variant(p, "escape", edit_manifest(
        lambda m: m["tokenizer"].__setitem__("dir", "../../etc"))), "hi"]),
    ("weights changed", lambda p: [variant(p, "flipped", flip_byte("target.bin")), "hi"]),
    ("weights truncated", lambda p: [variant(p, "short-weights", truncate("target.bin")), "hi"]),
    ("weights missing", lambda p: [variant(p, "no-weights", remove("target.bin")), "hi"]),
    ("graph truncated", lambda p: [variant(p, "short-graph", truncate("target.onnx")), "hi"]),
    ("unlisted file", lambda p: [variant(p, "unlisted", write("tokenizer/evil.jinja", "{{ 7*7 }}")), "hi"]),
    ("tokenizer deleted", lambda p: [variant(p, "no-tokenizer", lambda d: shutil.rmtree(d / "tokenizer")), "hi"]),
    ("manifest max_batch a string", lambda p: [variant(p, "batch-str", set_model("target_batch", max_batch="8")),
                                               "hi"]),
    ("manifest max_batch a billion", lambda p: [variant(p, "batch-big", set_model("target_batch", max_batch=10**9)),
                                                "hi"]),
    ("manifest kv heads unlike the graph's", lambda p: [variant(p, "kv-heads", lambda d: [set_kv(m, num_kv_heads=7)(d)
                                                        for m in ("target", "target_batch")]), "hi"]),
    ("manifest kv dtype a list", lambda p: [variant(p, "kv-dtype", set_kv("target", dtype=["float32"])), "hi"]),
    ("manifest logits wider than the graph's", lambda p: [variant(p, "logits-wide", edit_manifest(lambda m: [
        o.__setitem__("shape", [o["shape"][0], 1 << 24]) for o in m["models"]["target"]["outputs"]
        if o["name"] == "logits"])), "hi"]),
    ("graph swapped for the batched one", lambda p: [variant(p, "graph-swap", rehashed(lambda d: shutil.copy(
        d / "target_batch.onnx", d / "target.onnx"))), "hi"]),
    ("manifest lists an output the graph lacks", lambda p: [variant(p, "aux-out", edit_manifest(
        lambda m: m["models"]["target"]["outputs"].append({"name": "aux_hidden_states", "dtype": "float32",
                                                           "shape": ["S", 64]}))), "hi"]),
    ("manifest batched graph without its kv_cache", lambda p: [variant(p, "batch-no-kv", edit_manifest(
        lambda m: m["models"]["target_batch"].pop("kv_cache"))), "hi"]),
    ("chat template doubles a text by +", lambda p: [variant(p, "tok-plus", rehashed(edit_tokenizer_config(
        chat_template="{% set a = 'x' * 4000000 %}{% set b = a + a %}{% set c = b + b %}{{ c|length }}"))), "hi"]),
    ("chat template doubles a text by ~", lambda p: [variant(p, "tok-tilde", rehashed(edit_tokenizer_config(
        chat_template="{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
                      "{% endfor %}{{ ns.s|length }}"))), "hi"]),
    ("chat template pads a text to gigabytes", lambda p: [variant(p, "tok-center", rehashed(edit_tokenizer_config(
        chat_template="{{ 'x'|center(20000000000) }}"))), "hi"]),
    ("chat template renders gigabytes", lambda p: [variant(p, "tok-output", rehashed(edit_tokenizer_config(
        chat_template="{% set a = 'x' * 4000000 %}{% for i in range(5000) %}{{ a }}{% endfor %}"))), "hi"]),
    ("tokenizer config a list", lambda p: [variant(p, "tok-cfg-list", rehashed(write(
        "tokenizer/tokenizer_config.json", "[1, 2]"))), "hi"]),
    ("tokenizer json not a tokenizer", lambda p: [variant(p, "tok-json", rehashed(write(
        "tokenizer/tokenizer.json", "{}"))), "hi"]),
    ("chat template loops for ever", lambda p: [variant(p, "tok-loop", rehashed(edit_tokenizer_config(
        chat_template="{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"))),
        "hi"]),
    ("chat template builds gigabytes", lambda p: [variant(p, "tok-mul", rehashed(edit_tokenizer_config(
        chat_template="{{ 'x' * 3000000000 }}"))), "hi"]),
]

BUILD = [
    ("model path missing", lambda p: [str(p["root"] / "nope"), "--out", str(p["root"] / "o1")]),
    ("model a plain file", lambda p: [str(p["root"] / "plain.txt"), "--out", str(p["root"] / "o2")]),
    ("model dir without config", lambda p: [str(p["root"] / "user-dir"), "--out", str(p["root"] / "o3")]),
    ("unknown preset", lambda p: ["tiny:nosuch", "--out", str(p["root"] / "o4")]),
    ("config not json", lambda p: [hf_variant(p, "cfg-bad", write("config.json", "{")), "--out", str(p["root"] / "o5")]),
    ("config a list", lambda p: [hf_variant(p, "cfg-list", write("config.json", "[]")), "--out", str(p["root"] / "o6")]),
    ("config zero heads", lambda p: [hf_variant(p, "heads0", edit_config(num_attention_heads=0)), "--out",
                                     str(p["root"] / "o7")]),
    ("config a billion layers", lambda p: [hf_variant(p, "layers", edit_config(num_hidden_layers=10 ** 9)), "--out",
                                           str(p["root"] / "o8")]),
    ("config negative vocab", lambda p: [hf_variant(p, "vocab", edit_config(vocab_size=-1)), "--out",
                                         str(p["root"] / "o9")]),
    ("config hidden a list", lambda p: [hf_variant(p, "hidden", edit_config(hidden_size=[64])), "--out",
                                        str(p["root"] / "o10")]),
    ("config unknown architecture", lambda p: [hf_variant(p, "arch", edit_config(architectures=["FooForCausalLM"],
                                                                                 model_type="foo")),
                                               "--out", str(p["root"] / "o11")]),
    ("config unknown rope type", lambda p: [hf_variant(p, "rope", edit_config(
        rope_scaling={"rope_type": "nosuch", "factor": 2.0})), "--out", str(p["root"] / "o12")]),
    ("config nan eps", lambda p: [hf_variant(p, "eps", edit_config(rms_norm_eps=float("nan"))), "--out",
                                  str(p["root"] / "o13")]),
    ("checkpoint missing a tensor", lambda p: [hf_variant(p, "drop", drop_tensor), "--out", str(p["root"] / "o14")]),
    ("checkpoint misshapen tensor", lambda p: [hf_variant(p, "shape", misshape_tensor), "--out",
                                               str(p["root"] / "o15")]),
    ("checkpoint truncated", lambda p: [hf_variant(p, "trunc", lambda d: truncate(next(
        f.name for f in d.iterdir() if f.suffix == ".safetensors"), 50)(d)), "--out", str(p["root"] / "o16")]),
    ("checkpoint only a pickle", lambda p: [hf_variant(p, "pickle", lambda d: [
        os.remove(f) for f in d.iterdir() if f.suffix == ".safetensors"] + [shutil.copy(
            p["root"] / "model.bin", d / "pytorch_model.bin")]), "--out", str(p["root"] / "o17")]),
    ("checkpoint tokenizer.json not a tokenizer", lambda p: [hf_variant(p, "tokjson", write("tokenizer.json", "{}")),
                                                             "--out", str(p["root"] / "o40")]),
    ("checkpoint tokenizer config a list", lambda p: [hf_variant(p, "tokcfg", write("tokenizer_config.json", "[]")),
                                                      "--out", str(p["root"] / "o41")]),
    ("gguf empty", lambda p: [str(p["root"] / "empty.gguf"), "--out", str(p["root"] / "o18")]),
    ("gguf bad magic", lambda p: [str(p["root"] / "bad-magic.gguf"), "--out", str(p["root"] / "o19")]),
    ("out empty", lambda p: ["tiny:llama", "--out", ""]),
    ("max-batch zero", lambda p: ["tiny:llama", "--out", str(p["root"] / "o42"), "--max-batch", "0"]),
    ("out an existing file", lambda p: ["tiny:llama", "--out", str(p["root"] / "plain.txt")]),
    ("out an existing file, forced", lambda p: ["tiny:llama", "--out", str(p["root"] / "plain.txt"), "--force"]),
    ("out a user folder, forced", lambda p: ["tiny:llama", "--out", str(p["root"] / "user-dir"), "--force"]),
    ("out the working directory, forced", lambda p: ["tiny:llama", "--out", ".", "--force"]),
    ("out the parent directory, forced", lambda p: ["tiny:llama", "--out", "..", "--force"]),
    ("out an existing bundle, unforced", lambda p: ["tiny:llama", "--out", p[B]]),
    ("max-seq-len zero", lambda p: ["tiny:llama", "--out", str(p["root"] / "o20"), "--max-seq-len", "0"]),
    ("max-seq-len negative", lambda p: ["tiny:llama", "--out", str(p["root"] / "o21"), "--max-seq-len", "-8"]),
    ("max-seq-len huge", lambda p: ["tiny:llama", "--out", str(p["root"] / "o22"), "--max-seq-len", str(10 ** 9)]),
    ("num-draft zero", lambda p: ["tiny:llama", "--out", str(p["root"] / "o23"), "--num-draft", "0"]),
    ("num-draft huge", lambda p: ["tiny:llama", "--out", str(p["root"] / "o24"), "--num-draft", "1000"]),
    ("num-draft and a tree", lambda p: ["tiny:llama", "--out", str(p["root"] / "o43"), "--num-draft", "3", "--tree",
                                        "dynamic:8"]),
    ("draft unknown kind", lambda p: ["tiny:llama", "--out", str(p["root"] / "o25"), "--draft", "psychic"]),
    ("draft lookup zero", lambda p: ["tiny:llama", "--out", str(p["root"] / "o26"), "--draft", "lookup:0"]),
    ("draft lookup word", lambda p: ["tiny:llama", "--out", str(p["root"] / "o27"), "--draft", "lookup:many"]),
    ("draft layerskip past the layers", lambda p: ["tiny:llama", "--out", str(p["root"] / "o28"),
                                                   "--draft", "layerskip:99"]),
    ("draft layerskip zero", lambda p: ["tiny:llama", "--out", str(p["root"] / "o29"), "--draft", "layerskip:0"]),
    ("draft model missing", lambda p: ["tiny:llama", "--out", str(p["root"] / "o30"), "--draft",
                                       f"model:{p['root'] / 'nope'}"]),
    ("draft model empty", lambda p: ["tiny:llama", "--out", str(p["root"] / "o31"), "--draft", "model:"]),
    # "mtp:$HEAD" with HEAD unset built the shipped head, "lookup:" the default n-grams
    ("draft lookup empty", lambda p: ["tiny:llama", "--out", str(p["root"] / "o44"), "--draft", "lookup:"]),
    ("draft none beside lookup", lambda p: ["tiny:llama", "--out", str(p["root"] / "o45"), "--draft", "none",
                                            "--draft", "lookup"]),
    ("draft none with an argument", lambda p: ["tiny:llama", "--out", str(p["root"] / "o46"), "--draft", "none:3"]),
    ("draft mtp missing", lambda p: ["tiny:llama", "--out", str(p["root"] / "o32"), "--draft",
                                     f"mtp:{p['root'] / 'nope.safetensors'}"]),
    ("draft eagle a pickle", lambda p: ["tiny:llama", "--out", str(p["root"] / "o33"), "--draft",
                                        f"eagle:{p['root'] / 'model.bin'}"]),
    ("draft medusa not safetensors", lambda p: ["tiny:llama", "--out", str(p["root"] / "o34"), "--draft",
                                                f"medusa:{p['root'] / 'plain.txt'}"]),
    ("draft eagle3 missing", lambda p: ["tiny:llama", "--out", str(p["root"] / "o35"), "--draft",
                                        f"eagle3:{p['root'] / 'nope'}"]),
    ("tree word", lambda p: ["tiny:llama", "--out", str(p["root"] / "o36"), "--tree", "bushy"]),
    ("tree static not json", lambda p: ["tiny:llama", "--out", str(p["root"] / "o37"), "--tree",
                                        f"static:{p['root'] / 'not-json.json'}"]),
    ("tree dynamic past the verify limit", lambda p: ["tiny:llama", "--out", str(p["root"] / "o38"), "--tree",
                                                      "dynamic:500"]),
]

OTHERS = [
    ("inspect missing", lambda p: ["inspect", str(p["root"] / "nope")]),
    ("inspect a user folder", lambda p: ["inspect", str(p["root"] / "user-dir")]),
    ("inspect manifest not json", lambda p: ["inspect", variant(p, "bad-json", write("manifest.json", "{"))]),
    ("inspect weights changed", lambda p: ["inspect", variant(p, "flipped", flip_byte("target.bin"))]),
    ("gate result missing", lambda p: ["gate", str(p["root"] / "nope.json"), "--baseline",
                                       str(p["root"] / "nan.json")]),
    ("gate result not json", lambda p: ["gate", str(p["root"] / "not-json.json"), "--baseline",
                                        str(p["root"] / "nan.json")]),
    ("gate result a list", lambda p: ["gate", str(p["root"] / "list.json"), "--baseline",
                                      str(p["root"] / "nan.json")]),
    ("gate figures nan", lambda p: ["gate", str(p["root"] / "nan.json"), "--baseline", str(p["root"] / "nan.json")]),
    ("gate baseline without figures", lambda p: ["gate", str(p["root"] / "nan.json"), "--baseline",
                                                 str(p["root"] / "empty.json")]),
    ("gate max-regression nan", lambda p: ["gate", str(p["root"] / "empty.json"), "--baseline",
                                           str(p["root"] / "empty.json"), "--max-regression", "nan"]),
    ("gate max-regression negative", lambda p: ["gate", str(p["root"] / "empty.json"), "--baseline",
                                                str(p["root"] / "empty.json"), "--max-regression", "-1"]),
    ("gate min-speedup word", lambda p: ["gate", str(p["root"] / "empty.json"), "--baseline",
                                         str(p["root"] / "empty.json"), "--min-speedup", "fast"]),
    ("bench bundle missing", lambda p: ["bench", str(p["root"] / "nope")]),
    ("bench dataset missing", lambda p: ["bench", p[B], "--dataset", str(p["root"] / "nope.jsonl")]),
    ("bench dataset not jsonl", lambda p: ["bench", p[B], "--dataset", str(p["root"] / "latin1.txt")]),
    ("bench limit zero", lambda p: ["bench", p[B], "--limit", "0"]),
    ("bench repeats zero", lambda p: ["bench", p[B], "--repeats", "0"]),
    ("bench stream repeats zero", lambda p: ["bench", p[B], "--streams", "2", "--stream-repeats", "0"]),
    ("bench unknown drafter", lambda p: ["bench", p[B], "--drafter", "nosuch", "--limit", "1"]),
    ("bench unknown category", lambda p: ["bench", p[B], "--categories", "nosuch", "--limit", "1"]),
    ("bench json a folder", lambda p: ["bench", p[B], "--limit", "1", "--json", str(p["root"] / "user-dir")]),
    ("bench json under a file", lambda p: ["bench", p[B], "--limit", "1", "--json",
                                           str(p["root"] / "plain.txt" / "r.json")]),
    ("bench plot of no known format", lambda p: ["bench", p[B], "--limit", "1", "--plot", "out.xyz"]),
    ("bench multi-turn with a plot", lambda p: ["bench", p[B], "--multi-turn", "2", "--plot", "mt.png"]),
    ("bench multi-turn zero", lambda p: ["bench", p[B], "--multi-turn", "0"]),
    ("bench method naming no tree", lambda p: ["bench", p[B], "--limit", "1", "--drafter", "lookup@"]),
    ("bench method naming no acceptance", lambda p: ["bench", p[B], "--limit", "1", "--drafter", "lookup~"]),
    ("bench tree of a million nodes", lambda p: ["bench", p[B], "--limit", "1", "--drafter",
                                                 "lookup@chain:1000000"]),
    ("train-head target missing", lambda p: ["train-head", "--target", str(p["root"] / "nope"),
                                             "--work", str(p["root"] / "work"), "--out", "h.safetensors"]),
    ("train-head prompts missing", lambda p: ["train-head", "--target", "tiny:llama", "--prompts",
                                              str(p["root"] / "nope.jsonl"), "--work", str(p["root"] / "work2"),
                                              "--out", "h.safetensors"]),
    ("train-head unknown stage", lambda p: ["train-head", "--target", "tiny:llama", "--stages", "dream",
                                            "--work", str(p["root"] / "work3"), "--out", "h.safetensors"]),
    ("train-head unknown redo", lambda p: ["train-head", "--redo", "bogus", "--out", "h.safetensors"]),
    ("train-head threads zero", lambda p: ["train-head", "--threads", "0", "--out", "h.safetensors"]),
    ("train-head holdout past one", lambda p: ["train-head", "--holdout", "2", "--out", "h.safetensors"]),
    ("train-head another target into the shipped head", lambda p: ["train-head", "--target", "tiny:llama",
                                                                   "--work", str(p["root"] / "work4")]),
    ("serve port out of range", lambda p: ["serve", p[B], "--port", "-1"]),
    ("serve shutdown timeout nan", lambda p: ["serve", p[B], "--shutdown-timeout", "nan"]),
]

CASES = ([("generate " + n, f, "generate") for n, f in GENERATE] + [("build " + n, f, "build") for n, f in BUILD]
         + [(n, f, None) for n, f in OTHERS])


def snapshot(root):
    return sorted((str(f.relative_to(root)), f.stat().st_size) for f in root.rglob("*") if f.is_file()
                  and "bundle-" not in str(f) and "hf-" not in str(f))


@pytest.mark.parametrize("name, args_of, command", CASES, ids=[c[0] for c in CASES])
def test_one_error_line_nothing_lost(places, name, args_of, command, monkeypatch):
    root = places["root"]
    monkeypatch.chdir(root / "user-dir")
    args = args_of(places)
    before = snapshot(root)
    r = CliRunner().invoke(main, ([command] if command else []) + [str(a) for a in args])
    assert r.exit_code == 2, (name, r.exit_code, r.output[-2000:])
    errors = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.output, (name, r.output[-2000:])
    gone = set(before) - set(snapshot(root))
    assert not gone, (name, "deleted", gone)
    assert not [n for n in os.listdir(root) if n.startswith(".speccompile-")], name
    read_manifest(places["bundle"])  # the bundle every case shares is untouched


def test_inspect_of_a_manifest_without_a_models_attention(places):
    """`attention` is not in the schema (bundles may lack it): inspect once failed on it with a KeyError."""
    bundle = variant(places, "no-attention", edit_manifest(lambda m: m["models"]["target"].pop("attention")))
    r = CliRunner().invoke(main, ["inspect", bundle])
    assert r.exit_code == 0 and "attention not recorded" in r.output, r.output[-2000:]


# ---- the Python API ------------------------------------------------------------------------------------------
API = [
    ("token id past the vocabulary", lambda g: g.generate([1, 10 ** 9], 4)),
    ("negative token id", lambda g: g.generate([1, -1], 4)),
    ("token ids as floats", lambda g: g.generate([1.0, 2.5], 4)),
    ("token ids nested", lambda g: g.generate([[[1]]], 4)),
    ("prompt None", lambda g: g.generate(None, 4)),
    ("prompt bytes", lambda g: g.generate(b"hi", 4)),
    ("prompt empty without the chat template", lambda g: g.generate("", 4, chat=False)),
    ("max tokens a string", lambda g: g.generate("hi", "4")),
    ("max tokens past context", lambda g: g.generate("hi", 10 ** 9)),
    ("temperature nan", lambda g: g.generate("hi", 4, temperature=math.nan)),
    ("temperature a string", lambda g: g.generate("hi", 4, temperature="hot")),
    ("top_p zero", lambda g: g.generate("hi", 4, top_p=0.0)),
    ("top_k a float", lambda g: g.generate("hi", 4, top_k=2.5)),
    ("seed a float", lambda g: g.generate("hi", 4, seed=1.5)),
    ("unknown drafter", lambda g: g.generate("hi", 4, drafter="nosuch")),
    ("empty drafter", lambda g: g.generate("hi", 4, drafter="")),
    ("tree word", lambda g: g.generate("hi", 4, tree="bushy")),
    ("num_draft past the limit", lambda g: g.generate("hi", 4, num_draft=10 ** 6)),
    ("num_draft and a tree", lambda g: g.generate("hi", 4, num_draft=3, tree="dynamic:8")),
    ("stop not text", lambda g: g.generate("hi", 4, stop=[None])),
    ("stop a number", lambda g: g.generate("hi", 4, stop=7)),
    ("chat not a list", lambda g: g.chat("hello", 4)),
    ("chat message without content", lambda g: g.chat([{"role": "user"}], 4)),
    ("chat unknown role", lambda g: g.chat([{"role": "wizard", "content": "hi"}], 4)),
    ("chat content not text", lambda g: g.chat([{"role": "user", "content": 5}], 4)),
    ("stream bad before the first chunk", lambda g: next(g.stream("hi", 4, temperature=-1.0))),
    ("an option of another library", lambda g: g.generate("hi", max_tokens=4)),
    ("an unknown option through chat", lambda g: g.chat([{"role": "user", "content": "hi"}], 4, do_sample=True)),
    ("params beside a temperature", lambda g: g.generate("hi", 4, params=SamplingParams(), temperature=0.7)),
    ("speculate a string", lambda g: g.generate("hi", 4, speculate="no")),
    ("chat a string", lambda g: g.generate("hi", 4, chat="no")),
    ("chat() given chat a string", lambda g: g.chat([{"role": "user", "content": "hi"}], 4, chat="no")),
    ("a drafter without speculation", lambda g: g.generate("hi", 4, speculate=False, drafter="lookup")),
    ("a tree without speculation", lambda g: g.generate("hi", 4, speculate=False, tree="chain:3")),
    ("acceptance empty", lambda g: g.generate("hi", 4, temperature=0.7, acceptance="")),
    ("adaptive tree naming no depth", lambda g: g.generate("hi", 4, tree="adaptive:")),
]


@pytest.mark.parametrize("name, call", API, ids=[c[0] for c in API])
def test_api_bad_input_is_a_speccompile_error(tiny_generator, name, call):
    with pytest.raises(SpeccompileError):
        call(tiny_generator)
    assert tiny_generator.generate("hi", 3).token_ids  # still usable afterwards
