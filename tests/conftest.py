import hashlib
import json
import os
import shutil
from collections import Counter

import numpy as np
import pytest

from speccompile.compile.driver import build_bundle
from speccompile.compile.gguf_tokenizer import tokenizer_files
from speccompile.graphs.builder import GraphBuilder
from speccompile.plugins import tree_attention as ta


def quiet(*_):
    pass


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """Tiny llama target with every drafter kind: lookup, early exit, and a separate draft model."""
    out = str(tmp_path_factory.mktemp("bundles") / "tiny-llama")
    build_bundle("tiny:llama", out, drafts=["lookup", "layerskip:2", "model:tiny:llama-draft"], max_seq_len=256,
                 num_draft=4, progress=quiet)
    return out


@pytest.fixture(scope="session")
def tiny_generator(tiny_bundle):
    import speccompile
    return speccompile.load(tiny_bundle, threads=1)


def byte_fallback_tokenizer_files(vocab_size: int = 384) -> dict[str, bytes]:
    """A Llama-2-style tokenizer (sentencepiece pieces with byte fallback, BOS added to a text) of the tiny models'
    vocabulary size: <unk> <s> </s>, the 256 byte tokens, then the commonest pieces of a short text."""
    text = "Hello world. The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs."
    spelled = "▁" + text.replace(" ", "▁")
    counts = Counter(spelled[i:i + n] for n in (1, 2, 3, 4) for i in range(len(spelled) - n + 1))
    pieces = [p for p, _ in counts.most_common(vocab_size - 259)]
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>"] +
            [f"<0x{b:02X}>" for b in range(256)] + pieces, "tokenizer.ggml.scores": [0.0] * 259 +
            [-float(i) for i in range(len(pieces))], "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 +
            [1] * len(pieces), "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0}
    assert len(meta["tokenizer.ggml.tokens"]) == vocab_size
    return tokenizer_files(meta)


@pytest.fixture(scope="session")
def byte_fallback_bundle(tiny_bundle, tmp_path_factory):
    """The tiny bundle with byte_fallback_tokenizer_files(): its random model emits byte tokens that often do not
    form UTF-8."""
    out = str(tmp_path_factory.mktemp("bundles") / "tiny-byte-fallback")
    shutil.copytree(tiny_bundle, out)
    manifest = json.loads(open(os.path.join(out, "manifest.json")).read())
    for name, data in byte_fallback_tokenizer_files().items():
        with open(os.path.join(out, "tokenizer", name), "wb") as f:
            f.write(data)
        manifest["files"][f"tokenizer/{name}"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return out


def random_prompts(n, vocab=384, seed=0):
    rng = np.random.default_rng(seed)
    # repeat a phrase inside some prompts so that prompt lookup finds matches
    out = []
    for i in range(n):
        base = list(rng.integers(3, vocab, 8 + 3 * i))
        out.append(base + base[: 4 + i % 5] if i % 2 else base)
    return out


def assert_lossless(g, drafter, prompts, max_new_tokens, tree=None):
    """Speculative greedy output equals plain greedy output on every prompt; returns the mean accepted tokens
    per prompt (so callers can check the drafter was right at least sometimes)."""
    accepted = []
    for prompt in prompts:
        ref = g.generate(prompt, max_new_tokens, speculate=False)
        res = g.generate(prompt, max_new_tokens, drafter=drafter, tree=tree)
        assert res.token_ids == ref.token_ids, (drafter, tree, prompt)
        accepted.append(res.stats["mean_accepted_tokens"])
    return accepted


def tree_attention_graph(lowering, hq, hkv, d, lmax, fixed_total_len=True) -> GraphBuilder:
    """The TreeAttention op alone in a graph: inputs as the decoder feeds them, outputs y and the present caches.
    fixed_total_len: pass lmax as the kernel's total length (the plugin lowering takes none). The caches have
    the lowering's scratch slots past lmax, the rotary tables lmax + 1 rows (as the decoder graphs have them)."""
    g = GraphBuilder("tree_attention")
    g.input("qkv", "float32", [1, "S", (hq + 2 * hkv) * d])
    slots = lmax + ta.scratch_slots(lowering)
    for n in ("past_key", "past_value"):
        g.input(n, "float32", [1, hkv, slots, d])
    g.input("seqlens_k", "int32", [1])
    g.input("position_ids", "int64", [1, "S"])
    g.input("attention_bias", "float32", [1, 1, "S", lmax])
    g.input("cos", "float32", [lmax + 1, d // 2])
    g.input("sin", "float32", [lmax + 1, d // 2])
    total = g.const(np.array(lmax, np.int32)) if fixed_total_len else ""
    y = ta.lower(g, lowering, "qkv", "past_key", "past_value", "present_key", "present_value", seqlens_k="seqlens_k",
                 total_len=total, cos="cos", sin="sin", position_ids="position_ids", attention_bias="attention_bias",
                 num_heads=hq, kv_num_heads=hkv, head_dim=d)
    g.op("Identity", [y], outputs=["y"])
    g.output("y", "float32", [1, "S", hq * d])
    for n in ("present_key", "present_value"):
        g.output(n, "float32", [1, hkv, slots, d])
    return g


def run_attention_in_place(sess, feeds: dict, k, v):
    """One run of a TreeAttention graph (tree_attention_graph's inputs and outputs) with the caches k and v bound as
    both past and present, so the op writes them in place; returns y."""
    import onnxruntime as ort
    io = sess.io_binding()
    for name, a in feeds.items():
        io.bind_cpu_input(name, a)
    kov, vov = ort.OrtValue.ortvalue_from_numpy(k), ort.OrtValue.ortvalue_from_numpy(v)
    io.bind_ortvalue_input("past_key", kov)
    io.bind_ortvalue_input("past_value", vov)
    io.bind_ortvalue_output("present_key", kov)
    io.bind_ortvalue_output("present_value", vov)
    io.bind_output("y")
    sess.run_with_iobinding(io)
    return io.get_outputs()[2].numpy()  # bound in order: present_key, present_value, y


def op_types(graph) -> set[str]:
    """The op types of an onnx GraphProto's nodes and of its subgraphs' (If branches)."""
    out = set()
    for n in graph.node:
        out.add(n.op_type)
        for a in n.attribute:
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                out |= op_types(g)
    return out


def graph_ops(path: str) -> set[str]:
    """op_types of a graph file (its weights not loaded)."""
    import onnx
    return op_types(onnx.load(path, load_external_data=False).graph)
