"""logprobs=K: each committed token's log-probability under the target (its float32 logits' log-softmax, before
any sampling setting) and the K likeliest tokens', whatever drafts the passes verified, alone or sharing passes;
asking for them changes no token."""
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import random_prompts
from speccompile.errors import SpeccompileError
from speccompile.format.bundle import read_manifest
from speccompile.runtime.engine import Engine
from speccompile.runtime.logprobs import Logprobs
from speccompile.runtime.streams import drain
from test_adaptive import synthetic

SETTINGS = {"greedy": dict(), "plain": dict(speculate=False), "lookup": dict(drafter="lookup"),
            "tree": dict(drafter="model", tree="dynamic:3+lookup:4"), "adaptive": dict(tree="adaptive+lookup:4"),
            "noise": dict(temperature=0.9, seed=3), "top-p": dict(temperature=2.0, top_p=0.9, seed=4),
            "min-p": dict(temperature=2.0, min_p=0.05, seed=5, drafter="model", tree="dynamic:4"),
            "typical": dict(temperature=1.5, seed=6, acceptance="typical")}


def reference(bundle, prompt, tokens) -> np.ndarray:
    """The target's log-softmax at each generated token's position, from one plain pass over the whole text."""
    e = Engine(bundle, read_manifest(bundle)["models"]["target"], threads=1)
    ids = np.array([*prompt, *tokens], np.int64)
    logits, _ = e.forward(ids, rows=np.arange(len(prompt) - 1, len(ids) - 1))
    x = logits.astype(np.float64)
    return x - (x.max(1, keepdims=True) + np.log(np.exp(x - x.max(1, keepdims=True)).sum(1, keepdims=True)))


def check(bundle, prompt, res, k):
    assert len(res.logprobs) == len(res.token_ids)
    ref = reference(bundle, prompt, res.token_ids)
    for j, (t, lp) in enumerate(zip(res.token_ids, res.logprobs)):
        assert lp.token == t and lp.logprob == pytest.approx(ref[j, t], abs=2e-4), j
        assert [tok for tok, _ in lp.top] == sorted(range(ref.shape[1]), key=lambda v: (-ref[j, v], v))[:k], j
        assert np.allclose([v for _, v in lp.top], np.sort(ref[j])[::-1][:k], atol=2e-4)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_each_tokens_logprob_is_the_targets_and_asking_changes_no_token(tiny_generator, tiny_bundle, name,
                                                                       monkeypatch):
    g, kw = tiny_generator, SETTINGS[name]
    monkeypatch.setattr(g, "_cost", synthetic(5.0, 0.05))  # adaptive drafting: rows cheap enough to draft
    for prompt in random_prompts(2, seed=9):
        res = g.generate(prompt, 16, chat=False, logprobs=3, **kw)
        if name != "typical":  # typical acceptance's tokens follow the drafts, which follow measured times
            assert res.token_ids == g.generate(prompt, 16, chat=False, **kw).token_ids
        check(tiny_bundle, prompt, res, 3)
        assert g.generate(prompt, 4, chat=False, **kw).logprobs is None  # not asked: none computed


def test_requests_sharing_passes_get_their_own_logprobs(tiny_generator, tiny_bundle):
    g = tiny_generator
    if g.scheduler is None:
        pytest.skip("without a scheduler no pass is shared")
    prompts, kws = random_prompts(4, seed=12), [dict(), dict(temperature=0.9, seed=1), dict(drafter="lookup"), {}]
    alone = [g.generate(p, 12, chat=False, **kw).token_ids for p, kw in zip(prompts, kws)]
    shared = g.scheduler.shared_passes
    streams = [g.stream(p, 12, chat=False, logprobs=2 if i != 3 else None, **kw)
               for i, (p, kw) in enumerate(zip(prompts, kws))]  # queued before any is read: they share passes
    results = [drain(s) for s in streams]
    assert g.scheduler.shared_passes > shared and [r.token_ids for r in results] == alone
    for p, r in zip(prompts[:3], results[:3]):
        check(tiny_bundle, p, r, 2)
    assert results[3].logprobs is None


def test_chunks_carry_their_tokens_logprobs(tiny_generator):
    g, prompt = tiny_generator, random_prompts(1, seed=2)[0]
    full = g.generate(prompt, 20, chat=False, logprobs=1)
    chunks = list(g.stream(prompt, 20, chat=False, logprobs=1))
    assert [lp for c in chunks for lp in c.logprobs] == full.logprobs
    assert all(len(c.logprobs) == len(c.token_ids) for c in chunks)
    stop = full.text[len(g.tokenizer.decode(full.token_ids[:6])):][:2]
    cut = g.generate(prompt, 20, chat=False, logprobs=0, stop=stop)  # cut at a stop string: as many as tokens
    assert len(cut.logprobs) == len(cut.token_ids) < 20 and all(lp.top == () for lp in cut.logprobs)


@pytest.mark.parametrize("bad", [-1, 21, 2.5, True, "3"])
def test_a_bad_logprobs_is_refused_by_name(tiny_generator, bad):
    with pytest.raises(SpeccompileError, match="logprobs"):
        tiny_generator.generate([1, 2, 3], 4, logprobs=bad)


def test_top_tokens_tie_to_the_lower_id():
    lp = Logprobs(3)
    lp.add(np.array([[0.0, 2.0, 1.0, 2.0, -1.0]]), [0], [4])
    assert [t for t, _ in lp.tokens[0].top] == [1, 3, 2]
    assert lp.tokens[0].logprob == pytest.approx(-1.0 - np.log(np.exp([0.0, 2.0, 1.0, 2.0, -1.0]).sum()))


def test_a_logprobs_requests_passes_are_priced_as_the_full_head_passes_they_run(tiny_generator, monkeypatch):
    """Adaptive drafting prices a greedy request's rows by the exact greedy head's pass; one that asks for logprobs
    reads the float32 head each pass, so it plans, and times its passes into the cost model, as a sampled one."""
    g = tiny_generator
    monkeypatch.setattr(g, "_cost", synthetic(5.0, 0.05))
    g.generate(random_prompts(1, seed=3)[0], 12, chat=False, tree="adaptive+lookup:4", logprobs=1)
    assert {mode for mode, _ in g._cost.observed} == {"sampled"}
    g.generate(random_prompts(1, seed=3)[0], 12, chat=False, tree="adaptive+lookup:4")
    assert {mode for mode, _ in g._cost.observed} == {"sampled", "greedy"}


def served_logprobs(g, text: str, chat: bool):
    """The server's logprobs (serve/app.py) of the tokens of `text`, as if the model had written them."""
    app = pytest.importorskip("speccompile.serve.app", reason="the serve extra is not installed")
    ids = g.tokenizer.encode(text)
    lp = Logprobs(2)
    lp.add(np.zeros((1, g.target.vocab_size)), [0] * len(ids), ids)
    return app._logprobs(SimpleNamespace(gen=g), lp.tokens, chat)


def test_chat_logprobs_bytes_join_into_the_texts_utf8(tiny_generator):
    """OpenAI's `bytes`: a token's own bytes, so that a character split over byte tokens (each alone decoding as
    U+FFFD) can be put back together: the tokens' bytes joined are the text's UTF-8."""
    text = "café über 日本"
    content = served_logprobs(tiny_generator, text, chat=True)["content"]
    assert b"".join(bytes(c["bytes"]) for c in content) == text.encode()
    assert all(bytes(t["bytes"]) != "\ufffd".encode() for c in content for t in c["top_logprobs"])


def test_completion_text_offsets_are_where_each_token_begins_in_the_text(tiny_generator):
    """text_offset: each token's start in the choice's text, after characters written with several byte tokens
    too (their lone decodings, U+FFFD each, are not the text's lengths)."""
    text = "café au lait, 日本 and more"
    ids = tiny_generator.tokenizer.encode(text)
    lp = served_logprobs(tiny_generator, text, chat=False)
    starts = [len(tiny_generator.tokenizer.decode(ids[:i]).rstrip("\ufffd")) for i in range(len(ids))]
    assert lp["text_offset"] == starts
    assert all(text.startswith(t, o) for t, o in zip(lp["tokens"], lp["text_offset"]) if "\ufffd" not in t)


def prompt_reference(bundle, prompt) -> np.ndarray:
    """The target's log-softmax at every prompt position but the last, from passes of 100 rows over the prompt."""
    e, ids, rows = Engine(bundle, read_manifest(bundle)["models"]["target"], threads=1, max_rows=100), prompt[:-1], []
    for start in range(0, len(ids), 100):
        logits, _ = e.forward(np.array(ids[start:start + 100], np.int64), rows=np.arange(len(ids[start:start + 100])))
        rows.append(logits.copy())
        e.cache.truncate(start + len(rows[-1]))
    x = np.concatenate(rows).astype(np.float64)
    return x - (x.max(1, keepdims=True) + np.log(np.exp(x - x.max(1, keepdims=True)).sum(1, keepdims=True)))


@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.9, seed=3), dict(drafter="lookup", temperature=1.5,
                                                                              top_p=0.9, seed=4)])
def test_prompt_logprobs_are_the_targets_and_asking_changes_no_token(tiny_generator, tiny_bundle, kw):
    """A prompt of three chunks of the rows a pass returns: each token after the first gets its log-probability
    given the tokens before it, and the K likeliest tokens'; the answer is the one asked without them, though none
    of the prompt came from the context cache."""
    g = tiny_generator
    prompt = [int(t) for t in np.random.default_rng(5).integers(3, 384, 2 * g.target.max_rows + 7)]
    plain = g.generate(prompt, 12, chat=False, **kw)  # and its blocks now cached
    res = g.generate(prompt, 12, chat=False, prompt_logprobs=4, **kw)
    assert res.token_ids == plain.token_ids and res.logprobs is None
    assert res.stats["prompt_cache_hit_tokens"] == 0
    assert res.stats["prefill_passes"] == 4  # 64, 64, 6 and 1 rows
    assert len(res.prompt_logprobs) == len(prompt) and res.prompt_logprobs[0] is None
    ref = prompt_reference(tiny_bundle, prompt)
    for j, lp in enumerate(res.prompt_logprobs[1:]):
        assert lp.token == prompt[j + 1] and lp.logprob == pytest.approx(ref[j, prompt[j + 1]], abs=2e-4), j
        assert [tok for tok, _ in lp.top] == sorted(range(ref.shape[1]), key=lambda v: (-ref[j, v], v))[:4], j
    assert g.generate(prompt[:1], 3, chat=False, prompt_logprobs=0).prompt_logprobs == [None]
    assert plain.prompt_logprobs is None


@pytest.mark.parametrize("bad", [-1, 21, 2.5, "3", True])
def test_a_bad_prompt_logprobs_is_refused_by_name(tiny_generator, bad):
    with pytest.raises(SpeccompileError, match="prompt_logprobs"):
        tiny_generator.generate([5, 6, 7], 4, chat=False, prompt_logprobs=bad)


def test_a_streams_first_chunk_carries_the_prompt_logprobs(tiny_generator):
    g, prompt = tiny_generator, random_prompts(3, seed=2)[2]
    chunks = list(g.stream(prompt, 10, chat=False, prompt_logprobs=2))
    assert chunks[0].prompt_logprobs == g.generate(prompt, 10, chat=False, prompt_logprobs=2).prompt_logprobs
    assert len(chunks[0].prompt_logprobs) == len(prompt)
    assert all(c.prompt_logprobs is None for c in chunks[1:])
