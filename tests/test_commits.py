"""What a pass commits, and where the output ends: alone (the Generator's own loop, a bundle without a batched
graph) and in a scheduler slot. A pass that accepts several tokens never goes past max_new_tokens, an
end-of-sequence token inside an accepted draft ends the output there, the bonus token follows a wholly accepted
draft, and the stats count the tokens the passes committed. The draft model "model" is the target itself, so
every draft is accepted and a pass commits K + 1 tokens; "layerskip:2" drafts wrong now and then."""
import numpy as np
import pytest

import speccompile
from speccompile.compile.driver import build_bundle
from speccompile.runtime.acceptance import SpecDecodeStats
from speccompile.runtime.generator import drain
from speccompile.runtime.sampling import SamplingParams

from conftest import quiet, random_prompts

K = 4  # the draft model's chain: a pass commits K + 1 tokens


@pytest.fixture(scope="module", params=["own loop", "scheduler"])
def always_right(request, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("bundles") / "always-right")
    build_bundle("tiny:llama", out, drafts=["model:tiny:llama", "layerskip:2"], max_seq_len=128, num_draft=K,
                 max_batch=1 if request.param == "own loop" else 2, progress=quiet)
    g = speccompile.load(out, threads=1)
    assert (g.scheduler is None) == (request.param == "own loop")
    return g


def plain(g, prompt, max_new_tokens=40):
    return g.generate(prompt, max_new_tokens, chat=False, speculate=False).token_ids


def committed(stats) -> int:
    """The tokens the verify passes committed, by their per-pass counts, and the prefill's first token."""
    return 1 + sum(size * passes for size, passes in stats["committed_per_pass"].items())


def test_a_pass_of_several_tokens_stops_at_max_new_tokens(always_right):
    g, prompt = always_right, random_prompts(1)[0]
    ref = plain(g, prompt)
    for max_new_tokens in range(1, 2 * (K + 1) + 3):
        alone = g.generate(prompt, max_new_tokens, chat=False, drafter="model")
        # a stream read after a longer one has ended: with the scheduler its passes ran meanwhile, and end as alone
        late = g.stream(prompt, max_new_tokens, chat=False, drafter="model")
        drain(g.stream(prompt, max_new_tokens + K + 1, chat=False, drafter="model"))
        read_late = drain(late)
        for res in (alone, read_late):
            check_ended_at(res, ref, max_new_tokens)


def check_ended_at(res, ref, max_new_tokens):
    assert res.token_ids == ref[:max_new_tokens] and res.finish_reason == "length"
    # the last pass drafts only what could be kept: nothing committed past max_new_tokens
    assert committed(res.stats) == max_new_tokens, max_new_tokens
    passes = -(-(max_new_tokens - 1) // (K + 1))  # each a whole accepted draft and its bonus token
    assert res.stats["verify_steps"] == passes
    assert res.stats["mean_accepted_tokens"] == ((max_new_tokens - 1) / passes if passes else 1.0)
    assert res.stats["acceptance_rate_per_depth"] == [1.0] * min(K, max_new_tokens - 2 if passes else 0)


def test_the_stats_count_accepted_tokens_not_drafted_ones(always_right):
    g = always_right
    rejected = 0
    for prompt in random_prompts(4, seed=3):
        res = g.generate(prompt, 30, chat=False, drafter="layerskip:2")
        assert res.token_ids == plain(g, prompt, 30)
        assert committed(res.stats) == len(res.token_ids) == 30
        rejected += res.stats["proposed"] - (len(res.token_ids) - 1 - res.stats["verify_steps"])
    assert rejected > 0  # some drafts were rejected: the counts of accepted and drafted tokens differ


def test_the_loop_yields_max_new_tokens_and_no_more(always_right):
    """DecodeLoop.steps on its own: its passes add up to max_new_tokens, the last one cut to fit."""
    g = always_right
    if g.scheduler is not None:
        pytest.skip("the scheduler's slots run the loop's parts, not steps")
    prompt = np.asarray(random_prompts(1)[0], np.int64)
    for max_new_tokens in (1, 2, K + 1, K + 2, K + 3, 2 * (K + 1) + 1):
        stats = SpecDecodeStats("model", None, len(prompt))
        passes = list(g.steps(prompt, max_new_tokens, g.drafters["model"], K, SamplingParams(), stats))
        assert sum(map(len, passes)) == max_new_tokens
        assert [len(p) for p in passes[1:-1]] == [K + 1] * (len(passes) - 2)
    # a drafter that is wrong now and then: the accepted tokens per depth add up to those the passes accepted
    rejected = 0
    for prompt in random_prompts(4, seed=3):
        stats = SpecDecodeStats("layerskip:2", None, len(prompt))
        list(g.steps(np.asarray(prompt, np.int64), 30, g.drafters["layerskip:2"], K, SamplingParams(), stats))
        accepted = stats.committed - stats.verify_steps
        assert sum(taken for taken, _ in stats.accepted_per_depth) == accepted
        rejected += stats.proposed - accepted
    assert rejected > 0


def eos_inside_a_pass(g, max_new_tokens=40):
    """A prompt, its plain output and a token of it whose first place i is inside a verify pass, which ends in
    another token: the pass commits tokens after it. Passes commit K + 1 tokens after the prefill's first."""
    # the tiny model mostly repeats one token, which then ends the pass too: few of its outputs have one
    for prompt in (p for seed in (4, 0, 1, 2, 3, 5) for p in random_prompts(12, seed=seed)):
        ref = plain(g, prompt, max_new_tokens)
        for i, t in enumerate(ref[:-(K + 1)]):
            last = -(-i // (K + 1)) * (K + 1)  # the last token of i's pass, which must not be t as well
            if i >= 2 and i < last and t not in ref[:i] and ref[last] != t:
                return prompt, ref, i
    raise AssertionError("no prompt whose output has a new token inside a pass")


def test_an_end_of_sequence_token_inside_an_accepted_draft_ends_the_output(always_right, monkeypatch):
    g = always_right
    prompt, ref, i = eos_inside_a_pass(g)
    # several end-of-sequence ids (an eos list, an end of turn): any one ends the output
    never = min(t for t in range(g.target.vocab_size) if t not in ref)
    monkeypatch.setattr(g.tokenizer, "eos_token_ids", frozenset({never, ref[i]}))
    seen = []
    res = g.generate(prompt, 40, chat=False, drafter="model", on_text=seen.append)
    assert res.token_ids == ref[:i + 1] and res.finish_reason == "stop"
    assert res.stats["new_tokens"] == i + 1 and res.stats["verify_steps"] == -(-i // (K + 1))
    assert "".join(seen) == res.text and all(seen)  # the text told once, in pieces that are not empty
    chunks = list(g.stream(prompt, 40, chat=False, drafter="model"))
    assert [t for c in chunks for t in c.token_ids] == ref[:i + 1]
    kept = g.generate(prompt, 40, chat=False, drafter="model", ignore_eos=True)  # past it: the drafts' tokens too
    assert kept.token_ids == ref[:40] and kept.finish_reason == "length"


def test_a_request_read_late_ends_at_its_end_of_sequence_token(always_right, monkeypatch):
    """generate() over a list reads one stream after another while all of them decode: a request whose
    end-of-sequence token comes inside a pass ends at that pass (its slot freed), as alone, not at
    max_new_tokens when its stream is read at last."""
    g = always_right
    if g.scheduler is None:
        pytest.skip("without a scheduler each request runs when its stream is read")
    prompt, ref, i = eos_inside_a_pass(g)
    monkeypatch.setattr(g.tokenizer, "eos_token_ids", frozenset({ref[i]}))
    alone = g.generate(prompt, 40, chat=False, drafter="model")
    longer = next(p for p in random_prompts(12, seed=2) if ref[i] not in plain(g, p))
    got = g.generate([longer, prompt], 40, chat=False, drafter="model")[1]
    assert got.token_ids == alone.token_ids == ref[:i + 1]
    assert got.stats["verify_steps"] == alone.stats["verify_steps"]


def straddling_stop(g, prompt, max_new_tokens):
    """A stop string of two characters, the last of a verify pass's text and the first of the next one's, found
    nowhere before: (it, the tokens before that pass boundary); None if the output has no such place."""
    ref = g.generate(prompt, max_new_tokens, speculate=False).token_ids
    text = g.tokenizer.decode(ref)
    for boundary in range(K + 2, max_new_tokens, K + 1):  # the prefill's token, then K + 1 tokens a pass
        at = len(g.tokenizer.decode(ref[:boundary])) - 1
        stop = text[at:at + 2]
        if len(stop) == 2 and "\ufffd" not in stop and text.index(stop) == at:
            return stop, boundary
    return None


def test_a_stop_string_across_two_passes_ends_the_output_where_it_begins(always_right):
    """The tiny model's output mostly repeats itself: its chat answers change where a pass begins now and then."""
    g = always_right
    prompt, (stop, boundary) = next((p, s) for p in ("hello", "The quick brown fox", "Pack my box")
                                    if (s := straddling_stop(g, p, 60)))
    text = g.generate(prompt, 60, speculate=False).text
    alone = g.generate(prompt, 60, drafter="model", stop=stop)
    # read after a longer stream: a scheduler slot watches the stop string as its passes run, and ends there
    late = g.stream(prompt, 60, drafter="model", stop=stop)
    drain(g.stream(prompt, 60, drafter="model"))
    read_late = drain(late)
    for res in (alone, read_late):
        assert res.finish_reason == "stop" and res.text == text[:text.index(stop)]
        assert len(res.token_ids) < boundary and g.tokenizer.decode(res.token_ids) == res.text
        assert res.stats["verify_steps"] == -(-boundary // (K + 1))  # the pass that completes it is the last
