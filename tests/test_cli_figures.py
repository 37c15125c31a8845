"""The figures the CLI prints: generate's summary and --compare's (against the results they came from), its --json
document, inspect's per-model, memory, weight-format and decode-step lines, bench's table columns."""
import dataclasses
import json
import re

import pytest
from click.testing import CliRunner

from speccompile.cli import main
from speccompile.format.bundle import read_manifest
from speccompile.format.memory import kv_bytes, load_memory
from speccompile.format.summary import describe, pass_weight_bytes
from speccompile.runtime.generator import Generator

SUMMARY = re.compile(r"\[(\d+) tokens, ([\d.]+) tok/s, drafter (\S+), mean accepted tokens ([\d.]+) over (\d+) "
                     r"verify passes(, typical acceptance \(lossy\))?\]")
COMPARED = re.compile(r"\[autoregressive: ([\d.]+) tok/s; speculative speedup ([\d.]+)x; output (\w+) to "
                      r"autoregressive")


def run(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r.output


def spy_on_generate(monkeypatch, change=None):
    """Every (keyword arguments, result) of Generator.generate, in order; change(kwargs, result) may replace a
    result before the CLI sees it."""
    calls, generate = [], Generator.generate

    def recorded(self, prompt, max_new_tokens=128, **kwargs):
        res, given = generate(self, prompt, max_new_tokens, **kwargs), {**kwargs, "max_new_tokens": max_new_tokens}
        res = change(given, res) if change else res
        calls.append((given, res))
        return res
    monkeypatch.setattr(Generator, "generate", recorded)
    return calls


def test_compare_prints_the_figures_of_its_two_runs(tiny_bundle, monkeypatch):
    """The summary's figures are the speculative run's, the autoregressive line's the plain run's, and the speedup
    their tokens per second's ratio."""
    calls = spy_on_generate(monkeypatch)
    out = run("generate", tiny_bundle, "The quick brown fox", "--max-new-tokens", 24, "--compare", "--drafter",
              "layerskip:2")
    (spec_args, spec), (plain_args, plain) = calls[-2:]  # after the two warm-up runs
    assert spec_args["speculate"] and spec_args["drafter"] == "layerskip:2" and spec_args["max_new_tokens"] == 24
    assert not plain_args["speculate"] and plain_args["drafter"] is None and plain_args["max_new_tokens"] == 24
    s, b = spec.stats, plain.stats
    assert s["verify_steps"] != s["proposed"] and s["mean_accepted_tokens"] > 1.0  # figures told apart below
    assert SUMMARY.search(out).groups() == (str(len(spec.token_ids)), f"{s['tokens_per_second']:.1f}", "layerskip:2",
                                            f"{s['mean_accepted_tokens']:.2f}", str(s["verify_steps"]), None), out
    same = "identical" if spec.token_ids == plain.token_ids else "DIFFERENT"
    assert COMPARED.search(out).groups() == (f"{b['tokens_per_second']:.1f}",
                                             f"{s['tokens_per_second'] / b['tokens_per_second']:.2f}", same), out


def test_compare_says_different_where_the_tokens_differ(tiny_bundle, monkeypatch):
    """"output identical to autoregressive" compares the two runs' tokens: a speculative run that committed
    another token is reported as DIFFERENT, in the text and in --json."""
    def one_token_off(kwargs, res):
        if not kwargs["speculate"] or kwargs["max_new_tokens"] < 12:  # the warm-up runs decode 4
            return res
        return dataclasses.replace(res, token_ids=res.token_ids[:-1] + [(res.token_ids[-1] + 1) % 384])
    spy_on_generate(monkeypatch, one_token_off)
    args = ("generate", tiny_bundle, "The quick brown fox", "--max-new-tokens", 12, "--compare", "--no-chat")
    assert COMPARED.search(run(*args)).group(3) == "DIFFERENT"
    doc = json.loads(run(*args, "--json"))
    assert doc["identical_to_autoregressive"] is False


def test_compare_json_holds_both_runs(tiny_bundle):
    """generate --compare --json: both runs' stats (the plain run's drafting nothing), the speedup as printed,
    whether the tokens are identical and the seed (None when greedy)."""
    doc = json.loads(run("generate", tiny_bundle, "The quick brown fox", "--max-new-tokens", 16, "--compare",
                         "--drafter", "layerskip:2", "--json"))
    assert set(doc) == {"text", "token_ids", "finish_reason", "stats", "autoregressive_stats", "speedup",
                        "identical_to_autoregressive", "seed"}
    s, b = doc["stats"], doc["autoregressive_stats"]
    assert s["drafter"] == "layerskip:2" and b["drafter"] is None and b["mean_accepted_tokens"] == 1.0
    assert b["verify_steps"] == b["new_tokens"] - 1 and b["proposed"] == 0  # the prefill gives the first token
    assert doc["speedup"] == pytest.approx(s["tokens_per_second"] / b["tokens_per_second"])
    assert doc["identical_to_autoregressive"] is True and doc["seed"] is None
    assert doc["finish_reason"] in ("stop", "length")


def test_generate_stats_count_the_answer_and_the_bonus_token(tiny_bundle):
    """tokens_per_second: the answer's tokens (not the prompt's) over the run's time; mean_accepted_tokens: the
    tokens the verify passes committed, the target's bonus token included, per pass."""
    doc = json.loads(run("generate", tiny_bundle, "The quick brown fox jumps over", "--max-new-tokens", 20,
                         "--drafter", "layerskip:2", "--json"))
    s = doc["stats"]
    assert s["new_tokens"] == len(doc["token_ids"]) and s["prompt_tokens"] > 1
    assert s["tokens_per_second"] == pytest.approx(s["new_tokens"] / s["total_s"])
    passes = {int(n): count for n, count in s["committed_per_pass"].items()}
    assert min(passes) >= 1 and sum(passes.values()) == s["verify_steps"]
    assert s["mean_accepted_tokens"] == pytest.approx(sum(n * c for n, c in passes.items()) / s["verify_steps"])


def test_lossy_acceptance_is_named_in_the_summary(tiny_bundle):
    args = ("generate", tiny_bundle, "hello", "--max-new-tokens", 8, "--temperature", 0.8, "--seed", 3)
    assert SUMMARY.search(run(*args, "--acceptance", "typical")).group(6)
    assert SUMMARY.search(run(*args)).group(6) is None


def test_inspect_names_each_layers_format(tiny_bundle):
    """Each matrix's format over the layers stored in it: layers of another format are listed apart, not shown
    in another layer's format."""
    m = read_manifest(tiny_bundle, verify_hashes=False)
    m["quantization"]["formats"].update({"l0.qkv": "q4_0", "l1.qkv": "q8_0", "l2.qkv": "q4_0", "l3.qkv": "q4_0"})
    lines = describe(tiny_bundle, m, False)
    qkv = [line.split() for line in lines if line.split()[:1] == ["qkv"]]
    assert sorted(qkv) == [["qkv", "q4_0", "layers", "0,2-3"], ["qkv", "q8_0", "layers", "1"]], lines


def test_inspect_shows_each_models_kv_cache_and_the_memory_a_load_takes(tiny_bundle):
    m = read_manifest(tiny_bundle, verify_hashes=False)
    for entry in m["models"].values():
        if "kv_cache" in entry:
            entry["kv_cache"]["max_seq_len"] = 1 << 16  # MiB that one decimal tells apart
    lines = describe(tiny_bundle, m, False)
    for name, entry in m["models"].items():
        line = next(x for x in lines if x.startswith(f"model       {name}:"))
        assert f"KV cache {kv_bytes(entry['kv_cache']) / 2**20:.1f} MiB" in line, line
    need = load_memory(m)
    assert need["weights"] // 2**20 != need["kv"] // 2**20
    memory = next(x for x in lines if x.startswith("memory"))
    assert memory.startswith(f"memory      up to {(need['weights'] + need['kv']) / 2**20:.1f} MiB loaded"), memory
    assert f"weights {need['weights'] / 2**20:.1f} MiB (each graph" in memory, memory
    assert f"KV caches {need['kv'] / 2**20:.1f} MiB at the full context" in memory, memory


def test_inspect_says_whether_it_checked_the_hashes(tiny_bundle):
    assert "sha256 verified" in run("inspect", tiny_bundle)
    assert "sha256 not checked" in run("inspect", tiny_bundle, "--no-verify")


def test_decode_step_of_a_tied_model_reads_its_embedding_once(tiny_bundle):
    """A tied model's output head is its embedding table: a step reads it whole once, as the head (the gathered
    row of it is counted apart); with the int8 screen in its place, only the gathered row."""
    m = read_manifest(tiny_bundle, verify_hashes=False)
    t = m["models"]["target"]
    cfg = t["config"]
    assert cfg["tie_word_embeddings"] and "lm_head" not in t["initializers"]
    sizes = {n: r["length"] for f in t["weights"] for n, r in m["weights"][f].items() if n in t["initializers"]}
    screen = sum(v for n, v in sizes.items() if n.startswith("head_screen."))
    tables = {"embed", "rope.cos", "rope.sin"}
    rest = sum(v for n, v in sizes.items() if n not in tables and not n.startswith("head_screen."))
    rows = 4 * cfg["hidden_size"] + 2 * 4 * cfg["head_dim"] // 2  # float32 rows
    assert pass_weight_bytes(m, t, 0) == {"full": rest + rows + sizes["embed"], "screened": rest + rows + screen}
    # a head on the int8 grid whose screen is stored as MatMulQ8 records (no scales apart, no grid error): its float32
    # logits are MatMulQ8F's over the records, read in place of the float32 embedding
    on_grid = {**t, "initializers": [n for n in t["initializers"] if n not in ("head_screen.scales", "head_screen.err")]}
    left = screen - sizes.get("head_screen.scales", 0) - sizes.get("head_screen.err", 0)
    assert pass_weight_bytes(m, on_grid, 0) == {"full": rest + rows + sizes["head_screen.codes"],
                                                "screened": rest + rows + left}



def test_decode_step_line_names_the_sampling_each_head_serves(tiny_bundle, tiny_generator):
    """The decode-step line's screened figure names the settings the runtime decodes through the screen (greedy
    passes, noise-sampled ones), its float32 figure the others."""
    from speccompile.runtime.noise import runs_greedy
    from speccompile.runtime.sampling import SamplingParams
    line = next(x for x in describe(tiny_bundle, read_manifest(tiny_bundle, verify_hashes=False), False)
                if x.startswith("decode step reads"))
    screened, full = line.split(" MiB with float32 logits ")
    for params, name in ((SamplingParams(0.7), "temperature"), (SamplingParams(0.7, top_k=5), "top-k"),
                         (SamplingParams(0.7, top_p=0.9), "top-p")):
        through_screen = runs_greedy(params, tiny_generator.noise_ok)
        assert (name in screened, name in full) == (through_screen, not through_screen), (name, line)

def test_bench_table_puts_each_figure_in_its_column():
    from speccompile.bench.report import format_table
    figures = dict(prompts=2, median_tokens_per_second=12.5, speedup=1.11, paired_speedup=1.22,
                   paired_speedup_interval=None, mean_accepted_tokens=1.33, draft_nodes_per_pass=4.4,
                   plain_pass_share=0.55, median_ttft_s=0.066, median_achieved_bandwidth_gbps=7.7,
                   bandwidth_fraction=0.88, identical_to_autoregressive=0.99, speed_vs_transformers=2.02,
                   acceptance_rate_per_depth=[0.5], time_shares=None)
    result = {"settings": {"max_new_tokens": 8, "repeats": 1, "threads": 1, "temperature": 0.0, "top_k": 0},
              "machine": {"memory_bandwidth_gbps": 10.0}, "peak_rss_mib": {"speccompile": 100.0},
              "prompts": [], "methods": [{"baseline": "autoregressive"}],
              "summary": {"overall": {"lookup": figures}, "by_category": {}}}
    row = next(line for line in format_table(result).splitlines() if line.startswith("overall"))
    assert row.split()[2:] == ["12.5", "1.11x", "1.22x", "1.33", "4.4", "55%", "66", "7.7", "88%", "99%", "2.02x"]


def test_bench_table_says_how_lossy_methods_answers_compare():
    """Beside a lossy method (typical acceptance), how much its answers repeat themselves and how long they run,
    against autoregressive decoding's over the same prompts; nothing for exact methods."""
    from speccompile.bench.report import format_table
    base = dict(prompts=2, median_tokens_per_second=12.5, speedup=1.0, paired_speedup=1.0,
                paired_speedup_interval=None, mean_accepted_tokens=1.0, median_ttft_s=0.066,
                median_achieved_bandwidth_gbps=7.7, bandwidth_fraction=0.88, identical_to_autoregressive=1.0,
                speed_vs_transformers=None, acceptance_rate_per_depth=None, time_shares=None)
    overall = {"autoregressive": {**base, "repeated_ngram_share": 0.1},
               "lookup": {**base, "repeated_ngram_share": 0.1},
               "lookup~typical:0.2,0.5": {**base, "repeated_ngram_share": 0.35, "identical_to_autoregressive": 0.0}}
    lengths = {"autoregressive": (10, 20), "lookup": (10, 20), "lookup~typical:0.2,0.5": (12, 30)}
    result = {"settings": {"max_new_tokens": 32, "repeats": 1, "threads": 1, "temperature": 0.7, "top_k": 0},
              "machine": {"memory_bandwidth_gbps": 10.0}, "peak_rss_mib": {"speccompile": 100.0},
              "prompts": [{"runs": {m: {"new_tokens": n[i]} for m, n in lengths.items()}} for i in range(2)],
              "methods": [{"baseline": "autoregressive"}], "summary": {"overall": overall, "by_category": {}}}
    lines = [line for line in format_table(result).splitlines() if line.startswith("lossy")]
    assert lines == ["lossy lookup~typical:0.2,0.5: output repeating itself 35% (autoregressive 10%), 21.0 tokens "
                     "an answer (15.0)"]


def test_cost_model_lines_show_each_modes_and_drafters_times():
    """inspect's cost model lines: the greedy and the sampled verify times at the middle measured length, each
    drafter's pass by rows, prompt lookup's time."""
    from speccompile.runtime.cost_model import CostModel
    model = CostModel(rows=[1, 2], lengths=[16, 64, 256], lookup_ms=0.25, key={"threads": 2},
                      verify_ms={"greedy": [[1, 2, 3], [4, 5, 6]], "sampled": [[10, 20, 30], [40, 50, 60]]},
                      drafter_ms={"mtp": [1.5, 2.5, 3.5], "model": []})
    assert model.describe()[1:] == ["            greedy verify pass at 64 tokens, ms by rows: 1: 2.0, 2: 5.0",
                                    "            sampled verify pass at 64 tokens, ms by rows: 1: 20.0, 2: 50.0",
                                    "            drafter mtp pass, ms by rows: 1: 1.5, 2: 2.5, 4: 3.5",
                                    "            prompt lookup 0.25 ms"]


def test_compare_times_two_runs_a_stop_string_left_empty(tiny_bundle):
    """A stop string at the answer's start (--stop '\\n' before a first newline) leaves both runs no tokens: their
    tokens per second, 0 and 0, made a speedup of 0.00x, as if speculation had never finished; both decoded the
    same tokens up to the stop, so their times compare."""
    args = ("generate", tiny_bundle, "The quick brown fox", "--no-chat", "--max-new-tokens", 16)
    text = json.loads(run(*args, "--json"))["text"]
    assert len(text) >= 2
    doc = json.loads(run(*args, "--compare", "--stop", text[:2], "--json"))
    s, b = doc["stats"], doc["autoregressive_stats"]
    assert doc["token_ids"] == [] and doc["identical_to_autoregressive"] and s["verify_steps"] >= 1
    assert doc["speedup"] == pytest.approx(b["total_s"] / s["total_s"]) and doc["speedup"] > 0
