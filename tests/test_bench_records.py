"""The figures bench's other modes and tools record, each from the run it names: multi-turn chats with and without
the context cache, the peers of tools/bench_decode.py (faked at their boundary where not installed), the prompts a
limit picks, a head's teacher-forced agreement, the result's machine and bundle. Synthetic inputs wherever the
arithmetic is the point; nothing here is timed."""
import json
import statistics
import sys
import types

import numpy as np
import pytest

from speccompile.bench import multi_turn, peers
from speccompile.bench.multi_turn import MultiTurnSettings, conversations, run_multi_turn, summarize
from speccompile.bench.prompts import load_questions, pick_prompts
from tools_util import tool


# ---- multi-turn chats -------------------------------------------------------------------------------------------
def turn(ttft, prompt, hit, ids):
    return {"ttft_s": ttft, "total_s": 2 * ttft, "prompt_tokens": prompt, "hit_tokens": hit,
            "miss_tokens": prompt - hit, "token_ids": ids}


def test_multi_turn_summary_takes_each_turn_from_its_own_runs():
    """Turn t's figures come from turn t of the cached and the uncached runs, each from its own: its TTFTs, the
    median of each conversation's own ratio (not the ratio of medians), hits and misses summed, the hit rate over
    the prompt tokens, `identical` false where one conversation's answers differ."""
    runs = [{"cache": [turn(1.0, 100, 0, [1]), turn(0.1, 160, 120, [2])],
             "no_cache": [turn(1.2, 100, 0, [1]), turn(0.8, 160, 0, [2])]},
            {"cache": [turn(2.0, 200, 0, [3]), turn(0.5, 260, 210, [4])],
             "no_cache": [turn(2.4, 200, 0, [3]), turn(1.0, 260, 0, [5])]},
            {"cache": [turn(3.0, 300, 0, [6]), turn(0.4, 360, 300, [7])],
             "no_cache": [turn(3.6, 300, 0, [6]), turn(6.0, 360, 0, [7])]}]
    first, second = summarize(runs)
    assert first["turn"] == 1 and first["identical"] and first["hit_tokens"] == 0 and first["hit_rate"] == 0
    assert (second["turn"], second["prompt_tokens"]) == (2, 260)
    assert second["ttft_cache_s"] == 0.4 and second["ttft_no_cache_s"] == 1.0
    assert second["ttft_speedup"] == pytest.approx(8.0)  # median of 8, 2, 15; the ratio of medians is 2.5
    assert (second["hit_tokens"], second["miss_tokens"]) == (630, 150)
    assert second["hit_rate"] == pytest.approx(630 / 780)
    assert not second["identical"]


def test_multi_turn_picks_the_longest_first_messages_that_fit(tmp_path):
    """Of the given categories only; longest first message first; `limit` of those that fit (a long one that does
    not fit leaves its place to the next)."""
    path = tmp_path / "q.jsonl"
    questions = [("rag", "a" * 30), ("qa", "b" * 90), ("rag", "c" * 10), ("rag", "d" * 50), ("rag", "e" * 70)]
    path.write_text("".join(json.dumps({"question_id": i, "category": c, "turns": [t]}) + "\n"
                            for i, (c, t) in enumerate(questions)))
    chats = conversations(str(path), ("rag",), 2, 1, lambda chat: len(chat[0]) < 60)
    assert chats == [["d" * 50], ["a" * 30]]


class ChatSpy:
    """The generator's chat() as multi-turn calls it: whether the context cache was on, how many of the prompt's
    tokens it gave back, and the messages sent."""

    def __init__(self, gen):
        self.gen, self.calls, self.chat = gen, [], gen.chat
        gen.chat = self.spy

    def spy(self, messages, max_new_tokens, **kwargs):
        res = self.chat(messages, max_new_tokens, **kwargs)
        self.calls.append({"cached": self.gen.context_cache is not None, "messages": [dict(m) for m in messages],
                           "hit": res.stats["prompt_cache_hit_tokens"], "text": res.text})
        return res


@pytest.fixture(scope="module")
def multi_turn_run(tiny_bundle, tmp_path_factory):
    import speccompile
    path = tmp_path_factory.mktemp("multi-turn") / "q.jsonl"
    # the second shares most of the first's message: left in the cache, it would be a hit at its first turn
    firsts = ["Summarize: " + "the cat sat. " * 8, "Summarize: " + "the cat sat. " * 7 + "A dog ran."]
    path.write_text("".join(json.dumps({"question_id": i, "category": "summarization", "turns": [t]}) + "\n"
                            for i, t in enumerate(firsts)))
    spies = []

    def load(bundle, threads=None):
        spies.append(ChatSpy(speccompile.load(bundle, threads=threads)))
        return spies[0].gen
    mp = pytest.MonkeyPatch()
    mp.setattr(multi_turn, "load", load)
    try:
        result = run_multi_turn(tiny_bundle, MultiTurnSettings(dataset=str(path), limit=2, turns=3,
                                                               max_new_tokens=6, threads=1), log=lambda msg: None)
    finally:
        mp.undo()
    return result, spies[0].calls[1:]  # past the warm-up


def test_multi_turn_runs_without_the_cache_take_nothing_from_it(multi_turn_run):
    """The "without" run of each conversation has the context cache off, so its later turns hit nothing; the
    cached run starts empty, whichever ran first, and hits its own history from the second turn on."""
    result, calls = multi_turn_run
    assert len(calls) == 2 * 2 * 3
    for conversation in result["conversations"]:
        assert all(t["hit_tokens"] == 0 for t in conversation["no_cache"])
        cached = conversation["cache"]
        assert cached[0]["hit_tokens"] == 0 and all(t["hit_tokens"] > 0 for t in cached[1:])
    assert [c["cached"] for c in calls] == [True] * 3 + [False] * 3 + [False] * 3 + [True] * 3  # alternating
    assert [c["hit"] for c in calls if c["cached"]][3] == 0  # the second conversation's cache was emptied


def test_multi_turn_sends_each_answer_back_in_the_next_prompt(multi_turn_run):
    """Each turn's prompt is the conversation so far: every earlier message, the model's answers included."""
    _, calls = multi_turn_run
    for chat in (calls[0:3], calls[3:6]):
        for before, after in zip(chat, chat[1:]):
            answer = {"role": "assistant", "content": before["text"]}
            assert after["messages"][:len(before["messages"]) + 1] == before["messages"] + [answer]


# ---- peers ------------------------------------------------------------------------------------------------------
class FakeClock:
    """time.perf_counter as the peers read it: it moves only when the fake engines say they worked."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(peers.time, "perf_counter", c)
    return c


class FakeLlama:
    """llama-cpp-python's Llama at the peer's boundary. Like the real one, generate(reset=True) keeps the prefix it
    shares with what the context holds (only reset() empties it); a prefill costs 1 s, a token 0.1 s."""

    def __init__(self, clock, **kwargs):
        self.clock, self.kwargs, self.held, self.prefilled = clock, kwargs, [], []

    def token_eos(self):
        return 2

    def reset(self):
        self.held = []

    def generate(self, tokens, reset=True, **sampling):
        held = zip(tokens, self.held)
        shared = next((i for i, (a, b) in enumerate(held) if a != b), min(len(tokens), len(self.held)))
        self.prefilled.append(len(tokens) - shared)
        self.held = list(tokens)
        self.clock.now += 1.0
        for t in [7, 8, 0, 9, 2, 5]:
            self.clock.now += 0.1
            self.held.append(t)
            yield t


def fake_llama_cpp(monkeypatch, clock):
    made = []
    llama_cpp = types.ModuleType("llama_cpp")
    llama_cpp.Llama = lambda **kwargs: made.append(FakeLlama(clock, **kwargs)) or made[-1]
    speculative = types.ModuleType("llama_cpp.llama_speculative")
    speculative.LlamaPromptLookupDecoding = lambda num_pred_tokens: ("lookup", num_pred_tokens)
    monkeypatch.setitem(sys.modules, "llama_cpp", llama_cpp)
    monkeypatch.setitem(sys.modules, "llama_cpp.llama_speculative", speculative)
    return made


def test_llama_cpp_peer_prefills_each_prompt_and_times_it(monkeypatch, clock):
    """Every call starts from an empty context (a prompt sharing a prefix with the last would skip its prefill)
    and its seconds count the prefill; it stops at EOS (kept, as the others return it) or max_new_tokens."""
    made = fake_llama_cpp(monkeypatch, clock)
    peer = peers.LlamaCppPeer("m.gguf", threads=3, prompt_lookup=5)
    llm = made[0]
    assert llm.kwargs["draft_model"] == ("lookup", 5) and llm.kwargs["n_threads"] == 3
    assert peer.generate([1, 2, 3], 10) == ([7, 8, 0, 9, 2], pytest.approx(1.5))
    assert peer.generate([1, 2, 3, 4], 2) == ([7, 8], pytest.approx(1.2))
    assert llm.prefilled == [3, 4]


def test_bench_decode_stops_llama_cpp_where_ours_stop(monkeypatch, clock):
    """The bundle's EOS ids stop llama.cpp too (it named only the GGUF's own EOS, and ran on past an end-of-text
    ours stop at: seconds spent on tokens the report then cut away)."""
    import argparse
    import importlib.util
    bd = tool("bench_decode")
    fake_llama_cpp(monkeypatch, clock)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "llama_cpp" else
                        find_spec(name, *a))
    gen = types.SimpleNamespace(manifest={"source": {"kind": "gguf", "path": "m.gguf"}},
                                tokenizer=types.SimpleNamespace(eos_token_ids=frozenset({0, 2})))
    methods = {}
    bd.llama_cpp_methods(argparse.Namespace(threads=1, llama_lookup_tokens=4), gen, methods, [])
    for name in ("llama.cpp", "llama.cpp:prompt_lookup"):
        assert methods[name]([1, 2, 3], 10) == ([7, 8, 0], {})


class FakeGenAI:
    """onnxruntime_genai's Generator at the peer's boundary: it emits tokens 10, 11, ... until max_length (which
    counts the prompt) and returns the whole sequence, prompt first."""

    def __init__(self):
        self.lengths = []
        og = types.SimpleNamespace(Config=self.Config, Model=lambda config: "model",
                                   GeneratorParams=self.Params, Generator=self.Generator)
        self.module = og

    class Config:
        def __init__(self, path):
            pass

        def overlay(self, text):
            self.overlaid = json.loads(text)

    def Params(self, model):
        fake = self

        class Params:
            def set_search_options(self, do_sample, max_length):
                self.max_length = max_length
                fake.lengths.append(max_length)

            def set_speculative_options(self, **options):
                self.speculative = options
        return Params()

    def Generator(self, model, params):
        class Generator:
            def __init__(self):
                self.seq = []

            def append_tokens(self, ids):
                self.seq += list(ids)

            def is_done(self):
                return len(self.seq) >= params.max_length

            def generate_next_token(self):
                self.seq.append(10 + len(self.seq))

            def get_sequence(self, i):
                return np.asarray(self.seq)

            def get_speculative_stats(self):
                return {}
        return Generator()


def test_genai_peer_returns_only_the_new_tokens(monkeypatch, tmp_path):
    fake = FakeGenAI()
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", fake.module)
    (tmp_path / "genai_config.json").write_text(json.dumps({"model": {"eos_token_id": [2]}}))
    peer = peers.GenAIPeer("hf", str(tmp_path), threads=1)
    new, _ = peer.generate([1, 2, 3], 4)
    assert new == [13, 14, 15, 16] and fake.lengths[-1] == 3 + 4


def test_transformers_peer_returns_the_answer_alone_with_its_prompt_lookup(tiny_generator, tmp_path):
    """Greedy, fp32, the same answer as ours from the same weights; the prompt is not counted; the per-call prompt
    lookup setting reaches generate()."""
    pytest.importorskip("transformers")
    peer = peers.TransformersPeer(peers.export_hf_dir("tiny:llama", str(tmp_path / "hf")), threads=1)
    prompt = tiny_generator.encode_chat("one two three one two three")
    ours = tiny_generator.generate(prompt, 6, speculate=False).token_ids
    seen, generate = [], peer.model.generate
    peer.model.generate = lambda *a, **kw: seen.append(kw.get("prompt_lookup_num_tokens")) or generate(*a, **kw)
    assert peer.generate(prompt, 6)[0] == list(ours)
    assert peer.generate(prompt, 6, prompt_lookup_num_tokens=3)[0] == list(ours)
    assert seen == [None, 3]


class FakeHFModel:
    def __init__(self):
        self.generation_config, self.calls = types.SimpleNamespace(), []

    def generate(self, x, **kwargs):
        import torch
        self.calls.append(kwargs)
        return torch.cat([x, torch.tensor([[5, 6]])], dim=1)


def test_compare_transformers_decodes_and_drafts_as_ours(tiny_generator, monkeypatch, tmp_path):
    """The transformers methods sample as ours (temperature and top-k), prompt lookup with the drafter's num_draft
    and n-gram, and assistants drafting a constant chain of num_draft tokens."""
    pytest.importorskip("torch")
    models = []
    monkeypatch.setattr(peers, "check_hf_model", lambda source, workdir: ("dir", {}))
    monkeypatch.setattr(peers, "load_hf_model", lambda source, workdir: models.append(FakeHFModel()) or models[-1])
    methods = peers.transformers_methods(tiny_generator, ["lookup", "model"], 1, str(tmp_path), print,
                                         temperature=0.7, top_k=5)
    assert [m.name for m in methods] == ["transformers:autoregressive", "transformers:lookup", "transformers:model"]
    drafters = {d["name"]: d for d in tiny_generator.manifest["drafters"]}
    for m in methods:
        assert m.run([1, 2, 3], 2) == {"token_ids": [5, 6]}
    target, assistant = models
    plain, lookup, assisted = target.calls
    assert plain["do_sample"] and plain["temperature"] == 0.7 and plain["top_k"] == 5
    assert lookup["prompt_lookup_num_tokens"] == drafters["lookup"]["num_draft"]
    assert lookup["max_matching_ngram_size"] == drafters["lookup"].get("max_ngram", 3)
    assert assisted["assistant_model"] is assistant
    assert vars(assistant.generation_config) == {"num_assistant_tokens": drafters["model"]["num_draft"],
                                                 "num_assistant_tokens_schedule": "constant",
                                                 "assistant_confidence_threshold": 0.0}


# ---- a head's teacher-forced agreement ---------------------------------------------------------------------------
def test_agreement_counts_answer_positions_against_the_head_and_the_latest_lookup_match(monkeypatch):
    """prompt 5 6 5 7, answer 5 8 5 6: the positions after the answer's first token are 5 (truth 8), 6 (5), 7 (6).
    Lookup (1-grams, the most recent match's next token) proposes 7, nothing, 8; the head 7, 5, 6. The head's
    guesses at prompt positions are all right, and must not count."""
    from speccompile.bench import head_agreement
    from speccompile.runtime.drafters.lookup import LookupDrafter
    prompt, answer = [5, 6, 5, 7], [5, 8, 5, 6]
    seq = prompt + answer
    guesses = np.array(seq[2:5] + [7, 5, 6, 0])  # entry t - 2 guesses seq[t]
    monkeypatch.setattr(head_agreement, "first_drafts",
                        lambda gen, drafter, ids: guesses if list(ids) == seq else pytest.fail(f"ids {ids}"))
    gen = types.SimpleNamespace(lookup=LookupDrafter(max_ngram=1),
                                generate=lambda ids, n, **kw: types.SimpleNamespace(token_ids=answer))
    a = head_agreement.answer_agreement(gen, "mtp", prompt, 4)
    assert (a.positions, a.hits, a.either, a.agreed, a.agreed_hits) == (3, 2, 2, 1, 0)
    assert a.lookup == {1: [2, 0, 1]}  # positions 5 and 7 matched; lookup right at neither, the head at 7


def test_agreements_add_every_count():
    from speccompile.bench.head_agreement import Agreement
    total = Agreement(1, 2, 3, 4, 5, {1: [1, 1, 0]})
    total.add(Agreement(10, 20, 30, 40, 50, {1: [1, 0, 1], 2: [2, 2, 2]}))
    assert total == Agreement(11, 22, 33, 44, 55, {1: [2, 1, 1], 2: [2, 2, 2]})


# ---- the machine and the bundle a result records ----------------------------------------------------------------
def test_machine_and_bundle_record_what_was_run(tiny_generator, monkeypatch):
    """Copy bandwidth counts bytes read and written over the best try; the bundle's weights and dtype are its
    build's; the one-row pad is the caller's."""
    import copy
    from speccompile.bench import machine
    ticks = iter([0.0, 0.5, 1.0, 1.25, 2.0, 3.0])  # tries of 0.5 s, 0.25 s, 1 s
    monkeypatch.setattr(machine.time, "perf_counter", lambda: next(ticks))
    assert machine.copy_bandwidth_gbps(threads=2, mib=1, tries=3) == pytest.approx(2 * 2**20 / 0.25 / 1e9)
    assert machine.machine_info(1.0, 0.0, True)["one_row_pad"] is True
    gen = copy.copy(tiny_generator)
    gen.manifest = {**tiny_generator.manifest, "dtype": "float16", "quantization": {"option": "q4"}}
    target = machine.bundle_summary("b", gen)["target"]
    assert (target["dtype"], target["weights"]) == ("float16", "q4")


# ---- tools/bench_decode.py ---------------------------------------------------------------------------------------
def run_of(tokens, seconds, **extra):
    return {"tokens": tokens, "seconds": seconds, "tok_s": len(tokens) / seconds, **extra}


def test_bench_decode_summary_and_ratios():
    """Per method: medians and quartiles of tokens/s, pooled tokens over pooled seconds, agreement with ours:ar on
    the same prompt, its ratio to ours:ar; failed runs counted apart. Paired ratios are each prompt's row method
    over its column method."""
    bd = tool("bench_decode")
    runs = [{"ours:ar": run_of([1, 2, 3, 4], 1.0), "ours:lookup": run_of([1, 2, 3, 4], 0.5, mean_accepted_tokens=2.0),
             "llama.cpp": run_of([1, 2, 3, 4], 2.0)},
            {"ours:ar": run_of([5, 6], 1.0), "ours:lookup": run_of([5, 6], 0.25, mean_accepted_tokens=3.0),
             "llama.cpp": run_of([5, 7], 0.5)},
            {"ours:ar": run_of([8] * 6, 2.0), "ours:lookup": run_of([8] * 6, 1.0, mean_accepted_tokens=4.0),
             "llama.cpp": {"error": "RuntimeError: boom"}}]
    summary = bd.summarize(["ours:ar", "ours:lookup", "llama.cpp"], runs)
    ar, lookup, llama = summary["ours:ar"], summary["ours:lookup"], summary["llama.cpp"]
    assert (ar["median_tok_s"], ar["p25_tok_s"], ar["p75_tok_s"]) == (3.0, 2.0, 4.0)
    assert ar["pooled_tok_s"] == pytest.approx(12 / 4.0)
    assert lookup["median_tok_s"] == 8.0 and lookup["x_ours_ar"] == pytest.approx(8 / 3)
    assert lookup["median_tokens_per_step"] == 3.0 and lookup["agreement_with_ours_ar"] == 1.0
    assert (llama["runs"], llama["errors"], llama["median_tok_s"]) == (2, 1, 3.0)
    assert llama["agreement_with_ours_ar"] == 0.5 and llama["mean_common_prefix_frac"] == pytest.approx(0.75)
    paired = bd.ratio_matrix(summary, runs)["paired"]
    assert paired["ours:lookup"]["llama.cpp"] == pytest.approx(statistics.median([8 / 2, 8 / 4]))
    assert paired["ours:ar"]["llama.cpp"] == pytest.approx(statistics.median([4 / 2, 2 / 4]))


def test_bench_decode_times_each_run_and_stops_its_tokens_at_eos(monkeypatch, clock):
    bd = tool("bench_decode")
    monkeypatch.setattr(bd.time, "perf_counter", clock)

    def run(ids, n):
        clock.now += 2.0
        return [4, 5, 2, 7], {"mean_accepted_tokens": 1.5}
    assert bd.timed(run, [1], 4, {2}) == {"tokens": [4, 5], "seconds": 2.0, "tok_s": 1.0, "mean_accepted_tokens": 1.5}


def test_bench_decode_plot_title_counts_the_prompts_decoded(tiny_bundle, tmp_path, monkeypatch, capsys):
    """--limit is at most: a dataset with fewer prompts (or prompts too long to fit) decodes fewer, and the plot's
    title says how many it decoded, as the printed report does (it said the --limit)."""
    bd = tool("bench_decode")
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps({"question_id": i, "category": c, "turns": [f"Question {i}?"]}) + "\n"
                            for i, c in enumerate(["qa", "writing"])))
    titles = []
    monkeypatch.setattr(bd, "plot", lambda summary, out, settings: titles.append(settings))
    monkeypatch.setattr("sys.argv", ["bench_decode.py", "--bundle", tiny_bundle, "--questions", str(path),
                                     "--max-new-tokens", "3", "--threads", "1", "--no-transformers", "--no-genai",
                                     "--no-llama-cpp", "--plot", str(tmp_path / "p.png")])
    bd.main()
    assert "\n2 Spec-Bench prompts" in capsys.readouterr().out
    assert ", 2 Spec-Bench prompts," in titles[0]


# ---- the plot's panels -------------------------------------------------------------------------------------------
def plotted_result():
    """Two drafters over two categories; "b" is the faster, commits more per pass, and the table's "qa" cell is
    its own category's."""
    figures = {"a": {"mean_accepted_tokens": 1.5, "committed_per_pass": {"1": 3, "2": 1},
                     "median_tokens_per_second": 15.0},
               "b": {"mean_accepted_tokens": 2.5, "committed_per_pass": {"1": 1, "3": 3},
                     "median_tokens_per_second": 30.0},
               "ar": {"mean_accepted_tokens": 1.0, "committed_per_pass": None, "median_tokens_per_second": 10.0},
               "transformers:ar": {"median_tokens_per_second": 5.0}}
    qa = {"a": {"mean_accepted_tokens": 1.25}, "b": {"mean_accepted_tokens": 2.75}}
    runs = [{"ar": 10, "a": 15, "b": 30}, {"ar": 10, "a": 12, "b": 40}]
    return {"methods": [{"name": "ar", "engine": "speccompile", "drafter": None, "baseline": "ar"},
                        {"name": "a", "engine": "speccompile", "drafter": "a", "baseline": "ar"},
                        {"name": "b", "engine": "speccompile", "drafter": "b", "baseline": "ar"},
                        {"name": "transformers:ar", "engine": "transformers", "drafter": None,
                         "baseline": "transformers:ar"}],
            "prompts": [{"category": c, "runs": {m: {"tokens_per_second": v} for m, v in r.items()}}
                        for c, r in zip(["qa", "math"], runs)],
            "summary": {"overall": figures, "by_category": {"qa": qa, "math": qa}}}


def test_plot_draws_each_method_s_figures_in_its_own_series(monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgba
    from speccompile.bench import plot
    result, colors = plotted_result(), {"a": "red", "b": "blue"}
    spreads = plot.group_speedups(result, ["a", "b"])
    assert spreads == {"qa": {"a": [1.5], "b": [3.0]}, "math": {"a": [1.2], "b": [4.0]},
                       "overall": {"a": [1.5, 1.2], "b": [3.0, 4.0]}}
    drawn = []
    monkeypatch.setattr(plot, "draw_spread", lambda ax, pos, ratios, color, width: drawn.append((ratios, color)))
    fig, axes = plt.subplots(1, 4)
    plot._speedups_by_category(axes[0], spreads, ["a", "b"], colors)
    assert drawn == [([1.5], "red"), ([3.0], "blue"), ([1.2], "red"), ([4.0], "blue"),
                     ([1.5, 1.2], "red"), ([3.0, 4.0], "blue")]
    plot._committed_per_pass(axes[1], result["summary"]["overall"], ["a", "b"], colors)
    bars = {(round(p.get_x() + p.get_width() / 2), p.get_facecolor()): p.get_height() for p in axes[1].patches}
    assert bars == {(1, to_rgba("red")): 0.75, (2, to_rgba("red")): 0.25,
                    (1, to_rgba("blue")): 0.25, (3, to_rgba("blue")): 0.75}
    plot._speedup_table(axes[2], result, spreads, ["a", "b"])
    cells = [t.get_text() for t in axes[2].texts]
    assert cells[0].endswith("1.25/pass") and cells[2].endswith("1.50/pass") and cells[3].endswith("2.75/pass")
    plot._tokens_per_second(axes[3], result)
    bars = [(p.get_width(), p.get_facecolor()) for p in axes[3].patches]
    assert bars == [(10.0, to_rgba("tab:blue")), (15.0, to_rgba("tab:blue")), (30.0, to_rgba("tab:blue")),
                    (5.0, to_rgba("tab:gray"))]
    plt.close(fig)


def test_plot_draws_the_concurrency_mode_s_streams(monkeypatch, tmp_path):
    """--streams: a fourth panel, a bar of aggregate tokens/s per number of streams labelled with its ratio over the
    requests served one after another (the dashed line), and which runs were not identical to their runs alone."""
    pytest.importorskip("matplotlib")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from speccompile.bench import plot
    section = {"requests": 8, "max_new_tokens": 64, "drafter": "lookup", "sequential": {"tokens_per_second": 100.0},
               "streams": {"1": {"tokens_per_second": 98.0, "speedup_vs_sequential": 0.98, "identical": True},
                           "4": {"tokens_per_second": 205.0, "speedup_vs_sequential": 2.04, "identical": False}}}
    fig, ax = plt.subplots()
    plot._concurrency(ax, section)
    assert [p.get_height() for p in ax.patches] == [98.0, 205.0]
    assert [t.get_text() for t in ax.texts] == ["0.98x", "2.04x\nnot identical"]
    assert [tick.get_text() for tick in ax.get_xticklabels()] == ["1", "4"]
    assert [line.get_ydata()[0] for line in ax.get_lines()] == [100.0]
    plt.close(fig)
    # a run that kept its rounds: its bar split by where its time went, full rounds at the bottom
    section["streams"]["4"] |= {"wall_s": 10.0, "rounds": [
        {"decoding": 4, "prompt": False, "rounds": 50, "seconds": 6.0, "tokens": 600},
        {"decoding": 2, "prompt": True, "rounds": 2, "seconds": 2.0, "tokens": 10},
        {"decoding": 3, "prompt": False, "rounds": 10, "seconds": 1.5, "tokens": 30}]}
    fig, ax = plt.subplots()
    plot._concurrency(ax, section)
    split = [(p.get_x(), p.get_y(), p.get_height()) for p in ax.patches[2:] if p.get_height() > 0]
    assert [round(h, 6) for _, _, h in split] == [123.0, 30.75, 41.0, 10.25]  # 60%, 15%, 20%, 5% of 205
    assert [round(y, 6) for _, y, _ in split] == [0.0, 123.0, 153.75, 194.75]
    assert "time: all slots decoding" in [t.get_text() for t in ax.get_legend().get_texts()]
    plt.close(fig)
    drawn = []
    monkeypatch.setattr(plot, "_concurrency", lambda ax, s: drawn.append(s))
    result = plotted_result() | {"concurrency": section}
    monkeypatch.setattr(plot, "plot_title", lambda r: "title")
    plot.plot(result, str(tmp_path / "streams.png"))
    assert drawn == [section] and (tmp_path / "streams.png").stat().st_size > 0
