"""`speccompile bench` and `speccompile gate`: the result schema, the gate's verdicts, the CLI end to end."""
import argparse
import copy
import json

import pytest
from click.testing import CliRunner

from speccompile.bench.plot import group_speedups, plot, plot_title
from speccompile.bench.prompts import default_dataset, load_questions
from speccompile.bench.run import run_bench
from speccompile.bench.settings import SCHEMA_VERSION, BenchSettings
from speccompile.bench import stats
from speccompile.bench.stats import geometric_mean, paired_interval, repeated_ngram_share
from speccompile.cli import main
from speccompile.errors import SpeccompileError
from tools_util import tool

SHIPPED_CATEGORIES = {"writing", "qa", "summarization", "translation", "math_reasoning", "coding", "rag",
                      "extraction"}
# Short prompts: the tiny test bundles have a 256-token context and a byte-level tokenizer.
QUESTIONS = [
    {"question_id": 1, "category": "repeat", "turns": ["one two three four one two three four one two"]},
    {"question_id": 2, "category": "chat", "turns": ["Say hello to the reader."]},
    {"question_id": 3, "category": "repeat", "turns": ["a b c a b c a b c a b"]},
    {"question_id": 4, "category": "chat", "turns": ["What is the weather like?"]},
]


def invoke(*args, expect=0):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == expect, r.output
    return r.output


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "questions.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return str(path)


@pytest.fixture(scope="module")
def result(tiny_bundle, dataset):
    return run_bench(tiny_bundle, BenchSettings(dataset=dataset, max_new_tokens=12, repeats=2, threads=1))


@pytest.fixture
def result_file(result, tmp_path):
    def write(doc=result, name="result.json"):
        path = tmp_path / name
        path.write_text(json.dumps(doc))
        return path
    return write


def test_shipped_dataset_covers_every_category():
    questions = load_questions(default_dataset())
    assert set(questions) == SHIPPED_CATEGORIES
    ids = [q["question_id"] for qs in questions.values() for q in qs]
    assert len(ids) == 16 and len(set(ids)) == 16
    assert all(len(qs) == 2 and all(q["text"] for q in qs) for qs in questions.values())


def test_drafting_passes_are_pooled_over_prompts():
    """Adaptive drafting's accepted tokens per drafting pass: every pass of every prompt counted once (a prompt
    with many plain steps weighs by its passes, not as one prompt)."""
    runs = [{"plain_passes": 10, "committed_per_pass": {"1": 10}},
            {"plain_passes": 0, "committed_per_pass": {"2": 100}}]
    hist = stats.pooled_histogram(runs)
    assert stats.pooled_per_drafting_pass(runs, hist) == 2.0
    assert stats.pooled_per_drafting_pass([{"plain_passes": None, "committed_per_pass": {"2": 1}}], {"2": 1}) is None


def test_repeated_ngram_share():
    assert repeated_ngram_share([1, 2, 3], [4, 5, 6, 7]) == 0.0  # nothing repeats
    # the output restates the prompt's 4-gram 1 2 3 4 (its 4 completes it), then loops on 5 6 7 8
    assert repeated_ngram_share([1, 2, 3, 4], [1, 2, 3, 4]) == 0.25
    assert repeated_ngram_share([9], [5, 6, 7, 8, 5, 6, 7, 8, 5]) == pytest.approx(2 / 9)
    assert repeated_ngram_share([1], []) is None


def test_result_schema(result):
    doc = json.loads(json.dumps(result))  # everything is JSON
    assert doc["schema_version"] == SCHEMA_VERSION
    assert isinstance(doc["created"], str)
    assert doc["machine"]["memory_bandwidth_gbps"] > 0 and doc["machine"]["cpu_count"] >= 1
    assert {"speccompile", "numpy", "onnxruntime", "python"} <= set(doc["versions"])
    bundle = doc["bundle"]
    assert bundle["source"]["kind"] == "tiny" and bundle["target"]["weight_bytes"] > 0
    assert [d["name"] for d in bundle["drafters"]] == ["lookup", "layerskip:2", "model"]
    settings = doc["settings"]
    assert settings["max_new_tokens"] == 12 and settings["repeats"] == 2 and len(settings["dataset_sha256"]) == 64
    assert settings["drafters"] == ["lookup", "layerskip:2", "model"]
    names = [m["name"] for m in doc["methods"]]
    assert names == ["autoregressive", "lookup", "layerskip:2", "model"]
    assert all(m["engine"] == "speccompile" and m["baseline"] == "autoregressive" for m in doc["methods"])
    assert doc["peak_rss_mib"]["speccompile"] > 0

    assert [p["question_id"] for p in doc["prompts"]] == [1, 2, 3, 4]  # round-robin over the two categories
    for p in doc["prompts"]:
        assert p["prompt_tokens"] > 0 and set(p["runs"]) == set(names)
        for name, run in p["runs"].items():
            assert run["seconds"] > 0 and run["new_tokens"] > 0 and run["tokens_per_second"] > 0
            assert run["identical_to_autoregressive"] is True  # greedy speculation is lossless
            assert run["ttft_s"] > 0 and run["mean_accepted_tokens"] >= 1.0
            assert isinstance(run["committed_per_pass"], dict)
            assert isinstance(run["acceptance_rate_per_depth"], list)
            assert 0.0 <= run["repeated_ngram_share"] <= 1.0
            shares = run["time_shares"]  # where the run's time went: graphs timed around onnxruntime, the rest host
            assert shares["target"] > 0 and shares["host"] >= 0
            assert sum(shares.values()) == pytest.approx(1.0)
            assert (shares["drafter"] > 0) == (name in ("layerskip:2", "model"))  # the drafters with a graph

    summary = doc["summary"]
    assert set(summary["by_category"]) == {"repeat", "chat"}
    for group in [summary["overall"], *summary["by_category"].values()]:
        assert set(group) == set(names)
        ar = group["autoregressive"]
        assert ar["speedup"] == ar["paired_speedup"] == 1.0 and ar["mean_accepted_tokens"] == 1.0
        assert ar["acceptance_rate_per_depth"] is None
        assert 0.0 <= ar["repeated_ngram_share"] <= 1.0
        assert ar["time_shares"]["drafter"] == 0 and 0 < ar["time_shares"]["target"] <= 1
        for name in names[1:]:
            s = group[name]
            assert s["speedup"] > 0 and s["paired_speedup"] > 0 and s["median_tokens_per_second"] > 0
            interval = s["paired_speedup_interval"]  # 4 prompts overall, 2 per category: none there
            assert interval is None if s["prompts"] < 3 else interval[0] <= s["paired_speedup"] <= interval[1]
            assert s["mean_accepted_tokens"] >= 1.0
            assert all(0.0 <= r <= 1.0 for r in s["acceptance_rate_per_depth"])
            hist = s["committed_per_pass"]
            assert sum(int(n) * c for n, c in hist.items()) / sum(hist.values()) == pytest.approx(
                s["mean_accepted_tokens"])
            assert 0 < s["bandwidth_fraction"] and s["speed_vs_transformers"] is None


def test_gate_passes_on_its_baseline(result_file):
    path = result_file()
    out = invoke("gate", path, "--baseline", path)
    assert "gate passed" in out and "speedup lookup" in out and "accepted model / chat" in out


def test_gate_fails_on_a_regression(result, result_file):
    baseline = result_file(result, "baseline.json")
    worse = copy.deepcopy(result)
    worse["summary"]["overall"]["lookup"]["paired_speedup"] *= 0.8
    worse["summary"]["overall"]["layerskip:2"]["mean_accepted_tokens"] -= 0.5
    out = invoke("gate", result_file(worse, "worse.json"), "--baseline", baseline, expect=1)
    assert "gate FAILED: speedup lookup, accepted layerskip:2" in out
    assert "-20.0%" in out


def test_gate_small_changes_pass_and_floors_fail(result, result_file):
    baseline = result_file(result, "baseline.json")
    noisy = copy.deepcopy(result)
    noisy["summary"]["overall"]["lookup"]["paired_speedup"] *= 0.97
    invoke("gate", result_file(noisy, "noisy.json"), "--baseline", baseline)
    out = invoke("gate", baseline, "--baseline", baseline, "--min-speedup", 1000, "--min-accepted", 1000, expect=1)
    assert "below the floor" in out and "speedup lookup" in out and "accepted model" in out


def test_gate_refuses_unreadable_or_mismatched_files(result, result_file, tmp_path):
    baseline = result_file(result, "baseline.json")
    out = invoke("gate", tmp_path / "missing.json", "--baseline", baseline, expect=2)
    assert out.startswith("error:")
    (tmp_path / "junk.json").write_text("{not json")
    assert invoke("gate", tmp_path / "junk.json", "--baseline", baseline, expect=2).startswith("error:")
    other = copy.deepcopy(result)
    other["schema_version"] = SCHEMA_VERSION + 1
    assert "schema_version" in invoke("gate", result_file(other, "v2.json"), "--baseline", baseline, expect=2)
    other = copy.deepcopy(result)
    other["settings"]["max_new_tokens"] = 64
    out = invoke("gate", result_file(other, "longer.json"), "--baseline", baseline, expect=2)
    assert "error: results are not comparable: max_new_tokens differs" in out


def test_plot_title_and_spreads(result):
    """The title names the settings; the spreads drawn are the per-prompt speedups whose geometric mean is the
    paired speedup of the summary (what the gate reads)."""
    title = plot_title(result)
    for part in ("tiny:llama (llama, 4 layers, --weights source)", "questions.jsonl: 4 prompts in 2 categories",
                 "max_new_tokens 12", "best of 2", "threads 1", result["created"][:10]):
        assert part in title
    halves = copy.deepcopy(result)  # builds of one source tell apart by their weights and dtype alone
    halves["bundle"]["target"].update(weights="float32", dtype="float16")
    assert "(llama, 4 layers, --weights float32, --dtype float16)" in plot_title(halves)
    assert ", greedy" in title
    sampled = copy.deepcopy(result)
    sampled["settings"]["temperature"] = 0.7
    assert ", temperature 0.7," in plot_title(sampled) and "greedy" not in plot_title(sampled)
    sampled["settings"]["top_k"] = 40
    assert ", temperature 0.7, top-k 40," in plot_title(sampled)
    spreads = group_speedups(result, ["lookup", "model"])
    assert list(spreads) == ["repeat", "chat", "overall"]
    for group, by_method in spreads.items():
        summary = result["summary"]["overall" if group == "overall" else "by_category"]
        summary = summary if group == "overall" else summary[group]
        for method, ratios in by_method.items():
            assert len(ratios) == summary[method]["prompts"]
            assert geometric_mean(ratios) == pytest.approx(summary[method]["paired_speedup"])


def test_bench_cli_writes_json_and_plot(tiny_bundle, dataset, tmp_path):
    json_out, png = tmp_path / "r.json", tmp_path / "r.png"
    out = invoke("bench", tiny_bundle, "--dataset", dataset, "--categories", "repeat", "--max-new-tokens", 10,
                 "--drafter", "lookup", "--threads", 1, "--json", json_out, "--plot", png)
    assert "overall" in out and "lookup" in out and "acceptance rate per draft depth" in out
    doc = json.loads(json_out.read_text())
    assert [m["name"] for m in doc["methods"]] == ["autoregressive", "lookup"]
    assert {p["category"] for p in doc["prompts"]} == {"repeat"}
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_bench_one_drafter_through_several_trees(tiny_bundle, dataset, tmp_path):
    """NAME@TREE methods: each its own row against the same autoregressive runs, each through its own tree; the
    plot of that many methods draws the speedups as a table of colours."""
    methods = ("lookup@chain:1", "lookup@chain:6", "lookup@dynamic:4", "layerskip:2@chain:2")
    doc = run_bench(tiny_bundle, BenchSettings(dataset=dataset, categories=("repeat",), max_new_tokens=16, threads=1,
                                               drafters=methods))
    assert [m["name"] for m in doc["methods"]] == ["autoregressive", *methods]
    assert doc["methods"][-1]["drafter"] == "layerskip:2"
    plot(doc, str(tmp_path / "many.png"))
    assert (tmp_path / "many.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    overall = doc["summary"]["overall"]
    assert overall["lookup@chain:1"]["identical_to_autoregressive"] == 1.0
    assert overall["lookup@chain:6"]["identical_to_autoregressive"] == 1.0
    depth = lambda name: len(overall[name]["acceptance_rate_per_depth"])  # noqa: E731
    assert depth("lookup@chain:1") == 1 and depth("lookup@chain:6") > 1
    assert overall["lookup@chain:6"]["mean_accepted_tokens"] > overall["lookup@chain:1"]["mean_accepted_tokens"]


def test_bench_cli_bad_input(tiny_bundle, dataset):
    assert invoke("bench", tiny_bundle, "--dataset", dataset, "--drafter", "nope", expect=2).count("error:") == 1
    assert "error:" in invoke("bench", tiny_bundle, "--dataset", dataset, "--drafter", "lookup@bush:3", expect=2)
    assert "error:" in invoke("bench", tiny_bundle, "--dataset", dataset, "--categories", "poetry", expect=2)
    # refused before anything is timed (the concurrency mode's once ran only after every method had decoded)
    for options, says in ((("--streams", "0"), "--streams 0"), (("--streams", "4", "--stream-requests", "-1"),
                                                                 "--stream-requests -1"),
                          (("--threads", "-1"), "--threads -1"), (("--top-k", "5"), "--top-k 5"),
                          # below sampling.GREEDY_BELOW a temperature decodes greedily, as 0 does
                          (("--temperature", "1e-8", "--top-k", "5"), "--top-k 5"),
                          # a count or a method named twice was measured twice (one stream count's first run lost)
                          (("--streams", "2,4,2"), "--streams 2,4,2: a stream count is named twice"),
                          (("--drafter", "lookup@chain:2", "--drafter", "lookup@chain:2~exact"),
                           "--drafter lookup@chain:2 and --drafter lookup@chain:2~exact measure the same method"),
                          (("--tree", "chain:2", "--drafter", "lookup", "--drafter", "lookup@chain:2"),
                           "--drafter lookup and --drafter lookup@chain:2 measure the same method")):
        out = invoke("bench", tiny_bundle, "--dataset", dataset, *options, expect=2)
        assert out.count("error:") == 1 and says in out and "Traceback" not in out, out


def test_methods_differ_by_drafter_tree_or_acceptance():
    from speccompile.bench.methods import check_distinct
    check_distinct(("lookup", "lookup@chain:2", "lookup@chain:3", "lookup~typical", "model"), None)
    check_distinct(("lookup", "lookup@chain:3"), "chain:2")
    for wanted, tree in ((("lookup~typical", "lookup~typical:"), None), (("lookup@chain:2", "lookup"), "chain:2"),
                         (("lookup", "lookup"), None)):
        with pytest.raises(SpeccompileError, match="give it once"):
            check_distinct(wanted, tree)


def test_a_sampled_bench_says_its_concurrency_section_decoded_greedily(tiny_bundle, dataset):
    """The concurrency mode serves greedy requests even when the methods sample: its section says so (its text
    always did), so that its figures are not read as the sampled ones."""
    doc = run_bench(tiny_bundle, BenchSettings(dataset=dataset, limit=2, max_new_tokens=3, threads=1, temperature=0.7,
                                               drafters=("lookup",), streams=(2,), stream_requests=2))
    assert doc["settings"]["temperature"] == 0.7 and doc["concurrency"]["decoding"] == "greedy"


def test_compare_transformers(tiny_bundle, tmp_path):
    pytest.importorskip("transformers")
    json_out = tmp_path / "r.json"
    invoke("bench", tiny_bundle, "--limit", 2, "--max-new-tokens", 8, "--threads", 1, "--compare-transformers",
           "--json", json_out)
    doc = json.loads(json_out.read_text())
    theirs = {m["name"]: m for m in doc["methods"] if m["engine"] == "transformers"}
    assert set(theirs) == {"transformers:autoregressive", "transformers:lookup", "transformers:layerskip:2",
                           "transformers:model"}
    assert theirs["transformers:lookup"]["counterpart"] == "lookup"
    overall = doc["summary"]["overall"]
    for name in ("autoregressive", "lookup", "layerskip:2", "model"):
        assert overall[name]["speed_vs_transformers"] > 0
    for p in doc["prompts"]:  # transformers' assisted decoding is lossless too
        assert all(p["runs"][name]["identical_to_autoregressive"] for name in theirs)
    assert "transformers" in doc["versions"] and doc["peak_rss_mib"]["total"] >= doc["peak_rss_mib"]["speccompile"]


def test_compare_transformers_refuses_a_source_changed_since_the_build(tmp_path, dataset):
    """transformers loads the model from the bundle's recorded source path: another checkpoint there since the
    build (rewritten, or another one at that path where the bundle was copied) was compared as if it were the
    bundle's model; its sha256 is checked against the one the bundle records, before any run."""
    pytest.importorskip("transformers")
    from speccompile.compile.driver import build_bundle
    from speccompile.compile.presets import tiny_checkpoint
    from speccompile.compile.sources import save_hf_dir
    from conftest import quiet
    target = tiny_checkpoint("llama")
    save_hf_dir(target, str(tmp_path / "model"))
    build_bundle(str(tmp_path / "model"), str(tmp_path / "b"), drafts=["lookup"], max_seq_len=64, progress=quiet)
    target.tensors = {name: 2 * t for name, t in target.tensors.items()}  # another model, the same files
    save_hf_dir(target, str(tmp_path / "model"))
    out = invoke("bench", tmp_path / "b", "--dataset", dataset, "--limit", 1, "--max-new-tokens", 2, "--threads", 1,
                 "--compare-transformers", expect=2)
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "has changed since the bundle was built" in errors[0] and "Traceback" not in out



def test_speccompile_peak_memory_is_taken_before_transformers_loads(tiny_bundle, dataset, monkeypatch):
    """peak_rss_mib's speccompile figure (the table's peak RSS) is this process's high-water mark once speccompile's
    phases are done, concurrency mode included: the transformers models (and torch) once loaded in the constructor,
    before them, and counted in it, several hundred MiB for a tiny bundle."""
    pytest.importorskip("transformers")
    from speccompile.bench import peers, run
    events = []
    monkeypatch.setattr(run, "peak_rss_mib", lambda: events.append("speccompile peak") or 0.0)
    monkeypatch.setattr(run, "measure_concurrency", lambda *a: events.append("concurrency") or {})
    load = peers.load_hf_model
    monkeypatch.setattr(peers, "load_hf_model", lambda *a: events.append("transformers load") or load(*a))
    doc = run_bench(tiny_bundle, BenchSettings(dataset=dataset, limit=1, max_new_tokens=3, threads=1, streams=(2,),
                                               drafters=("model",), compare_transformers=True))
    assert events == ["concurrency", "speccompile peak", "transformers load", "transformers load"]  # target, draft
    assert all(p["runs"]["transformers:model"]["identical_to_autoregressive"] for p in doc["prompts"])



@pytest.mark.parametrize("tree", ["dynamic:5", "chain:3+lookup:2"])
def test_result_records_the_tree_each_drafter_drafts(tmp_path, tree):
    """The result's bundle.drafters once gave only num_draft, which a drafter with a tree does not use: a bundle
    drafting dynamic:5 read as its kind's default chain."""
    import speccompile
    from speccompile.bench.machine import bundle_summary
    from speccompile.compile.driver import build_bundle
    out = str(tmp_path / "b")
    build_bundle("tiny:llama", out, drafts=["lookup", "layerskip:2"], max_seq_len=64, tree=tree,
                 progress=lambda *_: None)
    drafters = bundle_summary(out, speccompile.load(out, threads=1))["drafters"]
    assert [(d["name"], d["tree"]) for d in drafters] == [("lookup", tree), ("layerskip:2", tree)]


def test_compare_heads_tool(tiny_bundle, capsys):
    """tools/compare_heads.py: two bundles' default drafting against plain decoding, paired, per category; exit 0
    when every greedy answer equals plain decoding's."""
    compare_heads = tool("compare_heads")
    assert compare_heads.main([tiny_bundle, tiny_bundle, "--limit", "3", "--max-new-tokens", "12", "--repeats", "1",
                               "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("tok/s") == 4 and "old: paired" in out and "new: paired" in out and "new / old: paired" in out


def long_question(gen, tokens: int) -> dict:
    """A question whose prompt is a few tokens short of `tokens`, and no longer."""
    text = max(("a " * n for n in range(1, tokens)), key=lambda t: (len(gen.encode_chat(t)) <= tokens, len(t)))
    assert tokens - 12 < len(gen.encode_chat(text)) <= tokens
    return {"question_id": 9, "category": "long", "turns": [text]}


def test_compare_heads_warms_up_within_the_context(tiny_bundle, tiny_generator, tmp_path, capsys):
    """A prompt picked to leave room for --max-new-tokens 4 and no more: the warm-up asked for 16 tokens and
    failed on the context length."""
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps(long_question(tiny_generator, tiny_generator.max_seq_len - 4)) + "\n")
    assert tool("compare_heads").main([tiny_bundle, tiny_bundle, "--dataset", str(path), "--max-new-tokens", "4",
                                       "--repeats", "1", "--threads", "1"]) == 0
    assert "new / old: paired" in capsys.readouterr().out


def test_tools_read_datasets_as_bench_does(tiny_bundle, tiny_generator, tmp_path, capsys, monkeypatch):
    """tools/bench_decode.py (and tools/quant_agreement.py, which picks its prompts) read a dataset as bench does:
    blank lines skipped; a bad line is one `error:` line naming it, not a traceback."""
    bench_decode = tool("bench_decode")
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(q) + "\n\n" for q in QUESTIONS))
    picked = bench_decode.pick_prompts(str(path), 3, tiny_generator.encode_chat, 200)
    assert [(p["question_id"], p["category"]) for p in picked] == [(1, "repeat"), (2, "chat"), (3, "repeat")]
    path.write_text(json.dumps(QUESTIONS[0]) + '\n{"turns": 3}\n')
    monkeypatch.setattr("sys.argv", ["quant_agreement.py", tiny_bundle, tiny_bundle, "--dataset", str(path)])
    with pytest.raises(SystemExit) as exited:
        tool("quant_agreement").main()
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("error:") == 1 and "Traceback" not in err, err
    assert f"{path}:2: not a Spec-Bench question" in err
    # quant_agreement leaves room for the answers in the compiled context: a prompt that leaves none is skipped
    path.write_text(json.dumps(QUESTIONS[1]) + "\n" + json.dumps(long_question(tiny_generator, 250)) + "\n")
    monkeypatch.setattr("sys.argv", ["quant_agreement.py", tiny_bundle, tiny_bundle, "--dataset", str(path),
                                     "--max-new-tokens", "8"])
    tool("quant_agreement").main()
    assert json.loads(capsys.readouterr().out)["prompts"] == 1


def test_bench_decode_without_llama_cpp_says_how_to_get_it(tmp_path, monkeypatch):
    """llama.cpp is an optional peer: without llama-cpp-python the tool says what to install or pass, in one line
    (it was an internal error)."""
    import importlib.util
    bench_decode = tool("bench_decode")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else
                        find_spec(name, *a))
    gen = type("G", (), {"manifest": {"source": {"kind": "gguf", "path": str(tmp_path / "m.gguf")}}})()
    with pytest.raises(SpeccompileError, match="--no-llama-cpp"):
        bench_decode.llama_cpp_methods(argparse.Namespace(threads=1, llama_lookup_tokens=4), gen, {}, [])


def test_paired_interval_brackets_the_paired_speedup_and_narrows_with_prompts():
    """The bootstrap interval over prompts: around the geometric mean, a point when every prompt agrees, narrower
    the more prompts say the same, none under three prompts."""
    ratios = [0.9, 1.0, 1.1, 1.3, 1.2, 0.95]
    low, high = paired_interval(ratios)
    assert low < geometric_mean(ratios) < high and 0.9 <= low and high <= 1.3
    assert paired_interval([1.2] * 5) == pytest.approx([1.2, 1.2])
    wide, narrow = paired_interval(ratios), paired_interval(ratios * 8)
    assert narrow[0] > wide[0] and narrow[1] < wide[1]
    assert paired_interval([1.1, 1.2]) is None
    assert paired_interval(ratios) == paired_interval(ratios)  # a fixed seed: the same document each time


@pytest.mark.parametrize("line, says", [
    ('{"question_id": 1, "category": ["x"], "turns": ["hi"]}', "not a Spec-Bench question"),  # was a TypeError
    ('{"question_id": 1, "category": "x", "turns": [5]}', "not a Spec-Bench question"),  # was decoded as a prompt
    ('{"question_id": 1, "category": "x", "turns": "hello"}', "not a Spec-Bench question"),
    ('{"question_id": 1, "category": "x", "turns": ["caf\xe9"]}', "not UTF-8 text"),
    ('{"question_id": 1, "category": "x", ', "not JSON"),
    ("", "no questions in it"),  # was "no prompt fits the compiled context", after measuring the machine
])
def test_dataset_lines_that_are_not_questions_are_refused_naming_the_line(tmp_path, line, says):
    from speccompile.bench.multi_turn import conversations
    from speccompile.errors import SpeccompileError
    path = tmp_path / "q.jsonl"
    good = json.dumps({"question_id": 0, "category": "x", "turns": ["a question"]})
    path.write_bytes(f"{good}\n\n{line}\n".encode("latin-1") if line else b"\n")
    where = f"{path}:3: " if line else f"{path}: "
    for read in (lambda: load_questions(str(path)),  # multi-turn once skipped such lines or failed on IndexError
                 lambda: conversations(str(path), ("x",), 3, 2, lambda first: True)):
        with pytest.raises(SpeccompileError, match=f"^{where}{says}"):
            read()


def test_dataset_byte_order_mark_and_later_turns(tmp_path):
    """A byte-order mark before the first line is read past; multi-turn chats continue with the later turns."""
    from speccompile.bench.multi_turn import FOLLOW_UPS, conversations
    path = tmp_path / "q.jsonl"
    question = {"question_id": 7, "category": "x", "turns": ["one", "two"]}
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(question).encode())  # as an editor on Windows may save it
    assert load_questions(str(path))["x"][0]["text"] == "one"
    assert conversations(str(path), ("x",), 3, 3, lambda first: True) == [["one", "two", FOLLOW_UPS[0]]]


def test_bench_cli_refuses_what_it_would_ignore_or_overwrite(tiny_bundle, dataset, tmp_path):
    """Refused before anything loads: an option the run would ignore, an output that would replace the dataset,
    the other output, or land inside the bundle (whose unlisted files fail every later load)."""
    import os
    inside = os.path.join(tiny_bundle, "result.json")
    same = str(tmp_path / "r.png")
    for options, says in ((("--drafter", "lookup~typical"), "typical acceptance is for sampling"),
                          (("--temperature", "0.7", "--drafter", "lookup~typical:2"),
                           "EPS of --drafter lookup~typical:2 must be in"),  # bench has no --acceptance to name
                          (("--temperature", "0.7", "--drafter", "lookup~typical:x"),
                           "error: --drafter lookup~typical:x: EPS and ALPHA are numbers"),
                          (("--drafter", "lookup@bogus"), "error: --drafter lookup@bogus: use chain:K"),
                          (("--drafter", "lookup@"), "nothing after '@'"),  # were the bundle's tree, exact
                          (("--drafter", "lookup~"), "nothing after '~'"),
                          (("--stream-requests", "4"), "--stream-requests: only the concurrency mode"),
                          (("--stream-repeats", "2"), "--stream-repeats: only the concurrency mode"),
                          (("--json", inside), "inside the bundle"),
                          (("--json", dataset), "that is the dataset"),
                          (("--json", same, "--plot", same), "--plot " + same + ": the same file as --json"),
                          (("--multi-turn", "1", "--drafter", "lookup", "--drafter", "model"), "a second --drafter"),
                          (("--multi-turn", "1", "--top-k", "3"), "does not take --top-k"),
                          (("--multi-turn", "1", "--drafter", "lookup@chain:2"), "takes a drafter's NAME alone"),
                          (("--multi-turn", "1", "--drafter", "lookup~exact"), "takes a drafter's NAME alone"),
                          (("--multi-turn", "1", "--stream-requests", "3"), "does not take --stream-requests"),
                          (("--multi-turn", "2", "--max-new-tokens", "0"), "--max-new-tokens 0: must be at least 1")):
        out = invoke("bench", tiny_bundle, "--dataset", dataset, "--max-new-tokens", 2, "--limit", 1, "--threads", 1,
                     *options, expect=2)
        assert out.count("error:") == 1 and says in out and "Traceback" not in out, out
        assert "measuring" not in out, out  # refused before the machine is measured and the bundle loaded
    assert not os.path.exists(inside) and not os.path.exists(same)
    assert json.loads(open(dataset).readline()) == QUESTIONS[0]


def test_ci_gate_script_writes_beside_the_bundle_it_was_given(tmp_path):
    """tools/ci_gate.sh BUNDLE_DIR/ from another folder: the bundle is that folder's, and the result lands beside
    it (with the slash kept, BUNDLE_DIR/.bench.json landed inside the bundle, a relative one in the repository)."""
    import os
    import subprocess
    script = os.path.join(os.path.dirname(__file__), "..", "tools", "ci_gate.sh")
    stubs, work = tmp_path / "bin", tmp_path / "work"
    stubs.mkdir()
    work.mkdir()
    (stubs / "speccompile").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/calls\n')
    (stubs / "speccompile").chmod(0o755)
    env = dict(os.environ, PATH=f"{stubs}{os.pathsep}{os.environ['PATH']}")
    subprocess.run(["bash", os.path.abspath(script), "G/"], cwd=work, env=env, check=True)
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[0].startswith(f"build --out {work}/G --max-seq-len")
    assert f"--json {work}/G.bench.json --plot {work}/G.bench.png" in calls[1]
    assert calls[2].startswith(f"gate {work}/G.bench.json --baseline")


def synthetic_prompts(rates: list[tuple[float, float]], same: list[bool] | None = None) -> list[dict]:
    """Prompts as the runner fills them: (autoregressive tokens/s, lookup tokens/s) each, lookup's output equal
    to autoregressive's where `same` says so."""
    def run(tps, identical=True):
        return {"tokens_per_second": tps, "seconds": 1.0, "ttft_s": 0.1, "achieved_weight_bandwidth_gbps": 1.0,
                "identical_to_autoregressive": identical, "committed_per_pass": {"1": 3, "2": 1},
                "acceptance_rate_per_depth": [0.25], "plain_passes": None}
    same = same or [True] * len(rates)
    return [{"question_id": i, "category": "c", "runs": {"autoregressive": run(ar), "lookup": run(lk, s)}}
            for i, ((ar, lk), s) in enumerate(zip(rates, same))]


def synthetic_methods():
    from speccompile.bench.settings import Method
    return [Method("autoregressive", "speccompile", None, "autoregressive", None, None),
            Method("lookup", "speccompile", "lookup", "autoregressive", None, None)]


def test_the_paired_figures_pair_each_prompt_with_itself():
    """The paired speedup is the geometric mean of each prompt's own ratio, and its interval resamples those
    ratios: pairing prompts otherwise (by rank, or one prompt's time with another's) gives other figures."""
    prompts = synthetic_prompts([(10.0, 40.0), (40.0, 40.0), (20.0, 10.0), (30.0, 60.0)])
    lookup = stats.summarize_group(synthetic_methods(), prompts, 10.0)["lookup"]
    ratios = [4.0, 1.0, 0.5, 2.0]
    assert lookup["paired_speedup"] == pytest.approx(geometric_mean(ratios)) == pytest.approx(2 ** 0.5)
    assert lookup["paired_speedup_interval"] == pytest.approx(paired_interval(ratios))
    assert lookup["speedup"] == pytest.approx(40.0 / 25.0)  # the ratio of medians, the other figure


def test_the_identical_share_counts_every_prompt():
    prompts = synthetic_prompts([(10.0, 20.0)] * 4, same=[True, False, True, True])
    assert stats.summarize_group(synthetic_methods(), prompts, 10.0)["lookup"]["identical_to_autoregressive"] == 0.75


def test_the_interval_is_symmetric_in_its_tails():
    """At level 0 both ends are the median of the resampled means: the two tails are cut alike."""
    ratios = [1.0 + 0.037 * i for i in range(20)]
    low, high = paired_interval(ratios, level=0.0)
    assert low == high


def test_bench_keeps_each_method_s_fastest_run_and_compares_its_output(monkeypatch):
    """Best of the repeats (noise only slows a run down), and each method's output against autoregressive's, on
    methods whose runs take known (fake) times."""
    from speccompile.bench import run as bench_run
    from speccompile.bench.settings import Method
    clock = [0.0]
    monkeypatch.setattr(bench_run.time, "perf_counter", lambda: clock[0])
    durations = {"autoregressive": iter([9.0, 2.0, 3.0, 4.0]), "lookup": iter([9.0, 5.0, 1.0, 6.0])}

    def method(name, tokens):
        def run(ids, max_new_tokens):
            clock[0] += next(durations[name])
            return {"token_ids": tokens, "stats": {}}
        return Method(name, "speccompile", None if name == "autoregressive" else name, "autoregressive", None, run)
    prompts = [{"ids": [1, 2], "category": "c"}]
    settings = BenchSettings(repeats=3, max_new_tokens=4, warmup_tokens=1)
    bench_run.measure([method("autoregressive", [5, 6, 7]), method("lookup", [5, 6, 8])], prompts, settings, set(),
                      lambda label: None)
    runs = prompts[0]["runs"]
    assert runs["autoregressive"]["seconds"] == 2.0 and runs["lookup"]["seconds"] == 1.0
    assert runs["autoregressive"]["identical_to_autoregressive"] is True
    assert runs["lookup"]["identical_to_autoregressive"] is False


def test_ci_gate_script_fails_when_the_gate_fails_with_the_documented_thresholds(tmp_path):
    """tools/ci_gate.sh exits with the gate's failure (a stub gate that fails), and gates with the thresholds
    docs/design.md states."""
    import os
    import re
    import subprocess
    root = os.path.join(os.path.dirname(__file__), "..")
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "speccompile").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/calls\n[ "$1" != gate ]\n')
    (stubs / "speccompile").chmod(0o755)
    env = dict(os.environ, PATH=f"{stubs}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run(["bash", os.path.join(root, "tools", "ci_gate.sh"), str(tmp_path / "G")], env=env)
    assert done.returncode == 1
    gate_call = (tmp_path / "calls").read_text().splitlines()[-1]
    design = open(os.path.join(root, "docs", "design.md")).read()
    stated = re.search(r"gates against\s+`tools/ci_baseline.json` with `([^`]+)`", design).group(1)
    assert gate_call.endswith(stated)


def test_ci_run_stops_when_an_install_fails(tmp_path):
    """.ci/run under `set -e`: a command that fails inside an && list does not end the script, so a failed pip
    install skipped the tests and went on to the gate, and the run could pass without running a test."""
    import os
    import shutil
    import subprocess
    repo, stubs = tmp_path / "repo", tmp_path / "stubs"
    (repo / ".ci").mkdir(parents=True)
    (repo / "tools").mkdir()
    stubs.mkdir()
    shutil.copy(os.path.join(os.path.dirname(__file__), "..", ".ci", "run"), repo / ".ci" / "run")
    (repo / "tools" / "ci_gate.sh").write_text(f"touch {tmp_path}/gated\n")
    venv_bin = repo / ".venv" / "bin"
    for name, body in (("python3", f"mkdir -p {venv_bin}; echo 'PATH={stubs}:$PATH' > {venv_bin}/activate"),
                       ("pip", "exit 1"),  # an install that fails
                       ("python", f"touch {tmp_path}/tested")):
        (stubs / name).write_text(f"#!/bin/sh\n{body}\n")
        (stubs / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{stubs}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run(["bash", str(repo / ".ci" / "run")], env=env, capture_output=True)
    assert done.returncode != 0
    assert not (tmp_path / "tested").exists() and not (tmp_path / "gated").exists()


def test_result_records_the_dataset_read_and_each_prompt_decoded(result, dataset, tiny_generator):
    """dataset_sha256 is the dataset file's contents' (what tells two runs' prompts apart); each prompt's
    prompt_tokens are its own question's, through the chat template."""
    import hashlib
    with open(dataset, "rb") as f:
        assert result["settings"]["dataset_sha256"] == hashlib.sha256(f.read()).hexdigest()
    texts = {q["question_id"]: q["turns"][0] for q in QUESTIONS}
    assert [p["prompt_tokens"] for p in result["prompts"]] == [
        len(tiny_generator.encode_chat(texts[p["question_id"]])) for p in result["prompts"]]
    assert len({p["prompt_tokens"] for p in result["prompts"]}) > 1
