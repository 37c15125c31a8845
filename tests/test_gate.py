"""`speccompile gate` refuses what it cannot read: NaN/inf, missing or non-numeric figures and thresholds, a
baseline without figures. Each gives one `error:` line and exit 2, never "gate passed". On a synthetic result
document (the schema of speccompile.bench.report), so no model is decoded here."""
import copy
import json

import pytest
from click.testing import CliRunner

from speccompile.bench.gate import (GateInputError, check_comparable, check_figure, gated_figures, load_result,
                                    parse_threshold)
from speccompile.bench.settings import SCHEMA_VERSION
from speccompile.cli import main

CATEGORIES = ("writing", "coding")


def _figures(speedup: float, accepted: float, rates: list | None) -> dict:
    return {"paired_speedup": speedup, "mean_accepted_tokens": accepted, "acceptance_rate_per_depth": rates,
            "identical_to_autoregressive": 1.0}


def result_doc() -> dict:
    """A bench result with one drafter, lookup, in two categories: the parts the gate reads."""
    def group():
        return {"autoregressive": _figures(1.0, 1.0, None), "lookup": _figures(1.3, 1.5, [0.45, 0.28, 0.0])}
    return {
        "schema_version": SCHEMA_VERSION,
        "bundle": {"source": {"kind": "tiny", "path": "tiny:llama", "sha256": "ab" * 32},
                   "drafters": [{"name": "lookup", "kind": "lookup", "num_draft": 4}]},
        "settings": {"max_new_tokens": 48, "tree": None, "dataset_sha256": "cd" * 32, "threads": 2, "repeats": 3},
        "methods": [{"name": "autoregressive", "engine": "speccompile", "drafter": None},
                    {"name": "lookup", "engine": "speccompile", "drafter": "lookup"}],
        "prompts": [{"question_id": i, "category": c} for i, c in enumerate(CATEGORIES)],
        "summary": {"overall": group(), "by_category": {c: group() for c in CATEGORIES}},
    }


def gate(tmp_path, result: dict, baseline: dict, *options, expect: int):
    (tmp_path / "result.json").write_text(json.dumps(result))
    (tmp_path / "baseline.json").write_text(json.dumps(baseline))
    r = CliRunner().invoke(main, ["gate", str(tmp_path / "result.json"), "--baseline", str(tmp_path / "baseline.json"),
                                  *map(str, options)])
    assert r.exit_code == expect, r.output
    return r.output


def refused(tmp_path, result: dict, baseline: dict, *options) -> str:
    out = gate(tmp_path, result, baseline, *options, expect=2)
    assert out.count("error:") == 1 and out.startswith("error:"), out
    assert "gate passed" not in out and "Traceback" not in out
    return out


def overall_lookup(doc: dict) -> dict:
    return doc["summary"]["overall"]["lookup"]


def test_a_sound_result_passes_and_a_regression_fails(tmp_path):
    assert "gate passed: 8 figures" in gate(tmp_path, result_doc(), result_doc(), expect=0)
    worse = result_doc()
    overall_lookup(worse)["paired_speedup"] = 1.0
    assert "gate FAILED: speedup lookup" in gate(tmp_path, worse, result_doc(), expect=1)


def test_an_adaptive_method_is_held_by_its_speedup_and_the_floors(tmp_path):
    """Adaptive drafting verifies what the pass times it measures make worth it: its accepted tokens may move
    between runs (floor only) and it has no per-category or per-depth rows; its paired speedup is gated."""
    def adaptive(doc, accepted, speedup=1.3):
        for group in [doc["summary"]["overall"], *doc["summary"]["by_category"].values()]:
            group["lookup"] |= {"plain_pass_share": 0.1, "mean_accepted_tokens": accepted, "paired_speedup": speedup}
        return doc
    base = adaptive(result_doc(), 1.5)
    assert "gate passed: 3 figures" in gate(tmp_path, adaptive(result_doc(), 1.2), base, "--min-accepted", 1.1,
                                            expect=0)
    assert "below the floor 1.3" in gate(tmp_path, adaptive(result_doc(), 1.2), base, "--min-accepted", 1.3,
                                         expect=1)
    assert "gate FAILED: speedup lookup" in gate(tmp_path, adaptive(result_doc(), 1.5, 1.1), base, expect=1)


def test_adaptive_accepted_tokens_count_the_drafting_passes():
    """A plain step commits one token: an adaptive method's accepted row leaves its plain steps out."""
    doc = result_doc()
    overall_lookup(doc).update(plain_pass_share=0.5, mean_accepted_tokens=1.4)
    assert gated_figures(doc)["accepted lookup per drafting pass"] == pytest.approx(1.8)


def test_adaptive_accepted_tokens_pooled_by_the_bench_are_preferred():
    """The bench pools the drafting passes over every prompt; the estimate from the mean plain share (an
    unweighted mean over prompts) is kept only for results that predate that figure."""
    doc = result_doc()
    overall_lookup(doc).update(plain_pass_share=0.5, mean_accepted_tokens=1.4, mean_accepted_per_drafting_pass=1.9)
    assert gated_figures(doc)["accepted lookup per drafting pass"] == pytest.approx(1.9)


def test_speculative_output_unlike_plain_decoding_fails(tmp_path):
    """A verifier that took a wrong draft would look faster: under greedy decoding an exact method's output must
    equal plain decoding's on every prompt, whatever its baseline says; a lossy acceptance is not held to it."""
    bad = result_doc()
    overall_lookup(bad)["identical_to_autoregressive"] = 0.5
    assert "FAIL: below the floor 1" in gate(tmp_path, bad, result_doc(), expect=1)
    for tiny in (1e-6, 0):  # a temperature below GREEDY_BELOW decodes greedily too
        bad["settings"]["temperature"] = tiny
        assert "identical lookup" in gated_figures(bad)
    bad["settings"]["temperature"] = 0.7
    assert "identical lookup" not in gated_figures(bad)
    typical = result_doc()
    typical["methods"][1]["name"] = "lookup~typical"
    typical["summary"]["overall"]["lookup~typical"] = typical["summary"]["overall"].pop("lookup")
    for group in typical["summary"]["by_category"].values():
        group["lookup~typical"] = group.pop("lookup")
    assert "identical lookup~typical" not in gated_figures(typical)
    assert "identical lookup@static:/home/a~b/t.json" in gated_figures(renamed("lookup@static:/home/a~b/t.json"))
    assert "identical lookup~exact" in gated_figures(renamed("lookup~exact"))


def renamed(name: str) -> dict:
    """result_doc() with its lookup method named `name`."""
    doc = result_doc()
    doc["methods"][1]["name"] = name
    for group in [doc["summary"]["overall"], *doc["summary"]["by_category"].values()]:
        group[name] = group.pop("lookup")
    return doc


def test_a_sampled_result_is_not_compared_with_a_greedy_baseline(tmp_path):
    sampled = result_doc()
    sampled["settings"].update(temperature=0.7, top_k=20)
    assert "temperature differs" in refused(tmp_path, sampled, result_doc())
    explicit = result_doc()
    explicit["settings"].update(temperature=0.0, top_k=0)  # a baseline without the keys decoded greedily
    assert "gate passed" in gate(tmp_path, explicit, result_doc(), expect=0)


def built(weights: str, dtype: str, doc: dict | None = None) -> dict:
    """result_doc() (or doc) of a build with these --weights and --dtype, as bench records them."""
    doc = result_doc() if doc is None else copy.deepcopy(doc)
    doc["bundle"]["target"] = {**doc["bundle"].get("target", {}), "weights": weights, "dtype": dtype}
    return doc


def test_builds_with_other_weights_or_dtype_are_not_compared(tmp_path):
    """One source built as float32 decodes otherwise than its 4-bit blocks: such results are refused, one line."""
    assert "different --weights ('source' vs 'float32')" in refused(tmp_path, built("float32", "float32"),
                                                                    built("source", "float32"))
    assert "different --dtype ('float32' vs 'float16')" in refused(tmp_path, built("source", "float16"),
                                                                   built("source", "float32"))
    out = gate(tmp_path, built("int4", "float16"), built("int4", "float16"), expect=0)
    assert "gate passed" in out and "note:" not in out
    half_cache = built("source", "float32")
    half_cache["bundle"]["target"]["kv_dtype"] = "float16"  # build --kv-dtype float16
    assert "different --kv-dtype ('float32' vs 'float16')" in refused(tmp_path, half_cache, built("source", "float32"))


def test_a_result_from_before_the_build_was_recorded_is_taken_as_the_default_build(tmp_path):
    """A baseline without the build's weights and dtype (the committed CI baseline predates them) is taken as the
    default build's, with a note; a refusal that rests on that says so and how to record the build."""
    old = result_doc()  # no bundle.target: from before bench recorded it
    out = gate(tmp_path, built("source", "float32"), old, expect=0)
    assert "note: the baseline records no build --weights/--dtype" in out and "--weights source --dtype float32" in out
    out = refused(tmp_path, built("float32", "float32"), old)
    assert "different --weights ('source' vs 'float32')" in out and "bench that build again" in out
    assert "different --dtype" in refused(tmp_path, old, built("source", "float16"))


def test_the_committed_ci_baseline_is_compared_only_with_the_default_build():
    """tools/ci_gate.sh gates a default build (its GGUF's blocks, float32) against tools/ci_baseline.json."""
    import os
    baseline = load_result(os.path.join(os.path.dirname(__file__), "..", "tools", "ci_baseline.json"))
    check_comparable(baseline, built("source", "float32", baseline))
    with pytest.raises(GateInputError, match="different --weights"):
        check_comparable(baseline, built("float32", "float32", baseline))


def test_speedups_measured_on_another_cpu_are_held_by_their_floors(tmp_path):
    """Another CPU runs other kernels, whose relative costs differ: a speedup below the baseline's tolerance is
    noted, not failed, unless it falls under the floor; the same CPU keeps the tolerance."""
    def on(cpu, speedup):
        doc = result_doc()
        doc["machine"] = {"cpu": {"model": cpu, "kernel_flags": ["avx2"]}}
        overall_lookup(doc)["paired_speedup"] = speedup
        return doc
    out = gate(tmp_path, on("B", 1.1), on("A", 1.3), "--min-speedup", 1.05, expect=0)
    assert "ran on another CPU" in out and "gate passed" in out
    assert "below the floor 1.05" in gate(tmp_path, on("B", 1.0), on("A", 1.3), "--min-speedup", 1.05, expect=1)
    assert "gate FAILED: speedup lookup" in gate(tmp_path, on("A", 1.1), on("A", 1.3), expect=1)


BAD_FIGURES = {
    "NaN": float("nan"), "infinity": float("inf"), "minus infinity": float("-inf"), "text": "1.3", "a bool": True,
    "null": None, "a list": [1.3], "negative": -1.3,
}


@pytest.mark.parametrize("side", ["result", "baseline"])
@pytest.mark.parametrize("bad", BAD_FIGURES, ids=list(BAD_FIGURES))
def test_a_bad_overall_speedup_is_refused(tmp_path, side, bad):
    doc = result_doc()
    overall_lookup(doc)["paired_speedup"] = BAD_FIGURES[bad]
    result, baseline = (doc, result_doc()) if side == "result" else (result_doc(), doc)
    assert "speedup lookup" in refused(tmp_path, result, baseline)


@pytest.mark.parametrize("side", ["result", "baseline"])
def test_nan_in_a_category_or_a_depth_is_refused(tmp_path, side):
    for mutate in (lambda d: d["summary"]["by_category"]["coding"]["lookup"].update(mean_accepted_tokens=float("nan")),
                   lambda d: overall_lookup(d)["acceptance_rate_per_depth"].__setitem__(1, float("nan"))):
        doc = result_doc()
        mutate(doc)
        result, baseline = (doc, result_doc()) if side == "result" else (result_doc(), doc)
        refused(tmp_path, result, baseline)


@pytest.mark.parametrize("side", ["result", "baseline"])
@pytest.mark.parametrize("key", ["paired_speedup", "mean_accepted_tokens"])
def test_a_missing_figure_is_refused(tmp_path, side, key):
    doc = result_doc()
    del overall_lookup(doc)[key]
    result, baseline = (doc, result_doc()) if side == "result" else (result_doc(), doc)
    assert "missing" in refused(tmp_path, result, baseline)


def test_a_missing_method_summary_or_category_is_refused(tmp_path):
    doc = result_doc()
    del doc["summary"]["overall"]["lookup"]
    assert "lookup" in refused(tmp_path, doc, result_doc())
    doc = result_doc()
    del doc["summary"]["by_category"]["coding"]["lookup"]
    assert "accepted lookup / coding" in refused(tmp_path, doc, result_doc())


def test_a_baseline_without_figures_is_refused(tmp_path):
    empty = result_doc()
    empty["methods"] = empty["methods"][:1]  # autoregressive only: nothing to gate
    assert "no gated figures" in refused(tmp_path, result_doc(), empty)


@pytest.mark.parametrize("mutate", [
    lambda d: d.update(summary=[]),
    lambda d: d["summary"].update(overall="fast"),
    lambda d: d["summary"].update(by_category=None),
    lambda d: d.update(methods=[{"engine": "speccompile", "drafter": "lookup"}]),
    lambda d: d["bundle"].update(drafters={"lookup": 4}),
    lambda d: d.update(prompts=[1, 2]),
    lambda d: overall_lookup(d).update(acceptance_rate_per_depth="0.4 0.3"),
    lambda d: d.update(machine="a fast one"),
    lambda d: d["bundle"].update(target="float32"),
    lambda d: d["summary"]["by_category"]["coding"].update(lookup=[1.5]),  # was an internal error, exit 3
], ids=["summary a list", "overall a string", "no categories", "nameless method", "drafters an object",
        "prompts numbers", "rates a string", "machine a string",
        "target a string", "a category's method a list"])
def test_a_malformed_result_is_refused(tmp_path, mutate):
    doc = result_doc()
    mutate(doc)
    refused(tmp_path, doc, result_doc())
    refused(tmp_path, result_doc(), doc)


@pytest.mark.parametrize("option, value", [
    ("--max-regression", "nan"), ("--max-regression", "inf"), ("--max-regression", "-0.05"),
    ("--max-regression", "five"), ("--max-regression", ""), ("--min-speedup", "nan"), ("--min-speedup", "-1"),
    ("--min-speedup", "inf"), ("--min-accepted", "NaN"), ("--min-accepted", "x"),
])
def test_a_bad_threshold_is_refused(tmp_path, option, value):
    assert option in refused(tmp_path, result_doc(), result_doc(), option, value)


def test_good_thresholds_are_read_as_numbers(tmp_path):
    out = gate(tmp_path, result_doc(), result_doc(), "--max-regression", "0", "--min-speedup", "1.2",
               "--min-accepted", "1.4", expect=0)
    assert "gate passed" in out
    out = gate(tmp_path, result_doc(), result_doc(), "--min-speedup", "1.31", expect=1)
    assert "below the floor 1.31" in out


def test_the_library_checks_too():
    assert check_figure("x", 2, "here") == 2.0 and parse_threshold("--min-speedup", None) is None
    assert parse_threshold("--max-regression", "0.06") == 0.06
    for bad in (float("nan"), "1", None, False, -0.1):
        with pytest.raises(GateInputError):
            check_figure("x", bad, "here")
    doc = result_doc()
    overall_lookup(doc)["mean_accepted_tokens"] = float("nan")
    with pytest.raises(GateInputError, match="accepted lookup"):
        gated_figures(doc)


def test_the_tolerance_is_applied_once_on_each_side_of_the_line(tmp_path):
    """A drop just past --max-regression fails and one just within passes: the gate's edge is where it says."""
    def lookup_speedup(speedup):
        doc = result_doc()
        overall_lookup(doc)["paired_speedup"] = speedup
        return doc
    base = lookup_speedup(1.5)
    assert "gate passed" in gate(tmp_path, lookup_speedup(1.5 * 0.955), base, "--max-regression", 0.05, expect=0)
    out = gate(tmp_path, lookup_speedup(1.5 * 0.94), base, "--max-regression", 0.05, expect=1)
    assert "gate FAILED: speedup lookup" in out and "-6.0%, more than the allowed -5.0%" in out


def test_a_result_lacking_a_depth_the_baseline_has_is_refused(tmp_path):
    """A baseline row the result lacks is refused by name, never skipped as if it had passed."""
    shallow = result_doc()
    overall_lookup(shallow)["acceptance_rate_per_depth"] = [0.45, 0.28]
    assert "lacks figures the baseline has: acceptance lookup depth 3" in refused(tmp_path, shallow, result_doc())


def test_results_over_other_prompts_or_drafters_are_not_compared(tmp_path):
    other_prompts = result_doc()
    other_prompts["prompts"][1]["question_id"] = 7
    assert "the prompts differ" in refused(tmp_path, other_prompts, result_doc())
    more_drafts = result_doc()
    more_drafts["bundle"]["drafters"][0]["num_draft"] = 6
    assert "the bundles' drafters differ" in refused(tmp_path, more_drafts, result_doc())


def test_the_same_drafters_in_another_order_are_compared():
    """The drafters' order picks the default drafter (a build over speccompile's kernels puts prompt lookup first),
    not what each method measures: each method's figures are compared by name."""
    head = {"name": "mtp", "kind": "mtp", "num_draft": 2}
    baseline, result = result_doc(), result_doc()
    baseline["bundle"]["drafters"].insert(0, head)
    result["bundle"]["drafters"].append(head)
    check_comparable(baseline, result)  # not refused
    result["bundle"]["drafters"][-1] = dict(head, num_draft=3)
    with pytest.raises(GateInputError, match="drafters differ"):
        check_comparable(baseline, result)


def test_bundles_whose_drafter_drafts_another_tree_are_not_compared(tmp_path):
    """build --tree: the drafter drafts that tree (bench records it beside the drafter), whose accepted tokens are
    another tree's; the gate once read it as a regression (or a pass) of the same build."""
    def drafting(tree):
        doc = result_doc()
        doc["bundle"]["drafters"][0]["tree"] = tree
        return doc
    out = refused(tmp_path, drafting("chain:2"), drafting("dynamic:4"))
    assert "drafter 'lookup' drafts another tree ('dynamic:4' vs 'chain:2')" in out
    assert "gate passed" in gate(tmp_path, drafting("chain:2"), drafting("chain:2"), expect=0)
    # a baseline from before bench recorded trees (tools/ci_baseline.json) is still compared
    assert "gate passed" in gate(tmp_path, drafting("adaptive:4+lookup:6"), result_doc(), expect=0)
