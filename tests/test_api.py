"""The Python API: chunks with incremental text, stop strings, chat, lists of prompts, checked requests, calls
from several threads, and chat templates that cannot leave jinja2's sandbox."""
import hashlib
import importlib
import inspect
import json
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import speccompile
from speccompile.compile.presets import tiny_tokenizer_files
from speccompile.errors import BundleError, SpeccompileError
from speccompile.format.bundle import read_manifest
from speccompile.format.drafter_kinds import KINDS
from speccompile.runtime.generator import Generator
from speccompile.runtime import template_sandbox
from speccompile.runtime.request import LOAD_OPTIONS, prompt_ids
from speccompile.runtime.streams import drain
from speccompile.runtime.text_stream import TextStream
from speccompile.runtime.tokenizer import BundleTokenizer, ChatTemplateError, PrefixOffsetDecoder

from conftest import byte_fallback_tokenizer_files, random_prompts


def test_sampling_params_at_top_level(tiny_generator):
    params = speccompile.SamplingParams(temperature=1.2, top_k=5, seed=4)
    a = tiny_generator.generate("hello there", 12, params=params)
    b = tiny_generator.generate("hello there", 12, temperature=1.2, top_k=5, seed=4)
    assert a.token_ids == b.token_ids


def chunks_and_result(it) -> tuple[list, object]:
    """A stream's chunks and the result its StopIteration carries."""
    chunks = []
    while True:
        try:
            chunks.append(next(it))
        except StopIteration as stop:
            return chunks, stop.value


@pytest.mark.parametrize("drafter", ["lookup", "model"])
def test_stream_chunks_add_up_to_the_result(tiny_generator, drafter):
    g = tiny_generator
    for prompt in ["Translate this sentence", "hello", *random_prompts(3)]:
        chunks, res = chunks_and_result(g.stream(prompt, 40, drafter=drafter))
        assert "".join(c.text for c in chunks) == res.text == g.tokenizer.decode(res.token_ids)
        assert [t for c in chunks for t in c.token_ids] == res.token_ids
        assert len(chunks) < len(res.token_ids)  # passes committed several tokens


def test_text_is_decoded_incrementally(tiny_generator, monkeypatch):
    """The whole output is decoded at most once (at the end), not once per pass."""
    g = tiny_generator
    calls = []
    decode = g.tokenizer.decode
    monkeypatch.setattr(g.tokenizer, "decode", lambda ids: calls.append(len(ids)) or decode(ids))
    seen = []
    res = g.generate("hello", 40, drafter="lookup", on_text=seen.append)
    assert len(calls) <= 1 and "".join(seen) == res.text and res.stats["verify_steps"] > 3


def test_prefix_offset_decoder_matches_decode_stream(tiny_generator):
    """The fallback for a `tokenizers` without DecodeStream yields the same pieces."""
    tok = tiny_generator.tokenizer
    rng = np.random.default_rng(0)
    for _ in range(20):
        ids = [int(t) for t in rng.integers(0, tok.tok.get_vocab_size(), 30)]
        streams = (tok.decode_stream(), PrefixOffsetDecoder())
        pieces = [[d.step(tok.tok, t) for t in ids] for d in streams]
        assert pieces[0] == pieces[1]
        text = "".join(p or "" for p in pieces[1])
        assert tok.decode(ids).startswith(text)


def _stream_text(tok, ids):
    """The text a TextStream hands out token by token, and its final text."""
    ts, handed = TextStream(tok), []
    for t in ids:
        ts.add(t)
        handed.append(ts.certain()[0])
    final, rest, _ = ts.finish(ids)
    return "".join(handed) + rest, final


def _byte_fallback_tokenizer(tmp_path, monkeypatch, decoder: str):
    """The byte-fallback tokenizer, streaming through `decoder`, and its byte tokens' ids by byte."""
    for name, data in byte_fallback_tokenizer_files().items():
        (tmp_path / name).write_bytes(data)
    tok = BundleTokenizer(str(tmp_path))
    if decoder == "PrefixOffsetDecoder":
        monkeypatch.setattr(BundleTokenizer, "decode_stream", lambda self: PrefixOffsetDecoder())
    return tok, {b: tok.tok.token_to_id(f"<0x{b:02X}>") for b in range(256)}


@pytest.mark.parametrize("decoder", ["DecodeStream", "PrefixOffsetDecoder"])
def test_byte_runs_that_turn_invalid_keep_the_stream_whole(tmp_path, monkeypatch, decoder):
    """Byte fallback: "é" then a cut emoji then a word, or "'" then a stray continuation byte, decode at once as
    U+FFFD each, after their first bytes were handed out as characters. The stream goes on (tokenizers'
    DecodeStream raises an invalid prefix there), and its pieces add up to its final text."""
    tok, byte = _byte_fallback_tokenizer(tmp_path, monkeypatch, decoder)
    cut = [byte[0xC3], byte[0xA9], byte[0xF0], byte[0x9F]] + tok.encode(" Hello")
    stray = tok.encode("over the") + [byte[0x27], byte[0xB5], byte[0xA9]]
    for ids, starts in ((cut, "é"), (stray, "over the'")):
        assert not tok.decode(ids).startswith(starts)  # at once, they decode otherwise
        streamed, final = _stream_text(tok, ids)
        assert streamed == final and final.startswith(starts)
    assert _stream_text(tok, cut)[1].endswith("Hello")
    rng = np.random.default_rng(0)
    for _ in range(100):
        streamed, final = _stream_text(tok, [int(t) for t in rng.integers(3, 384, 30)])
        assert streamed == final


@pytest.mark.parametrize("decoder", ["DecodeStream", "PrefixOffsetDecoder"])
def test_bytes_that_turn_invalid_keep_the_text_after_them(tmp_path, monkeypatch, decoder):
    """Once byte tokens handed out as a character join later ones in a run that is not UTF-8, the text goes on as
    the tokens not handed out yet decode on their own: their bytes as U+FFFD each, and the word after them with
    its leading space (the stream did go on from the word alone: the bytes were lost, the space stripped)."""
    tok, byte = _byte_fallback_tokenizer(tmp_path, monkeypatch, decoder)
    handed = tok.encode("over the") + [byte[0x27]]
    for ids, out in (([byte[0xC3], byte[0xA9], byte[0xF0], byte[0x9F]] + tok.encode(" Hello"), 2),
                     (handed + [byte[0xB5], byte[0xA9]] + tok.encode(" lazy dog"), len(handed))):
        streamed, final = _stream_text(tok, ids)
        assert streamed == final == tok.decode(ids[:out]) + tok.decode(ids[out:])
        assert "\ufffd  " in final


def test_generate_with_a_byte_fallback_tokenizer(byte_fallback_bundle):
    """Sampled at a high temperature the tiny model emits varied byte tokens, runs that turn invalid among them."""
    g = speccompile.load(byte_fallback_bundle, threads=1)
    for seed in range(4):
        chunks, res = chunks_and_result(g.stream("Hello world", 40, chat=False, temperature=20.0, seed=seed))
        assert "".join(c.text for c in chunks) == res.text
        assert [t for c in chunks for t in c.token_ids] == res.token_ids


def test_text_without_the_chat_template_is_encoded_as_the_tokenizer_encodes_it(byte_fallback_bundle, tiny_generator):
    """With the special tokens its tokenizer adds to a text (BOS here), as transformers' tokenizer(text)."""
    g = speccompile.load(byte_fallback_bundle, threads=1)
    text = "Hello world. The quick"
    ids = g.tokenizer.encode(text, add_special_tokens=True)
    assert ids[0] == 1 and ids[1:] == g.tokenizer.encode(text)
    assert prompt_ids(g, text, False).tolist() == ids
    res = g.generate(text, 6, chat=False)
    assert res.token_ids == g.generate(ids, 6).token_ids and res.stats["prompt_tokens"] == len(ids)
    # token ids are the prompt as given; a tokenizer that adds nothing to a text is unchanged
    assert prompt_ids(g, ids[1:], False).tolist() == ids[1:]
    assert prompt_ids(tiny_generator, text, False).tolist() == tiny_generator.tokenizer.encode(text)


class _Pieces:
    """A tokenizer whose token i decodes to pieces[i] (None: a partial character, completed by the next)."""
    tok = None

    def __init__(self, pieces):
        self.pieces = pieces

    def decode_stream(self):
        pieces, held = self.pieces, []

        class Stream:
            def step(self, tok, t):
                held.append(t)
                if pieces[t] is None:
                    return None
                out = "".join(pieces[i] or "" for i in held)
                held.clear()
                return out
        return Stream()

    def decode(self, ids):
        return "".join(self.pieces[i] or "" for i in ids)


def test_stop_string_text_is_held_back_and_cut():
    pieces = ["Hello", " wor", "ld", " ST", "OP", " tail"]
    ts = TextStream(_Pieces(pieces), ("STOP",))
    assert [ts.add(0), ts.certain()] == [False, ("Hello", 1)]
    assert [ts.add(1), ts.add(2), ts.add(3)] == [False] * 3
    assert ts.certain() == (" world ", 2)  # "ST" could still become "STOP": held back, and its token
    assert ts.add(4) is True and ts.kept_tokens() == 3  # " ST" holds the stop's start: cut from there
    assert ts.finish([0, 1, 2]) == ("Hello world ", "", 0)
    # a held-back start that does not become a stop string is released
    ts = TextStream(_Pieces(["a S", "T", "x"]), ("STOP",))
    ts.add(0), ts.add(1)
    assert ts.certain() == ("a ", 0)
    ts.add(2)
    assert ts.certain() == ("STx", 3)
    # a partial character's token is handed out with the text that completes it
    ts = TextStream(_Pieces([None, "é", "!"]), ())
    assert ts.add(0) is False and ts.certain() == ("", 0)
    ts.add(1)
    assert ts.certain() == ("é", 2)


class _CountedStop(str):
    """A stop string that counts how often an end of the text is compared with its start."""
    compared = 0

    def startswith(self, prefix, *args):
        _CountedStop.compared += 1
        return super().startswith(prefix, *args)


def test_a_long_stop_string_is_compared_with_the_new_text_only():
    """Text already handed out cannot begin a stop string (it was held back if it could): each pass compares the
    text it adds, not the whole output up to a long stop string's length (a server's client sets stop strings)."""
    words = [f" w{i}" for i in range(400)]
    ts = TextStream(_Pieces(words), (_CountedStop("~" * 100_000),))
    for t in range(len(words)):
        ts.add(t)
        _CountedStop.compared = 0
        assert ts.certain() == (words[t], 1)
        assert _CountedStop.compared <= len(words[t]), (t, _CountedStop.compared)
    # a held-back start is still found, and released once it cannot become the stop string
    ts = TextStream(_Pieces(["held ~~", "~~", "x"]), ("~~~~~~~~~~END",))
    ts.add(0)
    assert ts.certain() == ("held ", 0)
    ts.add(1)
    assert ts.certain() == ("", 0)
    ts.add(2)
    assert ts.certain() == ("~~~~x", 3)


class _Replacing(_Pieces):
    """As _Pieces, but a partial character left at the end decodes as U+FFFD, as a real tokenizer's does."""

    def decode(self, ids):
        return "".join("\ufffd" if self.pieces[i] is None else self.pieces[i] for i in ids)


def test_a_stop_string_in_the_text_only_the_end_flushes_stops_there():
    """A stop string with U+FFFD: the incremental decoder holds a partial character back, and only the final
    decode shows it as U+FFFD; the output still ends where the stop string begins, its tokens with it."""
    ts, ids = TextStream(_Replacing(["ab", "c", None]), ("c\ufffd",)), [0, 1, 2]
    assert [ts.add(t) for t in ids] == [False] * 3 and ts.certain() == ("ab", 1)
    assert ts.finish(ids) == ("ab", "", 0) and ids == [0]
    ts, ids = TextStream(_Replacing(["ab", "c", None]), ("x",)), [0, 1, 2]  # no stop: the end flushed as it was
    [ts.add(t) for t in ids]
    assert ts.finish(ids) == ("abc\ufffd", "abc\ufffd", 3) and ids == [0, 1, 2]


def test_stop_string_cuts_text_and_token_ids(tiny_generator):
    g = tiny_generator
    full = g.generate("hello", 40, speculate=False)
    text, ids = full.text, full.token_ids
    ends = [len(g.tokenizer.decode(ids[:i + 1])) for i in range(len(ids))]
    # a stop string that begins inside a token, past the first few
    at = next(i for i in range(8, len(text) - 3) if i not in ends and text.index(text[i:i + 3]) == i)
    stop = text[at:at + 3]
    for kwargs in (dict(speculate=False), dict(drafter="lookup"), dict(drafter="model", tree="dynamic:8")):
        chunks = list(g.stream("hello", 40, stop=stop, **kwargs))
        res = g.generate("hello", 40, stop=[stop, "never appears"], **kwargs)
        # chunks only add text, so their sum ending before the stop means no chunk streamed part of it
        assert res.text == text[:at] == "".join(c.text for c in chunks)
        kept = sum(1 for e in ends if e <= at)
        assert res.token_ids == ids[:kept] == [t for c in chunks for t in c.token_ids]


def test_an_empty_stop_string_stops_nothing(tiny_generator):
    """"" is in every text: kept as a stop string, it would end every output before its first token."""
    g, prompt = tiny_generator, [1, 5, 9]
    full = g.generate(prompt, 12, chat=False)
    for stop in ("", ["", "never appears"]):
        res = g.generate(prompt, 12, chat=False, stop=stop)
        assert (res.token_ids, res.finish_reason) == (full.token_ids, "length")


def test_params_and_sampling_keywords_together_are_refused(tiny_generator):
    """params= replaces the keywords: one given beside it would be silently ignored."""
    params = speccompile.SamplingParams(temperature=0.7, seed=1)
    for kw in (dict(temperature=0.0), dict(seed=2), dict(top_k=5), dict(acceptance="exact")):
        with pytest.raises(SpeccompileError, match=f"params= replaces {next(iter(kw))}"):
            tiny_generator.generate([1, 5, 9], 4, params=params, **kw)


def test_a_stop_string_in_the_first_token_leaves_no_decode_speed(tiny_generator):
    """An output cut to nothing by a stop string counted -1 tokens after the first: a negative decode speed."""
    g, prompt = tiny_generator, [1, 5, 9]
    for kwargs in (dict(), dict(temperature=0.7, top_p=0.9, seed=1, acceptance="typical")):  # the scheduler, an own loop
        first = g.tokenizer.decode(g.generate(prompt, 4, chat=False, **kwargs).token_ids[:1])
        res = g.generate(prompt, 8, chat=False, stop=first[:1], **kwargs)
        assert res.token_ids == [] and res.text == "" and res.finish_reason == "stop"
        assert res.stats["new_tokens"] == 0 and res.stats["decode_tokens_per_second"] == 0.0


def test_the_result_says_why_the_output_ended(tiny_generator, monkeypatch):
    """finish_reason, as OpenAI and vLLM name it: "length" at max_new_tokens, "stop" at a stop string or an
    end-of-sequence token (the last one allowed too), "cancelled" after cancel()."""
    g, prompt = tiny_generator, [1, 5, 9]
    full = g.generate(prompt, 24, chat=False)
    assert full.finish_reason == "length" and len(full.token_ids) == 24
    stop = full.text[len(g.tokenizer.decode(full.token_ids[:8])):][:2]
    assert stop
    cut = g.generate(prompt, 24, chat=False, stop=stop)
    assert cut.finish_reason == "stop" and len(cut.token_ids) < 24
    eos = full.token_ids[6]
    monkeypatch.setattr(g.tokenizer, "eos_token_ids", frozenset({eos}))
    first = full.token_ids.index(eos)
    for max_new_tokens in (24, first + 1):
        ended = g.generate(prompt, max_new_tokens, chat=False)
        assert ended.token_ids == full.token_ids[:first + 1] and ended.finish_reason == "stop"
    # ignore_eos (vLLM's): on past it to max_new_tokens, speculating or not, submitted or in the caller's own loop
    for kw in (dict(), dict(speculate=False)):
        kept = g.generate(prompt, 24, chat=False, ignore_eos=True, **kw)
        assert kept.token_ids == full.token_ids and kept.finish_reason == "length", kw
    typical = g.generate(prompt, 24, chat=False, ignore_eos=True, temperature=1.5, seed=2, acceptance="typical")
    assert len(typical.token_ids) == 24 and typical.finish_reason == "length"
    assert g.generate(prompt, first + 1, chat=False, ignore_eos=True).finish_reason == "length"
    with pytest.raises(SpeccompileError, match="ignore_eos: expected True or False"):
        g.generate(prompt, 4, ignore_eos="no")
    # stop_token_ids (vLLM's): more tokens that end the output, each kept in it as an end-of-sequence token is;
    # ignore_eos leaves them in force
    other = full.token_ids[10]
    at = full.token_ids.index(other)
    for kw in (dict(), dict(speculate=False), dict(ignore_eos=True)):
        ended = g.generate(prompt, 24, chat=False, stop_token_ids=[other], **kw)
        expected = full.token_ids[:min(at, first if not kw.get("ignore_eos") else at) + 1]
        assert ended.token_ids == expected and ended.finish_reason == "stop", kw
    for bad in ([-1], [g.target.vocab_size], ["5"], [2.5], 7, "5"):
        with pytest.raises(SpeccompileError, match="stop_token_ids"):
            g.generate(prompt, 4, stop_token_ids=bad)
    monkeypatch.undo()
    stream = g.stream(prompt, 40, chat=False, speculate=False)
    next(stream)
    stream.cancel()
    assert drain(stream).finish_reason == "cancelled"


def test_options_it_does_not_take_are_refused_by_name(tiny_generator):
    """transformers' and vLLM's keywords get a hint (a TypeError too, as Python's refusal of them was)."""
    for kw, hint in ((dict(max_tokens=4), "'max_tokens' .use max_new_tokens"), (dict(do_sample=True), "temperature"),
                     (dict(repetition_penalty=1.2), "not supported"), (dict(nonsense=1), "'nonsense'"),
                     # transformers' way to say which tokens end the output: ignore_eos=True goes on past them
                     (dict(eos_token_id=None), "'eos_token_id' .use stop_token_ids .tokens that end the output "
                                               "besides the bundle's end-of-sequence tokens, which ignore_eos=True")):
        with pytest.raises(SpeccompileError, match=hint) as refused:
            tiny_generator.generate("hi", 4, **kw)
        assert isinstance(refused.value, TypeError)


def test_sampling_params_refuses_vllms_options_by_name():
    """vLLM's SamplingParams holds max_tokens, stop, n and ignore_eos: here each was the dataclass's bare TypeError
    (ignore_eos, taken by generate, stream and chat, was said to be not supported)."""
    for kw, hint in ((dict(max_tokens=64), "'max_tokens' .give generate, stream or chat max_new_tokens"),
                     (dict(stop=["\n"]), "'stop' .give it to generate"), (dict(n=2), "'n' .give generate a list"),
                     (dict(repetition_penalty=1.1), "'repetition_penalty' .not supported"),
                     (dict(ignore_eos=True), "'ignore_eos' .give it to generate, stream or chat"),
                     (dict(logprobs=2), "'logprobs' .give it to generate, stream or chat"),
                     (dict(stop_token_ids=[2]), "'stop_token_ids' .give it to generate, stream or chat")):
        with pytest.raises(SpeccompileError, match=hint) as refused:
            speccompile.SamplingParams(temperature=0.7, **kw)
        assert isinstance(refused.value, TypeError)
    assert speccompile.SamplingParams(0.7, 5, seed=1) == speccompile.SamplingParams(temperature=0.7, top_k=5, seed=1)


def test_vllms_call_shapes_point_to_this_apis(tiny_generator):
    """generate(prompt, SamplingParams) (vLLM's order) and a list of prompts to stream were refused with messages
    about --max-new-tokens and whole numbers."""
    g = tiny_generator
    with pytest.raises(SpeccompileError, match="max_new_tokens: got a SamplingParams; pass it as params="):
        g.generate("hello", speccompile.SamplingParams(temperature=0.7))
    for prompts in (["hello", "bye"], [[1, 5, 9], [3, 4]], [np.array([1, 5, 9])]):
        with pytest.raises(SpeccompileError, match="stream takes one prompt"):
            g.stream(prompts, 4)


def test_n_says_that_copies_of_a_prompt_with_a_seed_answer_alike(tiny_generator):
    """vLLM's n is refused with a hint to pass a list of prompts; with a seed every copy of a prompt draws from
    that seed alone, so the copies answer alike (not n samples): the hint says so."""
    g, prompt = tiny_generator, [5, 6, 7, 8]
    seeded = g.generate([prompt, prompt], 8, temperature=1e6, seed=3, chat=False)
    assert seeded[0].token_ids == seeded[1].token_ids
    unseeded = g.generate([prompt, prompt], 8, temperature=1e6, chat=False)  # near-uniform over the vocabulary
    assert unseeded[0].token_ids != unseeded[1].token_ids
    for name in ("n", "num_return_sequences"):
        with pytest.raises(SpeccompileError, match=f"'{name}' .pass a list of prompts.*with a seed"):
            g.generate(prompt, 8, temperature=1.0, seed=3, chat=False, **{name: 2})


def test_chat_renders_system_and_turns(tiny_generator):
    g = tiny_generator
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "hi there"}, {"role": "user", "content": "the quick fox"}]
    rendered = g.tokenizer.apply_chat_template(messages)
    assert all(m["content"] in rendered for m in messages) and rendered.endswith("<|im_start|>assistant\n")
    res = g.chat(messages, 12)
    assert res.token_ids == g.generate(g.tokenizer.encode(rendered), 12).token_ids
    assert res.stats["prompt_tokens"] == len(g.tokenizer.encode(rendered))
    for bad in ([], [{"role": "wizard", "content": "x"}], [{"role": "user"}], "hello"):
        with pytest.raises(SpeccompileError, match="chat"):
            g.chat(bad, 4)
    assert g.chat(messages, 12, chat=True).token_ids == res.token_ids
    with pytest.raises(SpeccompileError, match=r"generate\(\.\.\., chat=False\)"):  # not silently rendered anyway
        g.chat(messages, 4, chat=False)


def test_drafting_options_without_speculation_are_refused_by_name(tiny_generator):
    """speculate=False beside what shapes or accepts drafts: refused, naming them as the call spelled them."""
    with pytest.raises(SpeccompileError) as refused:
        tiny_generator.generate("hi", 2, speculate=False, tree="chain:2", temperature=0.7, acceptance="typical")
    assert str(refused.value) == "speculate=False drafts nothing: drop tree, acceptance='typical'"
    assert refused.value.cli_message() == "--no-speculate drafts nothing: drop --tree, --acceptance typical"


def test_a_refused_prompt_of_a_list_is_named_by_its_place(tiny_generator):
    """generate(list) names the prompt a refusal is about, keeping its kind (a context-length error stays one)."""
    from speccompile.errors import ContextLengthError
    g = tiny_generator
    with pytest.raises(ContextLengthError, match=r"^prompt 1 of the list: prompt of \d+ tokens does not fit"):
        g.generate(["hi", list(range(3, 3 + g.max_seq_len))], 4)
    with pytest.raises(SpeccompileError) as refused:
        g.generate(["hi", "there"], 0)
    assert str(refused.value) == "prompt 0 of the list: max_new_tokens=0: must be a whole number, at least 1"
    assert refused.value.cli_message().endswith("--max-new-tokens 0: must be a whole number, at least 1")
    assert g.generate(["hi"], 2)[0].token_ids  # nothing left held


def test_generate_takes_a_list_of_prompts(tiny_generator):
    g = tiny_generator
    prompts = ["hello", random_prompts(2)[1], "the quick fox"]
    results = g.generate(prompts, 10, drafter="lookup")
    assert [r.token_ids for r in results] == [g.generate(p, 10, drafter="lookup").token_ids for p in prompts]
    assert len(g.generate(random_prompts(1)[0], 5).token_ids) == 5  # a list of ints is one prompt


def test_requests_are_checked(tiny_generator):
    g = tiny_generator
    vocab = g.target.vocab_size
    for prompt, match in (([5, -1, 7], "out of range"), ([5, vocab], "out of range"), ([1.5, 2.0], "whole"),
                          (np.array([1.0, 2.0]), "whole"), ([], "empty"), (b"hello", "expected text")):
        with pytest.raises(SpeccompileError, match=match):
            g.generate(prompt, 4)
    for n in (0, -3, 2.5, True):  # named as Python spells it: the CLI's --max-new-tokens means nothing here
        with pytest.raises(SpeccompileError, match=rf"^max_new_tokens={re.escape(repr(n))}: must be a whole number"):
            g.generate("hello", n)
    for bad in (dict(temperature=float("nan")), dict(temperature=-1.0), dict(top_p=float("inf")),
                dict(top_k=-2), dict(seed=-5), dict(num_draft=2.5), dict(stop=[3])):
        with pytest.raises(SpeccompileError):
            g.generate("hello", 4, **bad)
    assert g.generate([vocab - 1, 0], 3).token_ids  # the edges of the range are fine


BAD_CALLS = {  # bad Python-API input: each a SpeccompileError (docs/guarantees.md), none a raw exception
    "temperature 10**400": dict(temperature=10 ** 400), "top_p 10**400": dict(top_p=10 ** 400),
    "temperature above the cap": dict(temperature=1e7, seed=1), "params a dict": dict(params={"temperature": 0.7}),
    "acceptance 5": dict(acceptance=5), "tree 5": dict(tree=5),
    "tree with a superscript": dict(tree="chain:3+lookup:²"),
    "drafter a list": dict(drafter=["lookup"]), "0-d prompt": dict(prompt=np.array(5)),
    "prompt of 0-d arrays": dict(prompt=[np.array(1), np.array(2)]), "on_text 5": dict(on_text=5),
    "max_new_tokens uint8 255": dict(max_new_tokens=np.uint8(255)),
    "max_new_tokens int64 max": dict(max_new_tokens=np.int64(2 ** 63 - 1)),
}
BAD_LOADS = {"cache_bytes -1": dict(cache_bytes=-1), "cache_bytes a string": dict(cache_bytes="1000"),
             "cache_bytes nan": dict(cache_bytes=float("nan")), "cache_bytes 1.5": dict(cache_bytes=1.5),
             "cache_dir a file": dict(cache_dir=__file__), "cache_dir unwritable": dict(cache_dir="/proc/speccompile"),
             "transformers' device_map": dict(device_map="auto"), "an unknown option": dict(nonsense=1),
             "context_cache a string": dict(context_cache="no"), "cache_dir a number": dict(cache_dir=5),
             "cache_dir bytes": dict(cache_dir=b"/tmp/speccompile-cache"), "cache_dir empty": dict(cache_dir=""),
             "cache_dir without a context cache": dict(context_cache=False, cache_dir="/tmp/speccompile-cache"),
             "cache_bytes without a context cache": dict(context_cache=False, cache_bytes=1 << 20)}


def test_messages_given_to_generate_point_to_chat(tiny_generator):
    """A conversation passed to generate() was refused as 'prompt token ids must be whole numbers'."""
    with pytest.raises(SpeccompileError, match=r"call chat\(messages\)"):
        tiny_generator.generate([{"role": "user", "content": "hello"}], 4)


@pytest.mark.parametrize("bad", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_bad_api_input_is_one_speccompile_error(tiny_generator, bad):
    g, kw = tiny_generator, dict(bad)
    with pytest.raises(SpeccompileError):
        g.generate(kw.pop("prompt", [1, 5, 9]), kw.pop("max_new_tokens", 4), **kw)
    assert len(g.generate([1, 5, 9], 4, chat=False).token_ids) == 4  # and the Generator serves on


@pytest.mark.parametrize("bad", BAD_LOADS.values(), ids=BAD_LOADS.keys())
def test_bad_load_options_are_one_speccompile_error(tiny_bundle, bad):
    with pytest.raises(SpeccompileError):
        speccompile.load(tiny_bundle, threads=1, verify=False, **bad)


def test_load_takes_a_folder_and_its_own_options(tiny_bundle):
    with pytest.raises(SpeccompileError, match="folder"):
        speccompile.load(None)
    with pytest.raises(SpeccompileError, match="verify: expected True or False"):
        speccompile.load(tiny_bundle, verify="no")
    with pytest.raises(TypeError, match="'device_map' .use device"):  # a TypeError still, as Python's own was
        speccompile.load(tiny_bundle, device_map="auto")
    # the options load checks against are those Generator.load and the Generator take
    taken = {*inspect.signature(Generator.load).parameters, *inspect.signature(Generator.__init__).parameters}
    assert set(LOAD_OPTIONS) == taken - {"cls", "self", "bundle_dir", "manifest", "cache"}


def test_a_fractional_temperature_samples_as_its_float(tiny_generator):
    from fractions import Fraction
    a = tiny_generator.generate([1, 5, 9], 6, temperature=Fraction(7, 10), seed=3)
    assert a.token_ids == tiny_generator.generate([1, 5, 9], 6, temperature=0.7, seed=3).token_ids


def test_threads_get_their_serial_tokens(tiny_generator):
    g = tiny_generator
    prompts = random_prompts(3)
    jobs = [(prompts[0], dict(drafter="model")), (prompts[1], dict(drafter="lookup", tree="dynamic:8")),
            (prompts[2], dict(drafter="layerskip:2", temperature=1.3, top_k=6, seed=7))]
    serial = [g.generate(p, 24, **kw).token_ids for p, kw in jobs]
    with ThreadPoolExecutor(3) as pool:
        for _ in range(3):
            assert list(pool.map(lambda job: g.generate(job[0], 24, **job[1]).token_ids, jobs)) == serial


def test_an_open_stream_and_a_second_generation_in_one_thread(tiny_generator):
    """With a batched target graph the two share passes (a bundle without one refuses: test_batching.py)."""
    g = tiny_generator
    alone = g.generate("hello", 8).token_ids
    first = g.stream("hello", 8)
    head = next(first).token_ids
    assert g.generate("hello", 4).token_ids == alone[:4]
    assert head + [t for chunk in first for t in chunk.token_ids] == alone


PAYLOADS = ["{{ cycler.__init__.__globals__.os.popen('touch PWNED').read() }}",
            "{{ ''.__class__.__mro__[1].__subclasses__() }}",
            "{% for m in messages %}{{ m.__class__.__init__.__globals__ }}{% endfor %}",
            "{{ self.__init__.__globals__.__builtins__.__import__('subprocess').run(['touch', 'PWNED']) }}",
            "{{ lipsum.__globals__['os'].system('touch PWNED') }}"]


@pytest.fixture
def tokenizer_dir(tmp_path):
    for name, data in tiny_tokenizer_files().items():
        (tmp_path / name).write_bytes(data)
    return tmp_path


@pytest.mark.parametrize("payload", PAYLOADS)
def test_chat_template_cannot_leave_the_sandbox(tokenizer_dir, payload, monkeypatch):
    monkeypatch.chdir(tokenizer_dir)
    cfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps(dict(cfg, chat_template=payload)))
    tok = BundleTokenizer(str(tokenizer_dir))
    with pytest.raises(ChatTemplateError, match="sandbox"):
        tok.encode_chat("hello")
    assert not os.path.exists("PWNED")


HUGE_TEMPLATES = {  # each would build gigabytes: refused before it runs, or stopped as it grows
    "+ doubling": "{% set a = 'x' * 4000000 %}{% set b = a + a %}{% set c = b + b %}{{ c|length }}",
    "~ doubling": "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "a filter's width": "{{ 'x'|center(20000000000) }}",
    "a method's width": "{{ 'x'.ljust(20000000000) }}",
    "a printf width": "{{ '%20000000000s' % 'x' }}",
    "a format width": "{{ '{:>20000000000}'.format('x') }}",
    "the format filter's width": "{{ '%20000000000s'|format('x') }}",
    "lipsum": "{{ lipsum(n=100000000) }}",
    "a power's digits": "{{ (10 ** 4096) ** 4096 > 0 }}",
    "the output": "{% set a = 'x' * 4000000 %}{% for i in range(5000) %}{{ a }}{% endfor %}",
    "a filter over many lines": "{% set a = 'a\\n' * 2000000 %}{{ a|indent(4000000)|length }}",
}


@pytest.mark.parametrize("template", HUGE_TEMPLATES.values(), ids=list(HUGE_TEMPLATES))
def test_a_chat_template_cannot_build_gigabytes(tokenizer_dir, template, monkeypatch):
    monkeypatch.setattr(template_sandbox, "TEMPLATE_MAX_BYTES", 1 << 28)
    cfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps(dict(cfg, chat_template=template)))
    with pytest.raises(ChatTemplateError, match="sandbox's limit|passed .* characters|too much memory"):
        BundleTokenizer(str(tokenizer_dir)).encode_chat("hello")


def test_a_special_token_that_is_no_text_is_a_bundle_error(tokenizer_dir):
    """A lone surrogate ("\\udcff" in the JSON) reached the tokenizer's lookup as a UnicodeEncodeError."""
    cfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps(dict(cfg, eos_token="\udcff")))
    with pytest.raises(BundleError, match="unreadable tokenizer files"):
        BundleTokenizer(str(tokenizer_dir))


def test_chat_template_helpers(tokenizer_dir):
    template = ("{% for m in messages %}{% if m['role'] == 'system' and not loop.first %}"
                "{{ raise_exception('system first') }}{% endif %}{{ m | tojson }}{% endfor %}{{ strftime_now('%Y') }}")
    cfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps(dict(cfg, chat_template=template)))
    tok = BundleTokenizer(str(tokenizer_dir))
    assert tok.apply_chat_template([{"role": "user", "content": "é"}]).startswith('{"role": "user", "content": "é"}')
    with pytest.raises(ChatTemplateError, match="system first"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}])


def test_special_tokens_from_special_tokens_map(tokenizer_dir):
    """Older checkpoints keep bos/eos in special_tokens_map.json: the template and the EOS ids see them. As in
    transformers, they count over tokenizer_config.json's, unless that lists added_tokens_decoder (newer saves)."""
    template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}"
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    (tokenizer_dir / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": {"content": "<|endoftext|>", "special": True}}))
    tok = BundleTokenizer(str(tokenizer_dir))
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}]) == "<|im_start|>Hi<|endoftext|>"
    assert tok.tok.token_to_id("<|endoftext|>") in tok.eos_token_ids
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    assert BundleTokenizer(str(tokenizer_dir)).eos_token == "<|endoftext|>"
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>",
                                                                     "added_tokens_decoder": {}}))
    tok = BundleTokenizer(str(tokenizer_dir))
    assert (tok.bos_token, tok.eos_token) == (None, "<|im_end|>")
    (tokenizer_dir / "special_tokens_map.json").write_text("[]")
    with pytest.raises(BundleError, match="special_tokens_map.json is not a JSON object"):
        BundleTokenizer(str(tokenizer_dir))


def test_chat_template_sees_what_transformers_passes(tokenizer_dir):
    """tools and documents (None without them) and every special token, as transformers' apply_chat_template."""
    template = ("{% if tools is not none %}{{ tools | tojson }}{% endif %}{% if documents is not none %}docs"
                "{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}|{{ pad_token }}|{{ unk_token }}")
    cfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps(dict(cfg, chat_template=template,
                                                                         pad_token="<|endoftext|>")))
    (tokenizer_dir / "special_tokens_map.json").write_text(json.dumps({"unk_token": "<|endoftext|>"}))
    tok = BundleTokenizer(str(tokenizer_dir))
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}]) == "Hi|<|endoftext|>|<|endoftext|>"


def test_several_named_chat_templates_apply_the_default(tokenizer_dir):
    """transformers saves several chat templates (Hermes 3's default and tool_use) as a list of {name, template};
    with none named it applies "default". Such a tokenizer once made its bundle unloadable."""
    cfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    named = [{"name": "tool_use", "template": "tools"},
             {"name": "default", "template": "{{ messages[0]['content'] }}!"}]
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps(dict(cfg, chat_template=named)))
    assert BundleTokenizer(str(tokenizer_dir)).apply_chat_template([{"role": "user", "content": "Hi"}]) == "Hi!"
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps(dict(cfg, chat_template=named[:1])))
    with pytest.raises(BundleError, match="none of them 'default'"):
        BundleTokenizer(str(tokenizer_dir))


def test_a_payload_in_a_bundle_runs_nothing(tiny_bundle, tmp_path, monkeypatch):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    cfg_path = bundle / "tokenizer" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_bytes(json.dumps(dict(cfg, chat_template=PAYLOADS[0])).encode())
    # the tamperer re-hashes the file: the manifest's hashes catch accidents, not tampering
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["tokenizer/tokenizer_config.json"] = {"sha256": hashlib.sha256(cfg_path.read_bytes()).hexdigest(),
                                                           "bytes": cfg_path.stat().st_size}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.chdir(tmp_path)
    g = speccompile.load(str(bundle), threads=1)
    with pytest.raises(ChatTemplateError):
        g.generate("hello", 4)
    assert not os.path.exists("PWNED")


def test_every_kind_has_a_runtime_half():
    for kind in KINDS.values():
        assert callable(importlib.import_module(kind.runtime_module).load), kind.name


def test_an_unknown_drafter_kind_is_one_bundle_error(tiny_bundle):
    manifest = read_manifest(tiny_bundle)
    manifest["drafters"][0] = dict(manifest["drafters"][0], kind="telepathy")
    with pytest.raises(BundleError, match="'telepathy', unknown to this runtime"):
        Generator(tiny_bundle, manifest, threads=1)
    del manifest["drafters"][0]["kind"]
    with pytest.raises(BundleError, match="unknown to this runtime"):
        Generator(tiny_bundle, manifest, threads=1)
