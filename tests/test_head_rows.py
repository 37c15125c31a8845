"""An output head on the int8 grid (a GGUF Q8_0 head, tied to the embedding, as SmolLM2's is) kept as int8 rows
(kernel_form.head_rows, GatherQ8F): the bundle holds no float32 copy of it, every graph computes the same numbers as
over the float32 table, and a drafter whose graph reads the table whole keeps it."""
from unittest import mock

import numpy as np
import pytest
from safetensors import numpy as safetensors_numpy

import speccompile
from speccompile.compile import driver
from speccompile.compile.driver import build_bundle
from speccompile.compile.presets import tiny_mtp_head
from speccompile.compile.quantize.kernel_form import kernels_pay
from speccompile.compile.quantize.target_weights import HEAD_ON_ROWS, HEAD_READ_WHOLE
from speccompile.compile.sources import load_checkpoint
from speccompile.format.bundle import read_manifest
from speccompile.format.summary import describe, pass_weight_bytes
from speccompile.plugins import q4_matmul
from speccompile.runtime.engine import Engine
from conftest import quiet, random_prompts
from test_gguf import write_tiny_llama_gguf

WHY = q4_matmul.unavailable() or (None if kernels_pay() else "the build keeps onnxruntime's products on this CPU "
                                  "(speccompile's kernels pay with AVX-512 VNNI only)")
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"no int8 rows without speccompile's kernels: {WHY}")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """A tiny llama GGUF whose tied embedding is Q8_0, with prompt lookup and an MTP head: built as the default
    build is ("rows"), and with the float32 table instead of the int8 rows ("table", kernel_form.head_rows off)."""
    d = tmp_path_factory.mktemp("head_rows")
    write_tiny_llama_gguf(d / "tiny.gguf")  # the embedding first, in Q8_0
    cfg = load_checkpoint(str(d / "tiny.gguf"), progress=quiet).config
    safetensors_numpy.save_file(tiny_mtp_head(cfg, repeat_last=True), str(d / "head.safetensors"))
    drafts = ["lookup", f"mtp:{d / 'head.safetensors'}"]
    build_bundle(str(d / "tiny.gguf"), str(d / "rows"), drafts=drafts, max_seq_len=256, progress=quiet)
    with mock.patch.object(driver, "head_rows", lambda weights: {}):
        build_bundle(str(d / "tiny.gguf"), str(d / "table"), drafts=drafts, max_seq_len=256, progress=quiet)
    return d


def test_the_bundle_keeps_no_float32_copy_of_the_head(bundles):
    rows, table = (read_manifest(str(bundles / b)) for b in ("rows", "table"))
    stored = rows["weights"]["target.bin"]
    assert "embed" not in stored and "head_screen.rows" in stored and "embed" in table["weights"]["target.bin"]
    assert not any("embed" in m.get("initializers", ()) for m in rows["models"].values())
    assert rows["quantization"]["fallbacks"]["embed"] == HEAD_ON_ROWS
    assert set(table["weights"]["target.bin"]) ^ set(stored) == {"embed", "head_screen.rows"}
    assert rows["files"]["target.bin"]["bytes"] < table["files"]["target.bin"]["bytes"]
    # a step reads one int8 row of the head instead of one float32 row of the table, and never the rows whole
    hidden = rows["models"]["target"]["config"]["hidden_size"]
    step = {k: pass_weight_bytes(m, m["models"]["target"], 0) for k, m in (("rows", rows), ("table", table))}
    for kind in ("full", "screened"):
        assert step["table"][kind] - step["rows"][kind] == 4 * hidden - (hidden + 4 * hidden // 32), kind
    lines = "\n".join(describe(str(bundles / "rows"), rows, True))
    assert "int8 rows" in lines and "decode step reads" in lines
    assert rows["quantization"]["formats"] == table["quantization"]["formats"]  # the values: float32


def test_every_graph_computes_what_it_computes_over_the_float32_table(bundles):
    """The target graph's float32 logits and screened argmaxes, and every decoding mode's tokens (plain, prompt
    lookup, the MTP head, sampled, four requests sharing passes), are those of the build with the float32 table."""
    a, b = (speccompile.load(str(bundles / x), threads=1, context_cache=False) for x in ("rows", "table"))
    prompts = random_prompts(4)
    for prompt in prompts:
        for full in (True, False):
            got = [Engine(str(bundles / x), read_manifest(str(bundles / x))["models"]["target"], threads=1)
                   .forward(np.array(prompt), rows=np.arange(len(prompt)), full_logits=full) for x in ("rows", "table")]
            assert all(np.array_equal(x, y) for x, y in zip(*got)), full
        for kw in ({"speculate": False}, {"drafter": "lookup"}, {"drafter": "mtp"}, {"temperature": 0.9, "seed": 5},
                   {"temperature": 0.9, "top_p": 0.8, "seed": 5, "drafter": "mtp"}):
            assert a.generate(prompt, 24, chat=False, **kw).token_ids == b.generate(prompt, 24, chat=False,
                                                                                    **kw).token_ids, kw
        # the MTP head's own graph embeds its tokens from the int8 rows: a fixed chain drafts the same nodes
        ra, rb = (g.generate(prompt, 24, chat=False, drafter="mtp", tree="chain:3") for g in (a, b))
        assert (ra.stats["proposed"], ra.stats["verify_steps"]) == (rb.stats["proposed"], rb.stats["verify_steps"])
    together = [r.token_ids for r in a.generate(prompts, 24, chat=False)]
    assert together == [r.token_ids for r in b.generate(prompts, 24, chat=False)]


def test_an_early_exit_reads_the_int8_head_too(bundles, tmp_path):
    """An early exit's graph takes its rows and its float32 logits from the int8 head as well (GatherQ8F,
    MatMulQ8F): the bundle keeps no table, and its drafts stay lossless."""
    build_bundle(str(bundles / "tiny.gguf"), str(tmp_path / "b"), drafts=["layerskip:1"], max_seq_len=64,
                 progress=quiet)
    m = read_manifest(str(tmp_path / "b"))
    assert "embed" not in m["weights"]["target.bin"]
    assert {"head_screen.rows", "head_screen.codes"} <= set(m["models"]["early_exit_1"]["initializers"])
    g = speccompile.load(str(tmp_path / "b"), threads=1, context_cache=False)
    for prompt in random_prompts(3):
        assert g.generate(prompt, 24, chat=False).token_ids == g.generate(prompt, 24, chat=False,
                                                                          speculate=False).token_ids


def test_a_draft_head_that_multiplies_by_the_float32_head_keeps_it(bundles, tmp_path):
    """A float32 draft head scoring with the target's head (--draft-precision float32) reads the float32 table
    whole: the table stays, and the build says why."""
    build_bundle(str(bundles / "tiny.gguf"), str(tmp_path / "b"), drafts=[f"mtp:{bundles / 'head.safetensors'}"],
                 max_seq_len=64, draft_precision="float32", progress=quiet)
    m = read_manifest(str(tmp_path / "b"))
    assert "embed" in m["weights"]["target.bin"] and "head_screen.rows" in m["weights"]["target.bin"]
    assert m["quantization"]["fallbacks"]["embed"] == HEAD_READ_WHOLE
