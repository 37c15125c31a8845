"""Drafters' batched forms (runtime/shared_catch_up.py): the slots' draft models, early exits and draft heads catch
up in one pass of it, and draft exactly what each would after a pass of its own graph."""
import types
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import speccompile
from speccompile.compile.driver import build_bundle
from speccompile.compile.presets import tiny_mtp_head
from speccompile.compile.sources import load_checkpoint
from speccompile.format.bundle import read_manifest
from speccompile.format.trees import TreeSpec
from speccompile.runtime.batch_engine import BatchEngine, SlotStep
from speccompile.runtime.engine import Engine
from speccompile.runtime.kv_cache import KVCache
from speccompile.runtime.sampling import SamplingParams
from speccompile.runtime.shared_catch_up import SharedCatchUp

from conftest import quiet, random_prompts
from test_mtp import medusa_heads


@pytest.fixture(scope="module")
def mtp_bundle(tmp_path_factory):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    d = tmp_path_factory.mktemp("shared_catch_up")
    head = d / "head.safetensors"
    safetensors_numpy.save_file(tiny_mtp_head(load_checkpoint("tiny:llama").config), str(head))
    safetensors_numpy.save_file(medusa_heads(load_checkpoint("tiny:llama").config), str(d / "medusa.safetensors"))
    build_bundle("tiny:llama", str(d / "b"), drafts=[f"mtp:{head}", "model:tiny:llama-draft", "layerskip:2",
                                                     f"medusa:{d / 'medusa.safetensors'}"],
                 max_seq_len=256, num_draft=3, progress=quiet)
    return str(d / "b")


def test_the_build_emits_each_drafters_batched_form(mtp_bundle, tmp_path):
    """Each drafter with a cache has its batched form; Medusa, which has none, takes several sequences' rows."""
    m = read_manifest(mtp_bundle)
    for d, kind in zip(m["drafters"], ("head_batch", "decoder_batch", "decoder_batch")):
        batch = m["models"][d["batch_model"]]
        assert batch["kind"] == kind and batch["max_batch"] == 4
        assert batch["weights"] == m["models"][d["model"]]["weights"]  # the drafter's own files: no copy
        assert ("hidden_in" in {i["name"] for i in batch["inputs"]}) == (kind == "head_batch")
    assert m["models"]["medusa"]["inputs"][0]["shape"][0] == "N" and "batch_model" not in m["drafters"][-1]
    build_bundle("tiny:llama", str(tmp_path / "one"), drafts=[f"mtp:{m['models']['mtp_head']['source']['path']}"],
                 max_seq_len=256, max_batch=1, progress=quiet)
    one = read_manifest(str(tmp_path / "one"))
    assert "batch_model" not in one["drafters"][-1] and "mtp_head_batch" not in one["models"]


def test_batched_head_rows_equal_the_heads_own_graph(mtp_bundle):
    """Three slots' catch-ups of different lengths (one after committed rows), a slot idle between them: logits,
    argmax, hidden states and cache rows equal the head's single-sequence graph's; the idle slot's rows untouched."""
    m = read_manifest(mtp_bundle)
    entry, kv = m["models"]["mtp_head_batch"], m["models"]["mtp_head_batch"]["kv_cache"]
    cache = KVCache(1, kv["num_kv_heads"], kv["max_seq_len"], kv["head_dim"], batch=4,
                    scratch=kv.get("scratch_slots", 0))
    be = BatchEngine(mtp_bundle, entry, cache, threads=1)
    rng = np.random.default_rng(1)
    H = entry["config"]["hidden_size"]
    solo = [Engine(mtp_bundle, m["models"]["mtp_head"], threads=1) for _ in range(4)]
    cache.key[:, 2, :, :6] = rng.standard_normal(cache.key[:, 2, :, :6].shape)
    idle_rows = cache.key[:, 2, :, :6].copy()
    lengths = {0: 0, 1: 0, 3: 0}
    for sizes in ((3, 7, 1), (2, 1, 5)):  # the second after the first's rows, committed
        steps = [SlotStep(b, rng.integers(3, 300, n), lengths[b], positions=np.arange(n) + lengths[b] + 1,
                          rows=np.arange(n), hidden_in=rng.standard_normal((n, H)).astype(np.float32))
                 for b, n in zip(lengths, sizes)]
        out = be.run(steps, idle={2: 6})
        for st in steps:
            e = solo[st.slot]
            e.cache.truncate(st.length)
            lengths[st.slot] = st.length + len(st.tokens)
            logits, argmax = e.forward(st.tokens, st.positions, rows=st.rows, hidden_in=st.hidden_in)
            np.testing.assert_allclose(out[st.slot][0], logits, rtol=0, atol=1e-5)
            assert (out[st.slot][1] == argmax).all()
            np.testing.assert_allclose(be.hidden[out[st.slot][2]], e.hidden[:len(st.tokens)], rtol=0, atol=1e-5)
            end = st.length + len(st.tokens)
            np.testing.assert_allclose(cache.key[:, st.slot, :, :end], e.cache.key[:, 0, :, :end], atol=1e-6)
    np.testing.assert_array_equal(cache.key[:, 2, :, :6], idle_rows)


def _slot(index, drafter, context):
    return types.SimpleNamespace(index=index, drafter=drafter, context=context, n=len(context))


@pytest.mark.parametrize("name", ["mtp", "model", "layerskip:2", "medusa"])
@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=1.0)])
def test_drafters_caught_up_together_draft_what_each_drafts_alone(mtp_bundle, name, params):
    """Slots 1 and 3 catch up in one shared pass, a third instance (slot 2) by its own graph: with the same
    context (and features, for a head), slot 1 proposes what slot 2 does (tokens, tree; scores and draft
    distributions to float32 rounding: a product over one row may round otherwise than over several), after a
    first catch-up over the whole context and after a second over the tokens since."""
    g = speccompile.load(mtp_bundle, threads=1)
    shared, alone, other = (g.fork_drafter(name, b) for b in (1, 2, 3))
    catch_ups = SharedCatchUp(g.drafter_context)
    rng = np.random.default_rng(3)
    context, elsewhere = rng.integers(3, 300, 60), rng.integers(3, 300, 60)
    features = rng.standard_normal((60, g.target.hidden.shape[1])).astype(np.float32)
    for d in (shared, alone, other):
        d.reset()
    for n, tree in ((31, TreeSpec("dynamic", 6, depth=3, branching=2)), (35, None)):
        if shared.wants_hidden:
            for d in (shared, alone, other):
                d.observe(0, features[:n - 1])
        catch_ups.catch_up([_slot(1, shared, context[:n]), _slot(3, other, elsewhere[:n])],
                           lambda _: {1: shared, 2: alone, 3: other})
        props = []
        for d in (shared, alone):
            draw = np.random.default_rng(7)
            props.append(d.propose(context[:n], 3, params, draw) if tree is None else
                         d.propose_tree(context[:n], tree, params, draw))
        a, b = props
        assert len(a.tokens) and (a.tokens == b.tokens).all()
        for x, y in ((a.parents, b.parents), (a.scores, b.scores), (a.q, b.q)):
            assert (x is None) == (y is None)
            if x is not None:
                np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    assert catch_ups.passes == 2


@pytest.mark.parametrize("name", ["mtp", "model", "layerskip:2", "medusa"])
def test_concurrent_requests_share_their_drafters_catch_up_passes(mtp_bundle, name):
    """Four concurrent greedy requests drafting with one drafter: some of its catch-ups ran shared, and every
    request's tokens are its solo run's."""
    g = speccompile.load(mtp_bundle, threads=1)
    prompts = random_prompts(4, seed=11)
    solo = [g.generate(p, 24, drafter=name, tree="dynamic:3").token_ids for p in prompts]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda p: g.generate(p, 24, drafter=name, tree="dynamic:3").token_ids, prompts))
    assert got == solo
    assert g.scheduler.catch_ups.passes > 0


@pytest.mark.parametrize("name", ["model", "layerskip:2"])
def test_a_draft_model_catches_up_in_one_pass_after_chunks_of_what_one_pass_cannot_take(mtp_bundle, name):
    """200 context tokens from an empty cache run as a chunk of 128 and one catch-up pass of the rest; after 100 of
    them drafted on, the other 100 as one catch-up pass: the same drafts either way."""
    g = speccompile.load(mtp_bundle, threads=1)
    context = np.random.default_rng(5).integers(3, 300, 200)
    params, tree = SamplingParams(), TreeSpec("dynamic", 6, depth=3, branching=2)
    for propose, catch_up_passes in ((lambda d, c: d.propose(c, 1, params, None), (2, 1)),  # a chain of one
                                     (lambda d, c: d.propose_tree(c, tree, params, None), None)):
        fresh, stepped = g.fork_drafter(name, 1), g.fork_drafter(name, 2)
        for d in (fresh, stepped):
            d.reset()
        propose(stepped, context[:100])
        props, passes = [], []
        for d in (fresh, stepped):
            before = d.engine.passes
            props.append(propose(d, context))
            passes.append(d.engine.passes - before)
        a, b = props
        assert (a.tokens == b.tokens).all()
        if a.parents is not None:
            assert (a.parents == b.parents).all()
            np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-6)
        if catch_up_passes:
            assert tuple(passes) == catch_up_passes


@pytest.mark.parametrize("name", ["mtp", "model"])
def test_concurrent_chats_restoring_their_drafters_state_equal_their_runs_alone(mtp_bundle, name):
    """Four chats of three turns at once, each turn restoring its history (and the drafter's state) from the
    context cache, their drafters catching up together: every turn's tokens, greedy and sampled, are the chat's
    alone without the cache."""
    g = speccompile.load(mtp_bundle, threads=1)
    alone = speccompile.load(mtp_bundle, threads=1, context_cache=False)
    openers = random_prompts(4, seed=21)

    def chat(gen, opener, kw):
        prompt, out = list(opener) * 2, []
        for turn in range(3):
            res = gen.generate(prompt, 16, drafter=name, tree="dynamic:3", **kw)
            out.append((res.token_ids, res.stats["prompt_cache_hit_tokens"]))
            prompt = prompt + res.token_ids + [10 + turn, 11, 12]
        return out

    for kw in ({}, dict(temperature=0.9, seed=4)):
        solo = [[t for t, _ in chat(alone, p, kw)] for p in openers]
        before = g.scheduler.catch_ups.passes
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda p: chat(g, p, kw), openers))
        assert [[t for t, _ in c] for c in together] == solo
        assert all(c[-1][1] > 0 for c in together)  # the later turns restored their history
        assert g.scheduler.catch_ups.passes > before
