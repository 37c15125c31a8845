"""Continuous batching: the batched target graph against the single-sequence one, and the scheduler's promises:
concurrent greedy output equals solo output (every drafter kind), sampled output keeps the target's distribution
and its seed, a long prompt joins in chunks between the others' passes, and a request that leaves frees its slot."""
import collections
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import speccompile
from speccompile.compile.driver import build_bundle
from speccompile.compile.presets import tiny_mtp_head
from speccompile.compile.sources import load_checkpoint
from speccompile.errors import SpeccompileError
from speccompile.format.bundle import read_manifest
from speccompile.format.trees import depths
from speccompile.runtime.batch_engine import BatchEngine, SlotStep
from speccompile.runtime.engine import Engine
from speccompile.runtime.sessions import ancestor_mask
from speccompile.runtime.generator import drain
from speccompile.runtime.kv_cache import KVCache
from speccompile.runtime.noise import NoiseSupport
from speccompile.runtime.sampling import SamplingParams, probabilities

from conftest import quiet, random_prompts
from test_adaptive import synthetic


def batch_engine(bundle):
    m = read_manifest(bundle)
    entry = m["models"]["target_batch"]
    kv = entry["kv_cache"]
    cache = KVCache(entry["num_layers"], kv["num_kv_heads"], kv["max_seq_len"], kv["head_dim"],
                    batch=entry["max_batch"], scratch=kv.get("scratch_slots", 0))
    return m, BatchEngine(bundle, entry, cache, threads=1)


def test_batched_logits_equal_single_sequence(tiny_bundle):
    """A prefill of four prompts of different lengths in one pass, then a tree step over slots 0, 2 and 3 (slot 1
    idle in between): logits, argmax, hidden states and cache rows equal the single-sequence graph's."""
    m, be = batch_engine(tiny_bundle)
    assert m["models"]["target_batch"]["max_batch"] == 4 and be.packed  # products over the real rows alone
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 300, n) for n in (5, 17, 9, 30)]
    solo = [Engine(tiny_bundle, m["models"]["target"], threads=1) for _ in prompts]
    out = be.run([SlotStep(b, p, 0, rows=np.arange(len(p))) for b, p in enumerate(prompts)])
    for b, (p, e) in enumerate(zip(prompts, solo)):
        logits, argmax = e.forward(p, rows=np.arange(len(p)))
        np.testing.assert_allclose(out[b][0], logits, rtol=0, atol=1e-5)
        assert (out[b][1] == argmax).all()
        e.cache.truncate(len(p))
    parents = np.array([-1, 0, 0, 1, -1]) + 1
    block_parents = np.concatenate([[-1], parents])
    steps = [SlotStep(b, np.concatenate([[7], rng.integers(3, 300, 5)]), len(prompts[b]),
                      positions=len(prompts[b]) + depths(block_parents), parents=block_parents, rows=np.arange(6))
             for b in (0, 2, 3)]
    idle_rows = be.cache.key[:, 1, :, :len(prompts[1])].copy()
    out = be.run(steps, idle={1: len(prompts[1])})
    np.testing.assert_array_equal(be.cache.key[:, 1, :, :len(prompts[1])], idle_rows)  # slot 1's K/V untouched
    for st in steps:
        e, L = solo[st.slot], st.length
        logits, argmax = e.forward(st.tokens, st.positions, st.parents, rows=np.arange(6))
        np.testing.assert_allclose(out[st.slot][0], logits, rtol=0, atol=1e-5)
        assert (out[st.slot][1] == argmax).all()
        np.testing.assert_allclose(be.hidden[out[st.slot][2]], e.hidden[:6], rtol=0, atol=1e-5)
        np.testing.assert_allclose(be.cache.key[:, st.slot, :, :L + 6], e.cache.key[:, 0, :, :L + 6], atol=1e-6)


def test_a_one_row_pass_gets_a_padding_row_where_the_machine_needs_it(tiny_bundle):
    """min_rows 2 (runtime/row_parity.py: where one row takes another product kernel): a lone slot's one-token
    step runs a padding row beside it, in the batched graph as in the single-sequence one, and gives the same
    token; at the context's last slot the padding row lands in the scratch slot."""
    m, be = batch_engine(tiny_bundle)
    solo = Engine(tiny_bundle, m["models"]["target"], threads=1)
    be.min_rows = solo.min_rows = 2
    L = m["models"]["target"]["kv_cache"]["max_seq_len"]
    prompt = np.random.default_rng(5).integers(3, 300, 9)
    for length, tokens in ((0, prompt), (9, np.array([7])), (L - 1, np.array([8]))):
        solo.cache.truncate(length)
        for mine, theirs in ((be.cache.key, solo.cache.key), (be.cache.value, solo.cache.value)):
            mine[:, 2] = theirs[:, 0]  # the same committed K/V (the slots past them differ: throw-away rows)
        out = be.run([SlotStep(2, tokens, length, rows=np.arange(len(tokens)))])
        logits, argmax = solo.forward(tokens, rows=np.arange(len(tokens)))
        np.testing.assert_allclose(out[2][0], logits, rtol=0, atol=1e-5)
        assert (out[2][1] == argmax).all() and len(out[2][0]) == len(tokens)
        end = length + len(tokens)
        np.testing.assert_allclose(be.cache.key[:, 2, :, :end], solo.cache.key[:, 0, :, :end], atol=1e-6)


def expected_layout(steps, first, n, S, T):
    """A pass's bias [n, 1, S, T], row_index and layout_index built from each step's visibility mask as
    Engine.forward builds one: the committed columns, then the region's lower triangle (a chain) or ancestors."""
    bias = np.full((n, 1, S, T), -np.inf, np.float32)
    bias[:, :, :, 0] = 0.0
    rows, layout = [], []
    for j in range(n):
        step = next((s for s in steps if s.slot == first + j), None)
        k = 1 if step is None else len(step.tokens)
        start = len(rows)
        rows += [j * S + i for i in range(k)]
        layout += [start + min(i, k - 1) for i in range(S)]
        if step is None:
            continue
        W = step.length
        C = W if step.committed is None else step.committed
        region = W + k - C
        mask = np.tril(np.ones((region, region), bool)) if step.parents is None else ancestor_mask(step.parents)
        bias[j, 0, :k, :C] = 0.0
        bias[j, 0, :k, C:W + k][mask[-k:]] = 0.0
    return bias, np.array(rows), np.array(layout)


@pytest.mark.parametrize("k", [1, 2, 8, 9])
def test_a_pass_lays_out_each_slots_rows_as_its_mask_says(tiny_bundle, monkeypatch, k):
    """What a pass binds (attention bias, the products' row_index and the attention's layout_index), written row
    by row for short chains, against masks built from scratch: a chain of k rows, one after committed columns of
    a region, a tree, and an idle slot between them."""
    _, be = batch_engine(tiny_bundle)
    seen = {}

    def capture(first, n, S, T, *rest):
        seen.update(first=first, n=n, S=S, T=T, bias=be._bias[:n * S * T].reshape(n, 1, S, T).copy())
    monkeypatch.setattr(be, "_bind_and_run", capture)
    rng = np.random.default_rng(k)
    tree = np.array([-1, 0, 0, 1, -1, 3]) + 2  # after two region columns visible to all of it
    steps = [SlotStep(0, rng.integers(3, 300, k), 20),
             SlotStep(2, rng.integers(3, 300, k), 31, committed=28),
             SlotStep(3, rng.integers(3, 300, 6), 17, committed=15, parents=np.concatenate([[-1, 0], tree]))]
    be.run(steps)
    bias, rows, layout = expected_layout(steps, seen["first"], seen["n"], seen["S"], seen["T"])
    assert seen["first"] == 0 and seen["n"] == 4
    np.testing.assert_array_equal(seen["bias"], bias)
    np.testing.assert_array_equal(be._row_index[:len(rows)], rows)
    np.testing.assert_array_equal(be._layout_index[:len(layout)], layout)


JOBS = [dict(drafter="model"), dict(drafter="lookup", tree="dynamic:8"), dict(drafter="layerskip:2"),
        dict(speculate=False), dict(drafter="model", tree="dynamic:6"), dict(drafter="lookup")]


def test_concurrent_greedy_equals_solo(tiny_generator):
    """Six requests from six threads over four slots (two wait for a slot): each gets its solo tokens."""
    g = tiny_generator
    prompts = random_prompts(len(JOBS), seed=3)
    solo = [g.generate(p, 24, **kw).token_ids for p, kw in zip(prompts, JOBS)]
    shared = g.scheduler.shared_passes
    with ThreadPoolExecutor(len(JOBS)) as pool:
        got = list(pool.map(lambda i: g.generate(prompts[i], 24, **JOBS[i]).token_ids, range(len(JOBS))))
    assert got == solo
    assert g.scheduler.shared_passes > shared  # the requests did share passes
    assert [r.token_ids for r in g.generate(prompts, 24)] == [g.generate(p, 24).token_ids for p in prompts]


def test_concurrent_greedy_with_mtp_head(tmp_path):
    """A head that reads the target's features (MTP) gets them from the batched pass's rows."""
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    head = tmp_path / "head.safetensors"
    safetensors_numpy.save_file(tiny_mtp_head(load_checkpoint("tiny:llama").config, repeat_last=True), str(head))
    build_bundle("tiny:llama", str(tmp_path / "b"), drafts=[f"mtp:{head}"], max_seq_len=256, num_draft=3,
                 progress=quiet)
    g = speccompile.load(str(tmp_path / "b"), threads=1)
    prompts = random_prompts(4, seed=5)
    solo = [g.generate(p, 20, tree=t).token_ids for p, t in zip(prompts, (None, "dynamic:6", None, "dynamic:4"))]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda i: g.generate(prompts[i], 20, tree=(None, "dynamic:6", None, "dynamic:4")[i])
                            .token_ids, range(4)))
    assert got == solo
    # the head's features are the target's hidden states of the committed tokens, from the shared passes' rows as
    # from the single-sequence graph's (its repeating drafts do not read them, so compare the features themselves)
    g.generate(prompts[1], 20)
    solo_features = g.drafters["mtp"].h[:g.drafters["mtp"].known].copy()
    g.generate(prompts[:2], 20)  # slot 1's drafter
    shared = g.scheduler._drafters[(1, "mtp")]
    assert shared.known == len(solo_features) > len(prompts[1])
    np.testing.assert_allclose(shared.h[:shared.known], solo_features, rtol=0, atol=1e-4)


def test_concurrent_greedy_with_eagle_heads(tmp_path):
    """EAGLE-1 and EAGLE-3 heads read the batched pass's aux_hidden_states rows of their own slot."""
    pytest.importorskip("safetensors.numpy")
    from test_eagle import eagle1_head, eagle3_config, eagle3_head, write_head
    target = load_checkpoint("tiny:llama")
    e1 = write_head(tmp_path / "e1", eagle1_head(target, repeat=True))
    e3 = write_head(tmp_path / "e3", eagle3_head(target, repeat=True), eagle3_config(target))
    build_bundle("tiny:llama", str(tmp_path / "b"), drafts=[f"eagle:{e1}", f"eagle3:{e3}"], max_seq_len=256,
                 num_draft=3, progress=quiet)
    g = speccompile.load(str(tmp_path / "b"), threads=1)
    prompts = random_prompts(4, seed=9)
    jobs = [dict(drafter="eagle"), dict(drafter="eagle3"), dict(drafter="eagle", tree="dynamic:4"),
            dict(drafter="eagle3", tree="dynamic:4")]
    solo = [g.generate(p, 20, **kw).token_ids for p, kw in zip(prompts, jobs)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda i: g.generate(prompts[i], 20, **jobs[i]).token_ids, range(4)))
    assert got == solo


@pytest.mark.parametrize("kw", [dict(drafter="model", tree="dynamic:4"), dict(drafter="layerskip:2"),
                                dict(drafter="lookup", tree="dynamic:4"), dict(drafter="model", tree="adaptive")])
def test_sampled_distribution_with_several_slots(tiny_bundle, kw):
    """The first two new tokens of many seeded requests, run four at a time (the second token may come from an
    accepted draft), follow the target's distribution (chi-square over the pairs). Top-k, so sampled by noise
    (runtime/noise.py) except for the tree of lookup nodes, which runs the sampled acceptance rule."""
    g = speccompile.load(tiny_bundle, threads=1)
    if kw.get("drafter") == "lookup":
        g.noise_ok = NoiseSupport()
    g._cost = synthetic(5.0, 0.05)  # adaptive drafting's costs: rows cheap enough to draft (no calibration)
    params = SamplingParams(temperature=1.5, top_k=3)
    prompt = np.array(random_prompts(1, seed=11)[0], np.int64)
    n = 480
    streams = [g.stream(prompt, 3, temperature=1.5, top_k=3, seed=i, **kw) for i in range(n)]  # all queued
    results = [drain(s) for s in streams]
    assert g.scheduler.shared_passes > 0
    counts = collections.Counter(tuple(r.token_ids[:2]) for r in results)
    expected = exact_pairs(tiny_bundle, prompt, params)
    chi2 = sum((counts.get(pair, 0) - n * p) ** 2 / (n * p) for pair, p in expected.items() if n * p > 0)
    assert set(counts) <= set(expected)
    assert chi2 < 30, (chi2, counts, expected)  # 8 degrees of freedom: p < 0.001 by chance


def exact_pairs(bundle, prompt, params):
    """P(t1, t2) under the target after temperature and top-k."""
    m = read_manifest(bundle)
    e = Engine(bundle, m["models"]["target"], threads=1)
    logits, _ = e.forward(prompt)
    p1 = probabilities(logits[0].copy(), params)
    out = {}
    for t1 in np.flatnonzero(p1):
        e.cache.truncate(len(prompt))
        logits, _ = e.forward(np.array([t1]))
        p2 = probabilities(logits[0].copy(), params)
        out |= {(int(t1), int(t2)): p1[t1] * p2[t2] for t2 in np.flatnonzero(p2)}
        e.cache.truncate(len(prompt))
    return out


def test_seeds_reproduce_alone_and_shared(tiny_generator, monkeypatch):
    g = tiny_generator
    jobs = [dict(drafter="model", tree="dynamic:6"), dict(drafter="layerskip:2"), dict(drafter="lookup"),
            dict(speculate=False), dict(drafter="model", tree="adaptive+lookup:4")]
    prompts = random_prompts(len(jobs), seed=8)
    monkeypatch.setattr(g, "_cost", synthetic(5.0, 0.05))
    solo = [g.generate(p, 20, temperature=1.2, seed=40 + i, **kw).token_ids
            for i, (p, kw) in enumerate(zip(prompts, jobs))]
    for _ in range(2):
        with ThreadPoolExecutor(len(jobs)) as pool:
            got = list(pool.map(lambda i: g.generate(prompts[i], 20, temperature=1.2, seed=40 + i, **jobs[i])
                                .token_ids, range(len(jobs))))
        assert got == solo


@pytest.mark.parametrize("mixed", [True, False])
def test_a_long_prompt_joins_in_chunks_between_decode_passes(tiny_generator, monkeypatch, mixed):
    """The long prompt joins slot 1, between two decoding slots: the passes that leave it out (theirs) run a
    throw-away row for it that must not touch its committed K/V. mixed: its chunks ride in the others' decode
    passes (MIXED_CHUNK tokens each); else each chunk runs in a prefill pass of its own."""
    from speccompile.runtime.scheduler import MIXED_CHUNK
    g = tiny_generator
    monkeypatch.setattr(g, "context_cache", None)  # the solo runs would leave the long prompt's blocks cached
    monkeypatch.setattr(g.scheduler, "mix_prefill", mixed)
    short = random_prompts(4, seed=21)
    long_prompt = list(np.random.default_rng(2).integers(3, 380, 200))  # two prefill chunks
    others = [short[0], *short[2:]]
    solo = [g.generate(p, 40, drafter="lookup").token_ids for p in others] + \
        [g.generate(long_prompt, 12, drafter="model").token_ids]
    wait_until_idle(g)
    left, finish = [], g.scheduler._finish

    def keep_rows(s, error=None):  # the late request's prompt rows in its slot, as it leaves it
        if len(s.req.ids) == len(long_prompt):
            left[:] = [c[:, 1, :, :len(long_prompt)].copy() for c in (g.scheduler.cache.key, g.scheduler.cache.value)]
        finish(s, error)
    monkeypatch.setattr(g.scheduler, "_finish", keep_rows)
    try:
        streams = [g.stream(p, 40 if i != 1 else 200, drafter="lookup") for i, p in enumerate(short)]
        heads = [next(s).token_ids for s in streams]  # every slot decoding
        g.scheduler.trace = trace = []
        streams[1].close()  # slot 1 frees: the late request waits for it
        late = g.stream(long_prompt, 12, drafter="model")
        del heads[1], streams[1]
        got = [h + [t for c in s for t in c.token_ids] for h, s in zip(heads, streams)]
        got.append([t for c in late for t in c.token_ids])
    finally:
        g.scheduler.trace = None
    assert got == solo
    # the tiny model's greedy tokens hardly depend on one K/V row: check slot 1's prompt rows themselves, as the
    # late request left them (a free slot's rows then take the throw-away rows of passes over the others)
    engine = Engine(g.bundle_dir, g.manifest["models"]["target"], threads=1)
    for start in range(0, len(long_prompt), 100):  # at most MAX_STEP_TOKENS a pass
        engine.forward(np.array(long_prompt[start:start + 100], np.int64))
        engine.cache.truncate(min(start + 100, len(long_prompt)))
    for mine, theirs in zip(left, (engine.cache.key, engine.cache.value)):
        np.testing.assert_allclose(mine, theirs[:, 0, :, :len(long_prompt)], rtol=0, atol=1e-5)
    if mixed:  # every chunk in a pass with the three others' decoding; slot 1 then decodes with them
        chunks = [e for e in trace if e[1] == (0, 2, 3, 1)]
        assert len(chunks) == -(-len(long_prompt) // MIXED_CHUNK) and all(e[0] == "decode" for e in chunks)
        assert ("decode", (0, 1, 2, 3)) in trace and not any(e[0] == "prefill" for e in trace)
        return
    chunks = [i for i, e in enumerate(trace) if e[0] == "prefill" and e[1] == (1,)]
    assert len(chunks) == 2
    between = trace[chunks[0] + 1:chunks[1]]
    assert any(e[0] == "decode" and set(e[1]) == {0, 2, 3} for e in between)  # the others kept decoding around it


def wait_until_idle(g, timeout=10.0):
    end = time.monotonic() + timeout
    while any(g.scheduler.slots) or g.scheduler.waiting:
        assert time.monotonic() < end, g.scheduler.slots
        time.sleep(0.01)


def test_leaving_requests_free_their_slots(tiny_generator):
    """Max tokens, a stop string and a closed stream each free the slot; a request waiting for one then runs."""
    g = tiny_generator
    p = random_prompts(5, seed=30)
    full = g.generate(p[0], 30, chat=False)
    text = full.text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    open_streams = [g.stream(q, 200) for q in p[1:5]]  # every slot busy
    for s in open_streams:
        next(s)
    waiting = g.stream(p[0], 30, stop=stop, chat=False)
    assert len(g.scheduler.waiting) == 1
    open_streams[0].close()  # a closed stream leaves mid-way
    result = []
    t = threading.Thread(target=lambda: result.append([t for c in waiting for t in c.token_ids]))
    t.start()
    t.join(10)
    assert result and result[0] == g.generate(p[0], 30, stop=stop, chat=False).token_ids
    for s in open_streams[1:]:
        s.close()
    wait_until_idle(g)
    assert len(g.generate(p[1], 5).token_ids) == 5  # max tokens
    wait_until_idle(g)


def test_a_stop_string_ends_the_request_before_its_caller_reads_it(tiny_generator):
    """generate() over a list reads one stream after another while all of them decode: a request whose stop
    string appears ends at that pass, as alone (and frees its slot), not at max_new_tokens when its stream is
    read at last. Its stats then count the passes it needed, as alone."""
    g = tiny_generator
    prompts = random_prompts(6, seed=5)
    text = g.generate(prompts[2], 60, chat=False).text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    solo = [g.generate(p, 200, chat=False, stop=stop) for p in prompts]
    assert len(solo[2].token_ids) < 60  # the stop string ends prompt 2's answer early
    got = g.generate(prompts, 200, chat=False, stop=stop)
    assert [r.token_ids for r in got] == [r.token_ids for r in solo]
    assert [r.stats["verify_steps"] for r in got] == [r.stats["verify_steps"] for r in solo]


def test_without_a_batched_graph_calls_are_serialized(tmp_path):
    build_bundle("tiny:llama", str(tmp_path / "b"), drafts=["lookup"], max_seq_len=128, max_batch=1, progress=quiet)
    g = speccompile.load(str(tmp_path / "b"), threads=1)
    assert g.scheduler is None and "target_batch" not in g.manifest["models"]
    first = g.stream("hello", 8)
    next(first)
    with pytest.raises(SpeccompileError, match="already generating"):
        g.generate("hello", 4)
    first.close()
    prompts = random_prompts(2)
    assert [r.token_ids for r in g.generate(prompts, 6)] == [g.generate(q, 6).token_ids for q in prompts]


def test_bench_concurrency_mode(tiny_bundle):
    """bench --streams: the same requests one after another and by N streams, identical tokens, percentiles."""
    from speccompile.bench.concurrency import format_concurrency, measure_concurrency
    g = speccompile.load(tiny_bundle, threads=1)
    prompts = [{"ids": p} for p in random_prompts(4, seed=50)]
    section = measure_concurrency(g, prompts, 12, (1, 2, 4), 4, "lookup", repeats=3)
    assert section["requests"] == 4 and section["batched_graph"] and section["repeats"] == 3
    for n, run in section["streams"].items():
        assert run["identical"] and run["identical_share"] == 1.0
        assert run["new_tokens"] == section["sequential"]["new_tokens"]
        assert run["ttft_s"]["p50"] <= run["ttft_s"]["p90"] <= run["ttft_s"]["p99"]
        assert len(run["round_speedups"]) == 3
        assert run["speedup_vs_sequential"] == sorted(run["round_speedups"])[1] > 0  # their median
    assert "identical" in format_concurrency(section) and "rounds (vs seq)" in format_concurrency(section)
    assert section["streams"]["1"]["shared_passes"] == 0 < section["streams"]["4"]["shared_passes"]
    assert "passes shared by several sequences" in format_concurrency(section)
    for run in [section["sequential"], *section["streams"].values()]:  # every token from a round, inside the run
        assert sum(r["tokens"] for r in run["rounds"]) == run["new_tokens"]
        assert sum(r["seconds"] for r in run["rounds"]) <= run["wall_s"]
    assert {r["decoding"] for r in section["sequential"]["rounds"]} <= {0, 1}
    for n, run in section["streams"].items():  # how many decode together depends on timing; never more than asked
        assert 1 <= max(r["decoding"] for r in run["rounds"]) <= int(n)
    assert "time by round: " in format_concurrency(section)
    seq = section["sequential"]  # the share of its time before its requests' first tokens, theirs alone
    assert 0 < seq["first_token_share"] < 1
    assert all("first_token_share" not in run for run in section["streams"].values())
    with pytest.raises(SpeccompileError, match="at least 1"):
        measure_concurrency(g, prompts, 12, (0,), 4, None)


def test_a_serving_runs_time_by_round():
    """The text of bench --streams says what share of a run all its slots decoded together, at what speed against
    the run one after another's decoding rounds, and what fewer slots, prompts and the time between rounds took."""
    from speccompile.bench.concurrency import time_by_round
    rounds = [{"decoding": 4, "prompt": False, "rounds": 50, "seconds": 6.0, "tokens": 600},
              {"decoding": 4, "prompt": True, "rounds": 2, "seconds": 2.0, "tokens": 10},
              {"decoding": 3, "prompt": False, "rounds": 10, "seconds": 1.0, "tokens": 30}]
    sequential = {"rounds": [{"decoding": 1, "prompt": False, "rounds": 400, "seconds": 8.0, "tokens": 400},
                             {"decoding": 0, "prompt": True, "rounds": 4, "seconds": 1.0, "tokens": 4}]}
    assert time_by_round({"rounds": rounds, "wall_s": 10.0}, 4, sequential) == (
        "time by round: 4 slots decoding 60% at 100.0 tok/s (2.00x one after another's decoding), fewer 10%, with a "
        "prompt's chunk 20%, between rounds 10%")
    # 8 streams over 4 slots: the rounds of 4 are the full ones
    assert time_by_round({"rounds": rounds, "wall_s": 10.0}, 8, sequential).startswith("time by round: 4 slots")
    assert time_by_round({"rounds": [], "wall_s": 1.0}, 4, sequential) is None  # no batched graph


@pytest.mark.skipif(not hasattr(signal, "SIGINT") or os.name != "posix", reason="sends itself SIGINT (POSIX)")
def test_an_interrupted_concurrency_run_ends_its_streams_first():
    """Ctrl-C while bench --streams waited for its streams: the interrupted Thread.join marked a running stream as
    stopped, the interpreter tore itself down under it (inside onnxruntime) and the process aborted; and streams
    kept decoding every request left. Now each stream ends its request at its next text, before the interrupt."""
    from speccompile.bench.concurrency import serve
    ended = []

    class SlowGenerator:  # each request reads text for up to 5 s unless its reader stops it
        def generate(self, ids, max_new_tokens, on_text=None, **_):
            try:
                for _ in range(500):
                    if on_text:
                        on_text("x")
                    time.sleep(0.01)
            finally:
                ended.append(time.perf_counter())

    # Python's own Ctrl-C handler, as a terminal's user has it: a process started in the background by a
    # non-interactive shell inherits SIGINT ignored, and Python then leaves it so
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            serve(SlowGenerator(), [[1]] * 6, 4, 2, None)
    finally:
        signal.signal(signal.SIGINT, previous)
    interrupted = time.perf_counter()
    deadline = interrupted + 2
    while len(ended) < 2 and time.perf_counter() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    assert len(ended) == 2 and max(ended) - interrupted < 1  # two streams, each ended its one request at once


def test_gate_holds_the_concurrency_ratio(tmp_path):
    from test_gate import gate, refused, result_doc
    doc = result_doc()
    doc["concurrency"] = {"streams": {"1": {"speedup_vs_sequential": 1.0, "identical": True},
                                      "4": {"speedup_vs_sequential": 2.1, "identical": True}}}
    out = gate(tmp_path, doc, result_doc(), "--min-concurrency", 1.5, expect=0)  # a baseline without the section
    assert "concurrency 4 streams" in out
    slow = json.loads(json.dumps(doc))
    slow["concurrency"]["streams"]["4"]["speedup_vs_sequential"] = 1.2
    assert "gate FAILED: concurrency 4 streams" in gate(tmp_path, slow, doc, "--min-concurrency", 1.5, expect=1)
    wrong = json.loads(json.dumps(doc))
    wrong["concurrency"]["streams"]["4"] |= {"identical": False, "identical_share": 0.5}
    assert "gate FAILED: concurrency identical" in gate(tmp_path, wrong, doc, expect=1)
    assert "no 'concurrency 4 streams'" in refused(tmp_path, result_doc(), result_doc(), "--min-concurrency", 1.5)


def test_the_first_adaptive_request_calibrates_outside_the_slots(tiny_bundle, tmp_path, monkeypatch):
    """With no cost model cached, an adaptive request joining while another decodes measures it first, with the
    slots to itself: the calibration runs the target engine, which is slot 0's, and used to overwrite the K/V of
    the request decoding there."""
    monkeypatch.setenv("SPECCOMPILE_CACHE", str(tmp_path / "cost"))
    g = speccompile.load(tiny_bundle, threads=1, context_cache=False)
    p, q = list(np.random.default_rng(0).integers(3, 384, 40)), random_prompts(2, seed=4)[1]
    kw = dict(drafter="lookup", temperature=5.0, seed=7)
    solo = g.generate(p, 40, **kw).token_ids
    assert g._cost is None
    a = g.stream(p, 40, **kw)  # slot 0
    got = [t for _ in range(2) for t in next(a).token_ids]
    b = g.stream(q, 12, drafter="model", tree="adaptive")
    assert g._cost is not None  # measured before b joined
    got += [t for c in a for t in c.token_ids]
    drain(b)
    assert got == solo


def test_a_request_that_cannot_join_gets_its_error_alone(tiny_generator, monkeypatch):
    """An error while a request takes its slot goes to that request; the request decoding beside it runs on."""
    g = tiny_generator
    p = random_prompts(3, seed=8)
    solo = g.generate(p[0], 24).token_ids
    fork = g.fork_drafter

    def failing(name, slot):
        raise SpeccompileError("drafter could not be loaded")
    a = g.stream(p[0], 24)
    got = list(next(a).token_ids)
    monkeypatch.setattr(g, "fork_drafter", failing)
    monkeypatch.setattr(g.scheduler, "_drafters", {})
    b = g.stream(p[1], 8, drafter="model")
    with pytest.raises(SpeccompileError, match="could not be loaded"):
        drain(b)
    got += [t for c in a for t in c.token_ids]
    assert got == solo
    monkeypatch.setattr(g, "fork_drafter", fork)
    wait_until_idle(g)


@pytest.mark.parametrize("mixed", [True, False])
def test_shared_passes_near_the_context_end_stay_inside_the_cache(tiny_bundle, mixed):
    """A request a few tokens from the end of the context shares passes with a joining prompt's chunk, or with a
    sampled request's wide tree: every slot of a pass is laid out as deep as its longest step, so the pass must
    fit after the deepest slot's K/V. Each request gives what it gives alone. (No context cache: its hits would
    shorten the joining prompt's chunks.)"""
    g = speccompile.load(tiny_bundle, threads=1, context_cache=False)
    rng = np.random.default_rng(3)
    near_end = list(rng.integers(3, 384, g.max_seq_len - 30))
    joining = list(rng.integers(3, 384, 100 if mixed else 12))
    b_kw = dict(drafter="lookup") if mixed else dict(drafter="model", tree="dynamic:40", temperature=5.0, seed=1)
    b_new = 20 if mixed else 80  # a wide tree still drafting when the other slot nears the end
    solo = [g.generate(near_end, 29, drafter="lookup").token_ids, g.generate(joining, b_new, **b_kw).token_ids]
    g.scheduler.mix_prefill = mixed
    a = g.stream(near_end, 29, drafter="lookup")
    got = [list(next(a).token_ids)]
    b = g.stream(joining, b_new, **b_kw)
    got[0] += [t for c in a for t in c.token_ids]
    got.append(drain(b).token_ids)
    assert got == solo


def test_a_sampled_chain_beside_a_request_near_the_context_end_keeps_its_seed(tiny_bundle):
    """A chain a sampled draft model drafts is accepted with draws from the request's generator, one per draft: cut
    short to fit the pass beside a request near the end of the context, it would draw fewer and sample other
    tokens than the same seed alone. It drafts as alone, and a chain that does not fit runs in a pass of its
    own."""
    g = speccompile.load(tiny_bundle, threads=1, context_cache=False)
    near_end = list(np.random.default_rng(1).integers(3, 380, g.max_seq_len - 6))
    kw = dict(drafter="model", temperature=0.7, top_k=3, top_p=0.9, seed=1)
    prompt = [202, 7, 216]
    solo = g.generate(prompt, 30, chat=False, **kw)
    a = g.stream(near_end, 6, chat=False)
    next(a)  # decoding a few rows from the end of its slot
    got = drain(g.stream(prompt, 30, chat=False, **kw))
    drain(a)
    assert (got.token_ids, got.stats["proposed"]) == (solo.token_ids, solo.stats["proposed"])


def test_a_riding_chunk_fits_after_the_prompts_prefilled_before_it(tiny_bundle):
    """Two prompts join slots 1 and 2 between decoding slots 0 and 3: slot 1's chunks ride in the decode passes,
    slot 2's long prompt runs in passes of its own first and ends near the context's end. A riding chunk is laid
    out in every slot of the pass, slot 2 too, so it rides only if it fits after slot 2's new K/V; else it runs
    alone. Every request gives what it gives alone (no request fails for another's prompt)."""
    g = speccompile.load(tiny_bundle, threads=1, context_cache=False)
    rng = np.random.default_rng(3)
    short = random_prompts(4, seed=21)
    riding, long_prompt = list(rng.integers(3, 384, 100)), list(rng.integers(3, 384, g.max_seq_len - 6))
    solo = [g.generate(p, n, drafter="lookup").token_ids
            for p, n in ((short[0], 60), (short[3], 60), (riding, 20), (long_prompt, 6))]
    streams = [g.stream(p, 60, drafter="lookup") for p in short]
    heads = [list(next(s).token_ids) for s in streams]
    streams[1].close()
    streams[2].close()
    late = [g.stream(riding, 20, drafter="lookup"), g.stream(long_prompt, 6, drafter="lookup")]  # slots 1 and 2
    got = [heads[i] + [t for c in streams[i] for t in c.token_ids] for i in (0, 3)]
    assert got + [drain(s).token_ids for s in late] == solo


def test_streams_left_unread_free_their_slots(tiny_generator):
    """A stream closed or dropped before its first read never ran its body; its request, already submitted, is
    cancelled all the same. generate() over a list with a prompt too long cancels the ones it had opened."""
    g = tiny_generator
    p = random_prompts(2, seed=12)
    g.stream(p[0], 50).close()
    g.stream(p[1], 50)  # dropped at once
    assert g.generate(p[0], 5).token_ids == g.generate(p[0], 5).token_ids
    wait_until_idle(g)
    assert not any(g.scheduler.slots) and not g.scheduler.waiting
    with pytest.raises(SpeccompileError, match="does not fit"):
        g.generate([p[0], list(range(3, 3 + g.max_seq_len))], 5)
    g.generate(p[1], 3)
    wait_until_idle(g)
    assert not any(g.scheduler.slots) and not g.scheduler.waiting


def test_a_consumer_that_raises_ends_its_request(tiny_generator):
    """An on_text that raises ends its request and frees its slot, though the exception is kept (a Future keeps
    it, with the traceback that holds the stream's frames): the others' rounds would decode it to the end."""
    g = tiny_generator
    p = random_prompts(1, seed=50)[0]

    def consumer(_text):
        raise ValueError("the consumer failed")
    with pytest.raises(ValueError, match="consumer failed") as kept:
        g.generate(p, 200, chat=False, on_text=consumer)
    wait_until_idle(g)
    assert not any(g.scheduler.slots) and kept.value is not None


def test_a_request_behind_this_threads_own_loop_is_refused(tiny_generator):
    """Typical acceptance under top-p runs in the caller's own loop, which holds the scheduler: a request from the same thread
    meanwhile would wait for ever, so it is refused, as without a batched graph."""
    g = tiny_generator
    own = g.stream("hello", 8, temperature=0.8, seed=1, acceptance="typical", top_p=0.9)
    next(own)
    with pytest.raises(SpeccompileError, match="already generating"):
        g.generate("hello", 4)
    own.close()
    assert len(g.generate("hello", 4).token_ids) <= 4


def test_a_request_of_its_own_loop_goes_before_requests_that_come_later(tiny_generator):
    """Typical acceptance under top-p (and the first adaptive request's calibration) runs once every slot is free. While it
    waits for that, no request takes a slot, or a steady stream of requests would keep it waiting for ever: here
    the request submitted before it but still waiting for a slot runs after it, and gives what it gives alone."""
    g = tiny_generator
    p = random_prompts(6, seed=40)
    solo = g.generate(p[5], 8).token_ids
    busy = [g.stream(q, 30) for q in p[:4]]
    for s in busy:
        next(s)  # every slot holds a request
    later = g.stream(p[5], 8)
    assert len(g.scheduler.waiting) == 1
    done = []
    own = threading.Thread(target=lambda: done.append(g.generate(p[4], 6, temperature=0.8, seed=1,
                                                                 acceptance="typical", top_p=0.9)))
    own.start()
    own.join(30)
    assert done and len(g.scheduler.waiting) == 1  # the later request has not taken a slot yet
    assert drain(later).token_ids == solo
    for s in busy:
        s.close()
    wait_until_idle(g)


def test_a_stream_read_from_two_threads_leaves_the_first_free(tiny_generator):
    """A thread pool may read one stream on several workers (as a web server's does): the worker that read it last
    holds the Generator, and the one that read it first may serve another request meanwhile (it waits its turn)."""
    g = tiny_generator
    worker1, worker2 = ThreadPoolExecutor(1), ThreadPoolExecutor(1)
    own = g.stream([1, 5, 9, 20], 12, chat=False, temperature=0.8, seed=1, acceptance="typical", top_p=0.9)  # its own loop
    worker1.submit(next, own).result()
    worker2.submit(next, own).result()
    other = worker1.submit(lambda: g.generate([7, 7, 7], 4, chat=False).token_ids)
    rest = worker2.submit(lambda: drain(own)).result()
    assert len(other.result(timeout=60)) == 4 and rest.token_ids
    with pytest.raises(SpeccompileError, match="already generating"):  # the refusal stands for a thread's own
        own = g.stream("hello", 8, temperature=0.8, seed=1, acceptance="typical", top_p=0.9)
        worker2.submit(next, own).result()
        worker2.submit(g.generate, "hello", 4).result()
    own.close()


@pytest.mark.parametrize("failure", [RuntimeError("onnxruntime failed"), KeyboardInterrupt()])
def test_a_failed_round_gives_each_request_its_own_error(tiny_generator, monkeypatch, failure):
    """A round that raises ends every request in a slot: the thread that ran it gets the exception itself, each
    other request a SpeccompileError of its own naming it; a KeyboardInterrupt stays the running thread's (it
    is raised there even when that thread's request holds no slot) and reaches no other thread as theirs."""
    g = tiny_generator
    p = random_prompts(2, seed=41)
    a, b = g.stream(p[0], 40), g.stream(p[1], 40)
    next(a), next(b)  # both decoding in slots
    engine_run = type(g.scheduler.engine).run

    def failing(self, *args, **kwargs):
        monkeypatch.setattr(type(self), "run", engine_run)
        raise failure
    monkeypatch.setattr(type(g.scheduler.engine), "run", failing)
    with pytest.raises(type(failure)) as ran:  # this thread runs the failing round
        drain(a)
    assert ran.value is failure
    with pytest.raises(SpeccompileError, match=type(failure).__name__) as other:
        drain(b)
    assert other.value is not failure and other.value.__cause__ is failure
    wait_until_idle(g)
    assert g.generate(p[0], 6).token_ids == g.generate(p[0], 6).token_ids  # the slots work again


@pytest.mark.parametrize("change", ["rebuilt", "moved"])
def test_graphs_opened_after_loading_come_from_the_loaded_bundle(tmp_path, monkeypatch, change):
    """The batched graph and the other slots' drafters open at the first shared pass, from the bundle's path: a
    bundle rebuilt there since loading (--force, another model of the same shapes) or moved away is one error,
    never the other model's graph decoding beside the loaded one (or onnxruntime's error on a missing file)."""
    from speccompile.compile import presets, sources
    from speccompile.errors import BundleError
    out = str(tmp_path / "b")
    build_bundle("tiny:llama", out, drafts=["layerskip:2"], max_seq_len=128, progress=quiet)
    g = speccompile.load(out, threads=1)
    prompts = random_prompts(2, seed=7)
    solo = [g.generate(p, 12).token_ids for p in prompts]
    if change == "rebuilt":
        monkeypatch.setattr(sources, "tiny_checkpoint", lambda name: presets.tiny_checkpoint(name, seed=7))
        build_bundle("tiny:llama", out, drafts=["layerskip:2"], max_seq_len=128, progress=quiet, overwrite=True)
    else:
        os.rename(out, str(tmp_path / "elsewhere"))
    with pytest.raises(BundleError, match="changed on disk since it was loaded"):
        g.generate(prompts, 12)
    wait_until_idle(g)
    assert [g.generate(p, 12).token_ids for p in prompts] == solo  # one at a time, the loaded graphs still serve


def test_streams_closed_or_dropped_unread_do_not_pile_up_in_the_queue(tiny_generator):
    """A stream closed or dropped before its first read leaves the queue of waiting requests now, not at the next
    round some other read runs: a caller that opens streams it then abandons does not grow the queue without end."""
    g = tiny_generator
    p = random_prompts(1, seed=50)[0]
    wait_until_idle(g)
    for _ in range(20):
        g.stream(p, 50)  # dropped at once: only marked cancelled (a finalizer takes no lock), gone at the next submit
    assert len(g.scheduler.waiting) == 1
    for _ in range(20):
        g.stream(p, 50)
        g.stream(p, 50).close()
    assert not g.scheduler.waiting and not any(g.scheduler.slots)
    assert g.generate(p, 4).token_ids == g.generate(p, 4, speculate=False).token_ids


def test_a_stream_read_late_times_its_tokens_when_they_came(tiny_generator):
    """generate() over a list reads one stream after another, while all of them decode: a request that ended
    while another was read times its first token and its end when its passes gave them, not when its stream
    was read at last (its decode rate was then its tokens over the moments its reader took)."""
    g = tiny_generator
    p = random_prompts(2, seed=64)
    wait_until_idle(g)
    t0 = time.perf_counter()
    first, late = g.stream(p[0], 60, speculate=False), g.stream(p[1], 8, speculate=False)
    drain(first)  # runs the rounds that decode the late request to its end
    ended = time.perf_counter() - t0
    time.sleep(0.05)
    result = drain(late)
    assert len(result.token_ids) == 8 and result.finish_reason == "length"
    assert 0 < result.stats["ttft_s"] < result.stats["total_s"] <= ended
    assert result.stats["decode_tokens_per_second"] == 7 / (result.stats["total_s"] - result.stats["ttft_s"])


def test_a_cancelled_stream_ends_with_what_it_had(tiny_generator):
    """cancel() (from any thread: a server's event loop whose client went, while a worker reads): the stream ends
    at its next read with a result of the tokens so far; one still waiting for a slot ends without a token, its
    prompt never run, while the requests in the slots decode on."""
    g = tiny_generator
    p = random_prompts(6, seed=60)
    wait_until_idle(g)
    busy = [g.stream(q, 200, speculate=False) for q in p[:4]]
    for s in busy:
        next(s)  # every slot holds a request
    queued = g.stream(p[4], 20)
    queued.cancel()
    result = drain(queued)
    assert result.token_ids == [] and result.stats["ttft_s"] is None
    assert all(g.scheduler.slots) and not g.scheduler.waiting
    busy[0].cancel()
    result = drain(busy[0])
    assert 0 < len(result.token_ids) < 200
    assert result.token_ids == g.generate(p[0], 200, speculate=False).token_ids[:len(result.token_ids)]
    for s in busy[1:]:
        s.close()
    wait_until_idle(g)


def test_a_cancelled_streams_chunks_add_up_to_its_result(tiny_generator):
    """A cancelled stream's chunks (and on_text) add up to its result, as every stream's do: the text it held back,
    here the start of a stop string that never completed, comes as its last chunk, not in the result alone."""
    g = tiny_generator
    p = random_prompts(1, seed=62)[0]
    first = g.generate(p, 1, chat=False)
    assert first.text.strip()
    wait_until_idle(g)
    seen = []
    stream = g.stream(p, 20, chat=False, stop=first.text + "\u2603\u2603", on_text=seen.append)
    chunks = [next(stream)]  # the first token alone, its text held back: it begins the stop string
    assert chunks[0].text == ""
    stream.cancel()
    while True:
        try:
            chunks.append(next(stream))
        except StopIteration as stop:
            result = stop.value
            break
    assert (result.finish_reason, result.token_ids, result.text) == ("cancelled", first.token_ids, first.text)
    assert [t for c in chunks for t in c.token_ids] == result.token_ids
    assert "".join(c.text for c in chunks) == "".join(seen) == result.text


@pytest.mark.parametrize("loop", ["typical acceptance", "no batched graph"])
def test_a_stream_its_callers_own_loop_runs_can_be_cancelled_too(tiny_generator, tmp_path, loop):
    """Every stream has cancel(), as the README promises, also one run in its caller's own loop (typical
    acceptance under top-p, or a bundle built with --max-batch 1), not only one the scheduler runs: from another thread, the
    stream then ends at its next read with the tokens so far, its Generator free for the next call."""
    g = tiny_generator
    if loop == "no batched graph":
        build_bundle("tiny:llama", str(tmp_path / "b"), drafts=["lookup"], max_seq_len=128, max_batch=1,
                     progress=quiet)
        g = speccompile.load(str(tmp_path / "b"), threads=1)
    kw = dict(temperature=0.8, seed=1, acceptance="typical", top_p=0.9) if loop == "typical acceptance" else {}
    p = random_prompts(1, seed=63)[0]
    full = g.generate(p, 40, chat=False, **kw)
    stream = g.stream(p, 40, chat=False, **kw)
    next(stream)
    ThreadPoolExecutor(1).submit(stream.cancel).result()
    result = drain(stream)
    assert result.finish_reason == "cancelled" and 0 < len(result.token_ids) < len(full.token_ids)
    assert result.token_ids == full.token_ids[:len(result.token_ids)]
    assert g.generate(p, 40, chat=False, **kw).token_ids == full.token_ids


@pytest.mark.parametrize("loop", ["typical acceptance", "no batched graph"])
def test_a_stream_cancelled_while_it_waits_for_its_turn_ends_at_once(tiny_generator, tmp_path, loop):
    """A stream its caller's own loop runs waits for its turn while another generation holds the Generator (or a
    round holds the scheduler's slots); cancel() from another thread ends that wait at once, nothing run, as it
    ends a submitted request still waiting for a slot: a server's worker lets go of its queue place, and a typical
    request stops keeping the others out of the slots, instead of waiting until the generation ahead ends."""
    g, kw = tiny_generator, dict(temperature=0.8, seed=1, acceptance="typical", top_p=0.9)
    if loop == "no batched graph":
        build_bundle("tiny:llama", str(tmp_path / "b"), drafts=["lookup"], max_seq_len=128, max_batch=1,
                     progress=quiet)
        g, kw = speccompile.load(str(tmp_path / "b"), threads=1), {}
    p, q = random_prompts(2, seed=64)
    ahead = g.stream(p, 100, chat=False)
    next(ahead)  # another generation holds the Generator
    if g.scheduler:
        ahead.close()
        wait_until_idle(g)
        with g.scheduler.wake:
            g.scheduler.driving = True  # another caller's round is under way
    try:
        waiting = g.stream(q, 20, chat=False, **kw)
        reader = ThreadPoolExecutor(1).submit(drain, waiting)
        time.sleep(0.3)  # it waits for its turn
        waiting.cancel()
        result = reader.result(timeout=10)
        assert result.finish_reason == "cancelled" and result.token_ids == []
        assert not (g.scheduler and g.scheduler.draining)  # nobody keeps requests out of the slots now
    finally:
        ahead.close()
        if g.scheduler:
            with g.scheduler.wake:
                g.scheduler.driving = False
                g.scheduler.wake.notify_all()
    assert g.generate(q, 20, chat=False, **kw).finish_reason != "cancelled"  # the Generator is free again


def test_a_request_waiting_behind_a_typical_one_ends_at_once_when_cancelled(tiny_generator):
    """A typical-acceptance request's own loop (under top-p) holds the scheduler's slots until its generation ends, and a submitted
    request waits for a slot meanwhile. cancel() from another thread (a server whose client went) ends that wait at
    once, nothing run, as it does while other requests hold the slots, not when the typical generation ends."""
    g = tiny_generator
    p, q = random_prompts(2, seed=65)
    wait_until_idle(g)
    holder = ThreadPoolExecutor(1)
    own = g.stream(p, 200, chat=False, temperature=0.8, seed=1, acceptance="typical", top_p=0.9)
    holder.submit(next, own).result()  # its loop holds the slots now, until it ends
    try:
        waiting = g.stream(q, 20, chat=False)
        waiting.cancel()  # only marked: the wait must see it
        result = ThreadPoolExecutor(1).submit(drain, waiting).result(timeout=10)
        assert result.finish_reason == "cancelled" and result.token_ids == []
        assert not g.scheduler.waiting
    finally:
        holder.submit(own.close).result()
    assert g.generate(q, 20, chat=False).token_ids == g.generate(q, 20, chat=False, speculate=False).token_ids


def test_a_queued_request_read_behind_this_threads_own_loop_is_refused(tiny_generator):
    """Several streams may be open in one thread: one submitted while no slot was free to it yet, then a typical one
    whose own loop, once read, holds the slots until it ends. Reading the first meanwhile would wait for ever (only
    this thread can end the hold): refused, as reading a second stream of one's own loop is, and the typical stream
    reads on to what it gives alone."""
    g = tiny_generator
    p, q = random_prompts(2, seed=66)
    typical = dict(chat=False, temperature=0.8, seed=1, acceptance="typical", top_p=0.9)
    alone = g.generate(q, 12, **typical).token_ids
    wait_until_idle(g)
    outcome = []

    def read_both():
        queued = g.stream(p, 12, chat=False)  # waits for a slot: no round ran since
        own = g.stream(q, 12, **typical)
        first = next(own).token_ids  # its loop holds the slots now
        try:
            next(queued)
        except SpeccompileError as e:
            outcome.append(e)
        outcome.append(first + drain(own).token_ids)

    reader = threading.Thread(target=read_both, daemon=True)  # a wait for ever would outlive the test
    reader.start()
    reader.join(10)
    assert len(outcome) == 2 and "already generating" in str(outcome[0]) and outcome[1] == alone
    assert not g.scheduler.waiting and not any(g.scheduler.slots)
    assert g.generate(p, 12, chat=False).token_ids == g.generate(p, 12, chat=False, speculate=False).token_ids


def test_a_request_cancelled_before_its_wait_takes_nothing_and_leaves_the_others_alone(tiny_generator):
    """A request cancelled by the time it would wait for the Generator, or for the scheduler's slots, holds neither:
    the generation ahead keeps the Generator, and another caller's round keeps its slots (`driving` is theirs to
    end)."""
    from speccompile.runtime.streams import OwnLoop
    g = tiny_generator
    wait_until_idle(g)
    gone = OwnLoop()
    gone.cancel()
    ahead = ThreadPoolExecutor(1)
    ahead.submit(g._lock.acquire).result()  # the generation ahead holds the Generator
    try:
        with g._exclusive(gone) as held:
            assert held is False and g._owner is None
    finally:
        ahead.submit(g._lock.release).result()
    with g.scheduler.wake:
        g.scheduler.driving = True  # another caller's round is under way
    try:
        with g.scheduler.exclusive(gone) as held:
            assert held is False
        assert g.scheduler.driving and not g.scheduler.draining
    finally:
        with g.scheduler.wake:
            g.scheduler.driving = False
            g.scheduler.wake.notify_all()


def test_a_cancelled_queued_request_read_behind_this_threads_own_loop_ends_quietly(tiny_generator):
    """A queued request cancelled while this thread's own typical loop holds the slots has nothing left to wait
    for: read, it ends cancelled (as it would behind another's hold) instead of being refused as a wait for ever."""
    g = tiny_generator
    p, q = random_prompts(2, seed=67)
    wait_until_idle(g)
    outcome = []

    def read_both():
        queued = g.stream(p, 12, chat=False)  # waits for a slot: no round ran since
        own = g.stream(q, 12, chat=False, temperature=0.8, seed=1, acceptance="typical", top_p=0.9)
        next(own)  # its loop holds the slots now
        queued.cancel()
        try:
            outcome.append(drain(queued))
        except SpeccompileError as e:
            outcome.append(e)
        own.close()

    reader = threading.Thread(target=read_both, daemon=True)  # a wait for ever would outlive the test
    reader.start()
    reader.join(10)
    assert len(outcome) == 1 and not isinstance(outcome[0], Exception), outcome
    assert outcome[0].finish_reason == "cancelled" and outcome[0].token_ids == []
    assert not g.scheduler.waiting and not any(g.scheduler.slots)


def test_concurrency_figures_from_known_runs(monkeypatch):
    """On served runs of known (fake) rates and tokens: each round's ratio is its N-stream run over the sequential
    run beside it, the share of identical requests counts every request, the percentiles are the requests'."""
    from speccompile.bench import concurrency
    rounds = iter([(100.0, 150.0), (50.0, 120.0), (80.0, 100.0)])  # (sequential, 4 streams) tokens/s by round
    tokens = [[1, 2], [3, 4], [5, 6], [7, 8]]

    def serve(gen, ids, max_new_tokens, streams, drafter, tree):
        if max_new_tokens < 16:  # the warm-up
            return {}
        if streams == 0:
            serve.pair = next(rounds)
        out = [list(t) for t in tokens]
        if streams:
            out[3] = [7, 9]  # one request of four differs
        return {"tokens_per_second": serve.pair[streams > 0], "token_ids": out}
    monkeypatch.setattr(concurrency, "serve", serve)
    gen = type("Gen", (), {"scheduler": None, "generate": lambda *a, **k: None})()
    section = concurrency.measure_concurrency(gen, [{"ids": [1]}] * 4, 16, (4,), 4, "lookup", repeats=3)
    run = section["streams"]["4"]
    assert run["round_speedups"] == [1.5, 2.4, 1.25] and run["speedup_vs_sequential"] == 1.5
    assert run["identical"] is False and run["identical_share"] == 0.75


def test_the_concurrency_warm_up_serves_the_most_streams_before_any_timed_run(monkeypatch):
    """Every sequence slot's first passes run untimed: the warm-up serves the requests with the most streams asked
    for (a short run), before the first timed one."""
    from speccompile.bench import concurrency
    calls = []

    def serve(gen, ids, max_new_tokens, streams, drafter, tree):
        calls.append((max_new_tokens, streams))
        return {"tokens_per_second": 1.0, "token_ids": [[1]] * len(ids), "ttft_s": {}}
    monkeypatch.setattr(concurrency, "serve", serve)
    gen = type("Gen", (), {"scheduler": None, "generate": lambda *a, **k: None})()
    concurrency.measure_concurrency(gen, [{"ids": [1]}] * 4, 32, (1, 2, 4), 4, "lookup")
    assert calls[0] == (8, 4) and calls[1:] == [(32, 0), (32, 1), (32, 2), (32, 4)]


def test_concurrency_percentiles_and_time_per_output_token():
    """TTFT percentiles over the requests; time per output token counts the tokens after the first."""
    from speccompile.bench.concurrency import figures
    results = [{"token_ids": [0] * 5, "ttft_s": float(i), "total_s": i + 0.8} for i in range(101)]
    out = figures(results, 10.0)
    assert out["ttft_s"] == {"p50": 50.0, "p90": 90.0, "p99": 99.0}
    assert out["time_per_output_token_s"]["p50"] == pytest.approx(0.2)
    assert out["tokens_per_second"] == 505 / 10.0


def test_the_sequential_runs_prefill_share_is_its_requests_time_to_first_token(monkeypatch):
    """serve one after another: the share of its wall time before each request's first token, summed."""
    from types import SimpleNamespace

    from speccompile.bench import concurrency
    ticks = iter([10.0, 14.0])  # the run's start and end: 4 s
    monkeypatch.setattr(concurrency.time, "perf_counter", lambda: next(ticks))
    ttfts = iter([0.5, 0.25, 0.25])
    gen = SimpleNamespace(scheduler=None, generate=lambda *a, **k: SimpleNamespace(
        token_ids=[1, 2], stats={"ttft_s": next(ttfts), "total_s": 1.0}))
    out = concurrency.serve(gen, [[1], [2], [3]], 2, 0, None)
    assert out["wall_s"] == 4.0 and out["first_token_share"] == pytest.approx(0.25)


def test_the_sequential_runs_prefill_share_is_printed_beside_the_concurrency_ratios():
    """One after another, the time before each request's first token is its prompt's prefill: its share of the run
    bounds what sharing passes can gain, and the section says it (a result written before it was measured too)."""
    from speccompile.bench.concurrency import figures, format_concurrency
    seq = figures([{"token_ids": [0] * 8, "ttft_s": 0.25, "total_s": 1.0} for _ in range(4)], 5.0)
    seq["first_token_share"] = 0.2
    run = figures([{"token_ids": [0] * 8, "ttft_s": 0.5, "total_s": 1.0} for _ in range(4)], 2.5)
    run.update(speedup_vs_sequential=2.0, identical=True)
    section = {"requests": 4, "max_new_tokens": 8, "drafter": "lookup", "sequential": seq, "streams": {"4": run}}
    assert "one after another 6.4 tok/s, its prompts' prefill 20% of its time" in format_concurrency(section)
    del seq["first_token_share"]
    assert "prefill" not in format_concurrency(section).splitlines()[0]


def test_an_onnxruntime_without_batched_attention_runs_requests_one_at_a_time(tiny_bundle, monkeypatch):
    """onnxruntime before 1.32 has no GroupQueryAttention input for each sequence's query rows, which the batched
    graph binds: concurrent requests then run one after another (with a warning), never fail at their first
    shared pass."""
    from types import SimpleNamespace

    import onnxruntime as ort

    from speccompile.format import requirements
    from speccompile.runtime import kv_cache
    assert requirements.runs_batched_attention()  # this onnxruntime's, as setup.py requires

    def gqa(max_input):
        return lambda: [SimpleNamespace(name="GroupQueryAttention", domain="com.microsoft", max_input=max_input)]
    try:
        with monkeypatch.context() as m:
            for max_input in (16, 17):  # the schemas are read once a process: forgotten around each fake
                m.setattr(ort.capi.onnxruntime_pybind11_state, "get_all_operator_schema", gqa(max_input))
                requirements._operator_schemas.cache_clear()
                assert requirements.runs_batched_attention() == (max_input >= 17)
    finally:
        requirements._operator_schemas.cache_clear()  # the real schemas again for every later test
    monkeypatch.setattr(kv_cache, "runs_batched_attention", lambda: False)
    with pytest.warns(UserWarning, match="concurrent requests will run one after another"):
        gen = speccompile.load(tiny_bundle, threads=1)
    assert gen.scheduler is None
    prompts = ["the cat", "a dog ran"]
    alone = [gen.generate(p, 6, temperature=0).token_ids for p in prompts]
    assert [r.token_ids for r in gen.generate(prompts, 6, temperature=0)] == alone


def test_each_slot_drafts_from_its_own_state_and_a_reused_slot_from_none_left(tmp_path):
    """An MTP head keeps per-sequence state (the target's features, its own cache): each slot has its own head,
    reset when a request takes the slot. Four seeded top-p requests (their drafts decide their draws) take slots
    0-3 together, then again in reverse order, each in a slot another request left: tokens and drafting as alone."""
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    head = tmp_path / "head.safetensors"
    safetensors_numpy.save_file(tiny_mtp_head(load_checkpoint("tiny:llama").config), str(head))
    build_bundle("tiny:llama", str(tmp_path / "b"), drafts=[f"mtp:{head}"], max_seq_len=256, num_draft=3,
                 progress=quiet)
    g = speccompile.load(str(tmp_path / "b"), threads=1, context_cache=False)
    prompts, kw = random_prompts(4, seed=13), dict(temperature=3.0, top_p=0.95)

    def summary(result):
        return result.token_ids, result.stats["proposed"], result.stats["committed_per_pass"]
    solo = [summary(g.generate(p, 20, seed=i, **kw)) for i, p in enumerate(prompts)]
    assert all(s[1] for s in solo)  # each drafts: its draws follow the drafts' distributions, accepted or not
    for order in ([0, 1, 2, 3], [3, 2, 1, 0]):
        streams = {i: g.stream(prompts[i], 20, seed=i, **kw) for i in order}  # all submitted before a round runs
        got = {i: summary(drain(s)) for i, s in streams.items()}
        assert [got[i] for i in range(4)] == solo


def test_every_joining_prompt_runs_a_chunk_each_round(tiny_bundle):
    """Two long prompts join beside two decoding requests (chunks in passes of their own): each round runs one
    chunk of each, then the decode pass, so neither joining request waits for the other's whole prompt."""
    g = speccompile.load(tiny_bundle, threads=1, context_cache=False)
    g.scheduler.mix_prefill = False
    short = random_prompts(2, seed=22)
    rng = np.random.default_rng(4)
    long_prompts = [list(rng.integers(3, 384, 150)) for _ in range(2)]  # two prefill chunks each
    solo = [g.generate(p, 30, drafter="lookup").token_ids for p in short] + \
        [g.generate(p, 6).token_ids for p in long_prompts]
    busy = [g.stream(p, 30, drafter="lookup") for p in short]
    heads = [list(next(s).token_ids) for s in busy]  # slots 0 and 1 decoding
    g.scheduler.trace = trace = []
    late = [g.stream(p, 6) for p in long_prompts]  # slots 2 and 3, at the next round
    got = [h + [t for c in s for t in c.token_ids] for h, s in zip(heads, busy)]
    assert got + [drain(s).token_ids for s in late] == solo
    joining = [("prefill", (2,)), ("prefill", (3,))]
    assert trace[:6] == joining + [("decode", (0, 1))] + joining + [("decode", (0, 1))]


def test_a_plain_sampled_step_in_a_shared_pass_draws_at_its_position(tiny_generator):
    """Top-p, drawn on the host with the uniform of the token's position: a request without drafts, sharing passes,
    samples what it samples alone (a draw at another position would take another uniform)."""
    g = tiny_generator
    prompts, kw = random_prompts(3, seed=3), dict(temperature=5.0, top_p=0.95, speculate=False)
    alone = [g.generate(p, 16, seed=i, **kw).token_ids for i, p in enumerate(prompts)]
    assert alone[0] != g.generate(prompts[0], 16, seed=7, **kw).token_ids  # the draws decide the tokens
    shared = g.scheduler.shared_passes
    streams = [g.stream(p, 16, seed=i, **kw) for i, p in enumerate(prompts)]
    assert [drain(s).token_ids for s in streams] == alone
    assert g.scheduler.shared_passes > shared


def test_rows_between_noisy_slots_take_no_noise_left_from_an_earlier_pass(tiny_bundle):
    """sample_noise is one buffer over the passes: a greedy slot's rows between two noisy slots' are zeros, whatever
    an earlier pass, with more noisy rows, left there; its next_token is its logits' argmax."""
    m, be = batch_engine(tiny_bundle)
    assert be.takes_noise
    rng = np.random.default_rng(1)

    def loud(rows):  # noise far above the logits: any of it left in a row moves that row's argmax
        return [rng.normal(0, 1e3, be.vocab_size).astype(np.float32) for _ in range(rows)]
    prompts = [rng.integers(3, 300, 6) for _ in range(3)]
    be.run([SlotStep(b, p, 0, rows=np.arange(6), noise=loud(6)) for b, p in enumerate(prompts)])
    out = be.run([SlotStep(0, np.array([5]), 6, noise=loud(1)), SlotStep(1, np.array([7, 8, 9]), 6, rows=np.arange(3)),
                  SlotStep(2, np.array([4]), 6, noise=loud(1))])
    logits, argmax, _ = out[1]
    assert (argmax == logits.argmax(-1)).all()


def test_a_failed_list_frees_its_streams_while_its_error_is_kept(tiny_generator):
    """generate() over a list that fails (here its last prompt is too long) cancels the streams it had opened,
    though its caller keeps the exception, whose traceback holds them (a Future keeps it): they would wait in the
    queue and then decode for nobody."""
    g = tiny_generator
    p = random_prompts(1, seed=12)[0]
    wait_until_idle(g)
    with pytest.raises(SpeccompileError, match="does not fit") as kept:
        g.generate([p, p, list(range(3, 3 + g.max_seq_len))], 5)
    assert kept.value is not None and not g.scheduler.waiting and not any(g.scheduler.slots)


def test_a_sampled_prompt_riding_in_a_greedy_pass_draws_from_exact_logits(tiny_bundle, monkeypatch):
    """A top-p request's prompt chunk rides in a decode pass of a greedy request, whose rows would take the head
    screen's estimated logits: the pass returns float32 logits, since the request's first token is drawn from them
    (as alone)."""
    from speccompile.runtime.sampling import PositionDraws
    g = speccompile.load(tiny_bundle, threads=1, context_cache=False)
    drawn, token = [], PositionDraws.token
    monkeypatch.setattr(PositionDraws, "token",
                        lambda self, logits, *a: drawn.append(logits.copy()) or token(self, logits, *a))
    p, kw = random_prompts(2, seed=5), dict(temperature=5.0, top_p=0.95, seed=3)
    g.generate(p[1], 1, **kw)
    a = g.stream(p[0], 40)
    next(a)
    g.scheduler.trace = trace = []
    drain(g.stream(p[1], 1, **kw))
    a.close()
    assert trace[0] == ("decode", (0, 1)) and len(drawn) == 2  # its chunk rode in slot 0's decode pass
    np.testing.assert_allclose(drawn[1], drawn[0], rtol=0, atol=1e-4)


def test_requests_sharing_a_prompt_run_it_once(tiny_bundle):
    """Three requests of one long prompt (a request's n choices) and one under the same prefix join together: the
    first runs the prompt, the others wait for it and restore its blocks from the context cache, then run only what
    is left of their own. Every answer stays what the request gets alone."""
    g = speccompile.load(tiny_bundle, threads=1)
    g.scheduler.mix_prefill = False  # every chunk in a prefill pass, counted below
    alone = speccompile.load(tiny_bundle, threads=1, context_cache=False)
    rng = np.random.default_rng(8)
    prompt = [int(t) for t in rng.integers(3, 384, 150)]  # two prefill chunks
    other = prompt[:100] + [int(t) for t in rng.integers(3, 384, 20)]
    asks = [(prompt, {}), (prompt, {"temperature": 0.8, "seed": 3}), (prompt, {"drafter": "lookup"}), (other, {})]
    solo = [alone.generate(p, 12, **kw).token_ids for p, kw in asks]
    g.scheduler.trace = trace = []
    streams = [g.stream(p, 12, **kw) for p, kw in asks]  # queued from one thread: they join in one round
    results = [drain(s) for s in streams]
    assert [r.token_ids for r in results] == solo
    hits = [(r.stats["prompt_cache_hit_tokens"], r.stats["prompt_cache_miss_tokens"]) for r in results]
    assert hits == [(0, 150), (144, 6), (144, 6), (96, 24)]
    prefills = collections.Counter(slot for kind, slots in trace if kind == "prefill" for slot in slots)
    assert prefills == {0: 2, 1: 1, 2: 1, 3: 1}


def test_a_request_whose_leader_leaves_runs_its_own_prompt(tiny_bundle):
    """The request a joining one waits for is cancelled before its prompt is done: the waiting one runs its whole
    prompt itself (nothing of it was cached) and gets its own answer."""
    g = speccompile.load(tiny_bundle, threads=1)
    prompt = [int(t) for t in np.random.default_rng(9).integers(3, 384, 150)]
    solo = speccompile.load(tiny_bundle, threads=1, context_cache=False).generate(prompt, 8).token_ids
    first, second = g.stream(prompt, 8), g.stream(prompt, 8)
    g.scheduler.trace = trace = []
    prefill, waited = g.scheduler._prefill, []

    def prefill_then_cancel(s):
        prefill(s)
        if s.index == 0:
            waited.append(g.scheduler.slots[1].leader is s)
            first.cancel()
    g.scheduler._prefill = prefill_then_cancel
    result = drain(second)
    assert result.token_ids == solo
    assert (result.stats["prompt_cache_hit_tokens"], result.stats["prompt_cache_miss_tokens"]) == (0, 150)
    assert waited == [True]
    assert [slots for kind, slots in trace if kind == "prefill"] == [(0,), (1,), (1,)]


def test_a_short_prompt_does_not_wait_for_a_long_one_sharing_a_block(tiny_bundle):
    """A request whose prompt shares one block with a longer joining one's (two chat prompts under one system
    prompt) would save 16 tokens by waiting for 150: it runs its own prompt at once."""
    g = speccompile.load(tiny_bundle, threads=1)
    g.scheduler.mix_prefill = False
    rng = np.random.default_rng(10)
    long_prompt = [int(t) for t in rng.integers(3, 384, 150)]
    short = long_prompt[:20] + [int(t) for t in rng.integers(3, 384, 40)]
    solo = speccompile.load(tiny_bundle, threads=1, context_cache=False).generate(short, 6).token_ids
    g.scheduler.trace = trace = []
    streams = [g.stream(long_prompt, 6), g.stream(short, 6)]
    results = [drain(s) for s in streams]
    assert results[1].token_ids == solo
    assert (results[1].stats["prompt_cache_hit_tokens"], results[1].stats["prompt_cache_miss_tokens"]) == (0, 60)
    assert [slots for kind, slots in trace if kind == "prefill"][:2] == [(0,), (1,)]


@pytest.fixture(scope="module")
def kernel_generator(tmp_path_factory):
    """A tiny bundle on speccompile's attention kernel, whose shared passes pay for no slot's padding rows."""
    from speccompile.plugins import q4_matmul
    if q4_matmul.unavailable():
        pytest.skip(f"speccompile's kernels cannot run here: {q4_matmul.unavailable()}")
    out = str(tmp_path_factory.mktemp("kernel") / "b")
    build_bundle("tiny:llama", out, drafts=["lookup", "layerskip:2"], max_seq_len=256, attention="kernel",
                 kernels="speccompile", progress=lambda *a: None)
    return speccompile.load(out, threads=1, context_cache=False)


def test_over_the_kernel_joining_prompts_share_one_prefill_pass_and_ride_in_decode_passes(kernel_generator):
    """Four requests joining at once prefill in passes shared by all four (a chunk each, a long prompt's later
    chunks riding in the others' decode passes); a request joining while others decode rides in their pass. Every
    request gives its solo tokens."""
    g = kernel_generator
    assert g.scheduler.engine.padding_free
    prompts = random_prompts(3, seed=31) + [list(np.random.default_rng(4).integers(3, 380, 150))]  # two chunks
    solo = [g.generate(p, 24, drafter="lookup").token_ids for p in prompts]
    late = random_prompts(5, seed=32)[-1]
    solo_late = g.generate(late, 10, drafter="layerskip:2").token_ids
    g.scheduler.trace = trace = []
    try:
        streams = [g.stream(p, 24, drafter="lookup") for p in prompts]
        heads = [next(s).token_ids for s in streams]
        joined = g.stream(late, 10, drafter="layerskip:2")
        got = [h + [t for c in s for t in c.token_ids] for h, s in zip(heads, streams)]
        got_late = [t for c in joined for t in c.token_ids]
    finally:
        g.scheduler.trace = None
    assert got == solo and got_late == solo_late
    assert trace[0] == ("prefill", (0, 1, 2, 3))  # every first chunk in one pass
    assert ("decode", (0, 1, 2, 3)) in trace  # the long prompt's second chunk rode in the others' decode pass
    assert not any(e[0] == "prefill" for e in trace[1:])  # the late request's prompt rode in a decode pass too


def test_a_warm_up_keeps_nothing_and_changes_no_answer(tiny_bundle):
    """Generator.warm_up (a server's, before it serves) runs a prompt alone and one in every sequence slot, and
    leaves no trace: the context cache holds nothing of it, and answers are those of a generator never warmed."""
    import speccompile
    warmed, cold = speccompile.load(tiny_bundle, threads=1), speccompile.load(tiny_bundle, threads=1)
    cache = warmed.context_cache
    warmed.warm_up()
    assert warmed.target.passes > 0 and warmed.scheduler.shared_passes > 0  # alone, then every slot at once
    assert warmed.context_cache is cache and cache.nbytes == 0
    prompts = ["The quick brown fox", "Pack my box with five dozen"]
    assert [r.token_ids for r in warmed.generate(prompts, 12)] == [r.token_ids for r in cold.generate(prompts, 12)]
    assert warmed.generate(prompts[0], 12).token_ids == cold.generate(prompts[0], 12).token_ids
