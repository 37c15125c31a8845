"""`build --kv-dtype float16` (compile/kv_dtype.py): float32 graphs over float16 KV caches, on speccompile's
attention kernel. What the bundle holds, that speculation and shared passes over it stay exact, that the context
cache keeps its blocks in float16, and the builds it refuses before writing anything."""
import os

import numpy as np
import pytest

from speccompile.errors import SpeccompileError
from speccompile.plugins import q4_matmul

from conftest import graph_ops

WHY = q4_matmul.unavailable()
needs_kernels = pytest.mark.skipif(WHY is not None, reason=f"speccompile's kernels cannot run here: {WHY}")


def build(out, **options):
    from speccompile.compile.driver import build_bundle
    return build_bundle("tiny:llama", str(out), progress=lambda *a: None, **options)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("kv16") / "b"
    return str(out), build(out, drafts=["layerskip:2", "lookup"], max_seq_len=128, attention="kernel",
                           kernels="speccompile", kv_dtype="float16")


@needs_kernels
def test_every_cache_of_the_bundle_is_float16(bundle):
    out, m = bundle
    cached = {n: e for n, e in m["models"].items() if "kv_cache" in e}
    assert cached and {e["kv_cache"]["dtype"] for e in cached.values()} == {"float16"}
    for e in cached.values():
        io = [x for x in (*e["inputs"], *e["outputs"]) if x["name"].startswith(("past_", "present_"))]
        assert io and {x["dtype"] for x in io} == {"float16"}
        assert {x["dtype"] for x in e["outputs"] if x["name"] == "logits"} <= {"float32"}
        ops = graph_ops(os.path.join(out, e["graph"]))
        assert "TreeAttentionF16" in ops and "TreeAttention" not in ops


@needs_kernels
def test_speculation_and_shared_passes_over_float16_caches_are_exact(bundle):
    import speccompile
    g = speccompile.load(bundle[0], threads=1, context_cache=False)
    assert g.target.cache.key.dtype == np.float16
    rng = np.random.default_rng(11)
    prompts = []
    for n in (7, 26, 40):
        base = [int(t) for t in rng.integers(3, 300, n)]
        prompts.append(base + base[:5])
    alone = [g.generate(p, max_new_tokens=20, speculate=False).token_ids for p in prompts]
    for p, plain in zip(prompts, alone):
        for drafter in ("layerskip:2", "lookup"):
            assert g.generate(p, max_new_tokens=20, drafter=drafter).token_ids == plain, drafter
    assert [r.token_ids for r in g.generate(prompts, max_new_tokens=20)] == alone


@needs_kernels
def test_the_context_cache_restores_float16_blocks(bundle):
    import speccompile
    g = speccompile.load(bundle[0], threads=1)
    prompt = [int(t) for t in np.random.default_rng(12).integers(3, 300, 70)]
    first = g.generate(prompt, max_new_tokens=12, speculate=False)
    again = g.generate(prompt, max_new_tokens=12, speculate=False)
    assert again.token_ids == first.token_ids
    assert again.stats["prompt_cache_hit_tokens"] > 0 and first.stats["prompt_cache_hit_tokens"] == 0


@pytest.mark.parametrize("options, words", [
    (dict(attention="ort", kv_dtype="float16"), "attention kernel"),
    (dict(dtype="float16", kv_dtype="float32"), "kv_dtype"),
    (dict(kv_dtype="int8"), "kv_dtype"),
])
def test_builds_it_cannot_honour_are_refused_before_writing(tmp_path, options, words):
    with pytest.raises(SpeccompileError, match=words):
        build(tmp_path / "b", drafts=["lookup"], max_seq_len=64, **options)
    assert not (tmp_path / "b").exists()


def test_float32_and_the_builds_own_dtype_are_no_change(tmp_path):
    m = build(tmp_path / "b", drafts=["lookup"], max_seq_len=64, attention="ort", kv_dtype="float32")
    assert {e["kv_cache"]["dtype"] for e in m["models"].values() if "kv_cache" in e} == {"float32"}
