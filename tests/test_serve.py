"""`speccompile serve`: the OpenAI API over a tiny bundle, through the official `openai` client (sync and async,
plain and streamed) and plain HTTP. The server's greedy text is the Generator's (and `speccompile generate`'s) for
the same request; concurrent clients all get their own answers; bad input and overload get 4xx error objects;
/metrics counts acceptance; SIGTERM stops a server process with status 0; Ray Serve replicas answer the same."""
from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'speccompile[serve]'")
openai = pytest.importorskip("openai", reason="the official openai client is not installed (the test extra)")
import httpx  # noqa: E402  (installed with openai)

from speccompile.compile.driver import build_bundle  # noqa: E402
from speccompile.serve.app import make_state  # noqa: E402
from speccompile.serve.guards import body_limit  # noqa: E402
from speccompile.serve.options import ServeOptions, load_state  # noqa: E402
from speccompile.serve.server import uvicorn_server  # noqa: E402

MAX_SEQ_LEN = 256
SYSTEM = {"role": "system", "content": "Answer briefly."}
WORDS = "the cat sat on a mat while seven zebras argued about quantum soup and tea".split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def user(text: str) -> list[dict]:
    return [SYSTEM, {"role": "user", "content": text}]


def prompt_text(i: int) -> str:
    return " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(3 + i % 5))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("serve") / "tiny-serve")
    build_bundle("tiny:llama", out, drafts=["lookup", "layerskip:2"], max_seq_len=MAX_SEQ_LEN, num_draft=4,
                 progress=lambda *_: None)
    return out


class InProcessServer:
    """uvicorn serving a state in a thread of this process."""

    def __init__(self, state, **opts):
        self.state, self.port = state, free_port()
        self.server = uvicorn_server(state, ServeOptions(port=self.port, log_level="warning", **opts))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def state(bundle):
    return load_state(bundle, ServeOptions(threads=1, max_queue=32))


def end_round(sched):
    with sched.wake:
        sched.driving = False
        sched.wake.notify_all()


def wait_for(condition, failure: str, timeout_s: float = 60):
    """condition()'s first true value, polled."""
    deadline = time.time() + timeout_s
    while not (value := condition()):
        assert time.time() < deadline, failure
        time.sleep(0.02)
    return value


@pytest.fixture(autouse=True)
def no_round_left_under_way(request):
    """A test that fails while it holds the shared scheduler's round (sched.driving) would stall every later request
    until the suite's timeout: the round is ended here and the test fails by name."""
    yield
    if "state" in request.fixturenames:
        sched = request.getfixturevalue("state").gen.scheduler
        with sched.wake:  # a request of the test's still ending may hold a round a moment longer
            left = not sched.wake.wait_for(lambda: not sched.driving, 30)
        end_round(sched)
        assert not left, "the test left a round under way"


@pytest.fixture(scope="module")
def server(state):
    srv = InProcessServer(state)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny-serve"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_a_model_is_retrieved_and_health_answers_head(server, client):
    """The openai client's models.retrieve(); load balancers' HEAD probes."""
    card = client.models.retrieve("tiny-serve")
    assert (card.id, card.object, card.owned_by) == ("tiny-serve", "model", "speccompile")
    for other in ("gpt-5", "org/gpt-5"):
        with pytest.raises(openai.NotFoundError) as refused:
            client.models.retrieve(other)
        assert refused.value.body["code"] == "model_not_found" and other in refused.value.body["message"]
    head = httpx.head(server.url + "/health")
    assert head.status_code == 200 and head.content == b""


def test_chat_greedy_equals_the_generator_plain_and_streamed(state, client):
    ref = state.gen.chat(user("seven zebras"), 24, temperature=0)
    res = client.chat.completions.create(model="tiny-serve", messages=user("seven zebras"), max_tokens=24,
                                         temperature=0)
    assert res.choices[0].message.content == ref.text
    assert res.choices[0].finish_reason == ("length" if len(ref.token_ids) == 24 else "stop")
    u = res.usage.model_dump()
    assert (u["prompt_tokens"], u["completion_tokens"]) == (ref.stats["prompt_tokens"], len(ref.token_ids))
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert u["prompt_cache_hit_tokens"] + u["prompt_cache_miss_tokens"] == u["prompt_tokens"]
    assert u["prompt_cache_hit_tokens"] > 0  # the reference call just above left this prompt's blocks in the cache
    assert res.usage.prompt_tokens_details.cached_tokens == u["prompt_cache_hit_tokens"]  # OpenAI's own field
    assert u["mean_accepted_tokens"] == pytest.approx(ref.stats["mean_accepted_tokens"], abs=1e-3)
    assert u["verify_passes"] == ref.stats["verify_steps"]
    chunks = list(client.chat.completions.create(model="tiny-serve", messages=user("seven zebras"),
                                                 max_completion_tokens=24, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    assert chunks[-1].usage.completion_tokens == len(ref.token_ids)


def test_sampling_settings_and_stop_reach_the_generator(state, client):
    kw = dict(temperature=2.5, top_p=0.9, seed=11)
    ref = state.gen.chat(user("quantum soup"), 20, **kw)
    res = client.chat.completions.create(model="tiny-serve", messages=user("quantum soup"), max_tokens=20, **kw)
    assert res.choices[0].message.content == ref.text
    greedy = state.gen.chat(user("quantum soup"), 20, temperature=0).text
    stop = greedy[3:5] or greedy[:1]
    ref = state.gen.chat(user("quantum soup"), 20, temperature=0, stop=[stop])
    res = client.chat.completions.create(model="tiny-serve", messages=user("quantum soup"), max_tokens=20,
                                         temperature=0, stop=[stop])
    assert res.choices[0].message.content == ref.text and res.choices[0].finish_reason == "stop"


def test_min_p_reaches_the_generator(state, client, server):
    """min_p, an extension as vLLM's and llama-server's: at 1 only the likeliest token stays, so sampling answers
    greedy decoding's text; out of range, a 400 naming it."""
    kw = dict(temperature=2.5, seed=11)
    ref = state.gen.chat(user("quantum soup"), 20, min_p=0.2, **kw)
    res = client.chat.completions.create(model="tiny-serve", messages=user("quantum soup"), max_tokens=20,
                                         extra_body={"min_p": 0.2}, **kw)
    assert res.choices[0].message.content == ref.text
    greedy = state.gen.chat(user("quantum soup"), 20, temperature=0).text
    assert state.gen.chat(user("quantum soup"), 20, **kw).text != greedy  # sampled, it differs from greedy
    res = client.chat.completions.create(model="tiny-serve", messages=user("quantum soup"), max_tokens=20,
                                         extra_body={"min_p": 1.0}, **kw)
    assert res.choices[0].message.content == greedy
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": user("hi"), "min_p": 1.5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "min_p", r.text


def test_ignore_eos_reaches_the_generator(state, client, server, monkeypatch):
    """ignore_eos, an extension as vLLM's: the answer runs on past an end-of-sequence token to max_tokens."""
    full = state.gen.chat(user("seven zebras"), 16, temperature=0)
    eos = full.token_ids[3]
    monkeypatch.setattr(state.gen.tokenizer, "eos_token_ids", frozenset({eos}))
    body = dict(model="tiny-serve", messages=user("seven zebras"), max_tokens=16, temperature=0)
    cut = client.chat.completions.create(**body)
    assert cut.choices[0].finish_reason == "stop" and cut.usage.completion_tokens == full.token_ids.index(eos) + 1
    kept = client.chat.completions.create(**body, extra_body={"ignore_eos": True})
    assert kept.choices[0].finish_reason == "length" and kept.usage.completion_tokens == 16
    assert kept.choices[0].message.content == state.gen.chat(user("seven zebras"), 16, temperature=0,
                                                             ignore_eos=True).text
    other = full.token_ids[8]  # stop_token_ids, vLLM's too: an end of its own, whatever ignore_eos says
    ended = client.chat.completions.create(**body, extra_body={"ignore_eos": True, "stop_token_ids": [other]})
    assert ended.choices[0].finish_reason == "stop"
    assert ended.usage.completion_tokens == full.token_ids.index(other) + 1
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": user("hi"), "stop_token_ids": [10**9]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop_token_ids", r.text


def test_n_choices_each_sample_from_their_own_seed(state, client):
    """n choices: each a request of the runtime's own (sharing passes where the bundle batches), choice i sampled
    from seed + i, the prompt counted once in usage and the choices' tokens summed; greedy, every choice alike."""
    kw = dict(temperature=2.5, seed=7)
    refs = [state.gen.chat(user("seven zebras"), 12, temperature=2.5, seed=7 + i) for i in range(3)]
    res = client.chat.completions.create(model="tiny-serve", messages=user("seven zebras"), max_tokens=12, n=3, **kw)
    assert [c.index for c in res.choices] == [0, 1, 2]
    assert [c.message.content for c in res.choices] == [r.text for r in refs]
    assert len({r.text for r in refs}) > 1  # the seeds' answers differ, so a mixed-up or repeated choice would show
    assert [c.finish_reason for c in res.choices] == [r.finish_reason for r in refs]
    assert res.usage.prompt_tokens == refs[0].stats["prompt_tokens"]
    assert res.usage.completion_tokens == sum(len(r.token_ids) for r in refs)
    assert res.usage.verify_passes == sum(r.stats["verify_steps"] for r in refs)
    text = client.completions.create(model="tiny-serve", prompt="seven zebras", max_tokens=8, n=2, temperature=0)
    assert [c.index for c in text.choices] == [0, 1] and text.choices[0].text == text.choices[1].text


@pytest.mark.parametrize("chat", [True, False])
def test_n_choices_stream_each_with_its_index(state, client, chat):
    """Streamed, each chunk carries its choice's index: a choice's pieces add up to its plain answer, and each
    choice ends with its own finish_reason; the usage chunk sums the choices."""
    kw = dict(max_tokens=10, n=3, temperature=2.5, seed=21, stream=True, stream_options={"include_usage": True})
    if chat:
        refs = [state.gen.chat(user("quantum soup"), 10, temperature=2.5, seed=21 + i) for i in range(3)]
        chunks = list(client.chat.completions.create(model="tiny-serve", messages=user("quantum soup"), **kw))
        pieces = [(c.choices[0].index, c.choices[0].delta.content or "", c.choices[0].finish_reason)
                  for c in chunks if c.choices]
    else:
        refs = [state.gen.generate("quantum soup", 10, chat=False, temperature=2.5, seed=21 + i) for i in range(3)]
        chunks = list(client.completions.create(model="tiny-serve", prompt="quantum soup", **kw))
        pieces = [(c.choices[0].index, c.choices[0].text, c.choices[0].finish_reason) for c in chunks if c.choices]
    assert ["".join(t for i, t, _ in pieces if i == k) for k in range(3)] == [r.text for r in refs]
    assert [[f for i, _, f in pieces if i == k and f] for k in range(3)] == [[r.finish_reason] for r in refs]
    assert chunks[-1].usage.completion_tokens == sum(len(r.token_ids) for r in refs)


def test_typical_acceptance_reaches_the_generator(state, client):
    """The lossy, opt-in typical acceptance (an extension, as top_k) and its thresholds reach the generator: the
    server's text is the generator's under the same rule, which here differs from exact acceptance's; a threshold
    without the rule is refused, as it would do nothing."""
    kw = dict(temperature=2.0, seed=4)
    refs = {rule: state.gen.generate("owls debated", 32, chat=False, acceptance=rule, **kw).text
            for rule in ("exact", "typical:0.02,0.05")}
    assert refs["exact"] != refs["typical:0.02,0.05"]
    for rule, extra in (("exact", {}), ("typical:0.02,0.05", {"acceptance": "typical", "typical_epsilon": 0.02,
                                                            "typical_alpha": 0.05})):
        res = client.completions.create(model="tiny-serve", prompt="owls debated", max_tokens=32, extra_body=extra,
                                        **kw)
        assert res.choices[0].text == refs[rule], rule
    with pytest.raises(openai.BadRequestError, match="typical_alpha: only allowed with acceptance: typical"):
        client.completions.create(model="tiny-serve", prompt="owls", max_tokens=4, extra_body={"typical_alpha": 0.5})
    with pytest.raises(openai.BadRequestError, match="acceptance"):
        client.completions.create(model="tiny-serve", prompt="owls", max_tokens=4, extra_body={"acceptance": "fast"})


def test_top_k_and_a_single_stop_string_reach_the_generator(state, client):
    """top_k 1 at a high temperature is greedy (the same setting without it samples otherwise); a stop string sent
    bare is one stop string, not its characters; an empty one stops nothing."""
    sampled = dict(model="tiny-serve", prompt="zebras argued about", max_tokens=24, temperature=50.0, seed=3)
    greedy = state.gen.generate("zebras argued about", 24, temperature=0, chat=False).text
    unstopped = client.completions.create(**sampled).choices[0]
    text = unstopped.text
    assert text != greedy
    assert client.completions.create(**sampled, extra_body={"top_k": 1}).choices[0].text == greedy
    # a stop string one of whose characters comes earlier in the text: its characters alone would cut there
    at = next(i for i in range(1, len(text) - 1) if text[i] in text[:i] and text.index(text[i:i + 2]) == i)
    res = client.completions.create(**sampled, stop=text[at:at + 2])
    assert (res.choices[0].text, res.choices[0].finish_reason) == (text[:at], "stop")
    res = client.completions.create(**sampled, stop="")
    assert (res.choices[0].text, res.choices[0].finish_reason) == (text, unstopped.finish_reason)


def _sse_events(url: str, body: dict) -> list[dict]:
    with httpx.stream("POST", url, json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        lines = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


TOKEN_COUNTS = ("prompt_tokens", "completion_tokens", "total_tokens")


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_finish_reason_and_usage_are_the_generators_plain_and_streamed(state, server, path):
    """"length" at max_tokens, "stop" at a stop string, as the Generator says; a stream's last choice and its
    usage chunk say what the plain answer says."""
    chat = path == "/v1/chat/completions"
    prompt = {"messages": user("quantum soup")} if chat else {"prompt": "quantum soup"}
    ask = (lambda n, **kw: state.gen.chat(user("quantum soup"), n, temperature=0, **kw)) if chat else \
        (lambda n, **kw: state.gen.generate("quantum soup", n, temperature=0, chat=False, **kw))
    text = ask(12).text
    stop = text[4:6] or text[:1]
    for extra in ({"max_tokens": 5}, {"max_tokens": 12, "stop": [stop]}):
        ref = ask(extra["max_tokens"], stop=extra.get("stop", ()))
        assert ref.finish_reason == ("stop" if "stop" in extra else "length")
        body = {**prompt, "temperature": 0, **extra}
        plain = httpx.post(server.url + path, json=body).json()
        choice = plain["choices"][0]
        assert ((choice["message"]["content"] if chat else choice["text"]), choice["finish_reason"]) == \
            (ref.text, ref.finish_reason)
        prompt_tokens, completion_tokens = ref.stats["prompt_tokens"], len(ref.token_ids)
        counts = (prompt_tokens, completion_tokens, prompt_tokens + completion_tokens)
        assert tuple(plain["usage"][k] for k in TOKEN_COUNTS) == counts
        events = _sse_events(server.url + path, body)
        finishes = [c["choices"][0]["finish_reason"] for c in events if c["choices"]]
        assert finishes[-1] == ref.finish_reason and not any(finishes[:-1])
        assert events[-1]["choices"] == [] and tuple(events[-1]["usage"][k] for k in TOKEN_COUNTS) == counts


def test_a_developer_message_and_text_parts_reach_the_template_as_system_and_text(state, server):
    """OpenAI's "developer" is the system role; a message's text parts are its text, one part a line (as vLLM joins them)."""
    url, answer = server.url + "/v1/chat/completions", {"max_tokens": 6, "temperature": 0}
    as_system = [SYSTEM, {"role": "user", "content": "tea\nand soup"}]
    ref = state.gen.chat(as_system, 6, temperature=0)
    parts = [{"type": "text", "text": "tea"}, {"type": "text", "text": "and soup"}]
    for messages in ([{**SYSTEM, "role": "developer"}, {"role": "user", "content": "tea\nand soup"}],
                     [SYSTEM, {"role": "user", "content": parts}]):
        r = httpx.post(url, json={"messages": messages, **answer}).json()
        assert r["choices"][0]["message"]["content"] == ref.text, messages
        assert r["usage"]["prompt_tokens"] == ref.stats["prompt_tokens"], messages


def test_max_completion_tokens_wins_over_max_tokens(client):
    """As OpenAI's and vLLM's: max_tokens is its deprecated name."""
    res = client.chat.completions.create(model="tiny-serve", messages=user("tea"), temperature=0, max_tokens=9,
                                         max_completion_tokens=3)
    assert (res.usage.completion_tokens, res.choices[0].finish_reason) == (3, "length")


def test_greedy_equals_speccompile_generate(bundle, client):
    from click.testing import CliRunner

    from speccompile.cli import main
    out = CliRunner().invoke(main, ["generate", bundle, "the cat sat", "--max-new-tokens", "20", "--json",
                                    "--threads", "1"])
    assert out.exit_code == 0, out.output
    text = json.loads(out.output)["text"]
    res = client.chat.completions.create(model="tiny-serve", messages=[{"role": "user", "content": "the cat sat"}],
                                         max_tokens=20, temperature=0)
    assert res.choices[0].message.content == text
    streamed = client.chat.completions.create(model="tiny-serve", max_tokens=20, temperature=0, stream=True,
                                              messages=[{"role": "user", "content": "the cat sat"}])
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text


def test_completions_equal_generate_without_chat_template(state, client):
    ref = state.gen.generate("zebras argued about", 16, temperature=0, chat=False)
    res = client.completions.create(model="tiny-serve", prompt="zebras argued about", max_tokens=16, temperature=0)
    assert res.choices[0].text == ref.text and res.usage.completion_tokens == len(ref.token_ids)
    streamed = client.completions.create(model="tiny-serve", prompt="zebras argued about", max_tokens=16,
                                         temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == ref.text
    listed = client.completions.create(model="tiny-serve", prompt=["zebras argued about"], max_tokens=16,
                                       temperature=0)  # a list of one prompt, as some clients send
    assert listed.choices[0].text == ref.text


def test_completions_with_a_byte_fallback_tokenizer(byte_fallback_bundle):
    """A text prompt gets the BOS its tokenizer adds (as vLLM's completions); a sampled answer whose byte tokens
    turn invalid streams whole."""
    import speccompile
    gen = speccompile.load(byte_fallback_bundle, threads=1)
    srv = InProcessServer(make_state(gen, "tiny-byte-fallback"))
    try:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        res = c.completions.create(model="tiny-byte-fallback", prompt="Hello world", max_tokens=8, temperature=0)
        assert res.usage.prompt_tokens == len(gen.tokenizer.encode("Hello world", add_special_tokens=True))
        assert res.choices[0].text == gen.generate("Hello world", 8, temperature=0, chat=False).text
        sampled = dict(model="tiny-byte-fallback", prompt="Hello world", max_tokens=40, temperature=20.0, seed=0)
        ref = c.completions.create(**sampled).choices[0].text
        assert "".join(x.choices[0].text for x in c.completions.create(stream=True, **sampled) if x.choices) == ref
    finally:
        srv.stop()


def test_async_client_plain_and_streamed(state, server):
    ref = state.gen.chat(user("a mat"), 16, temperature=0).text

    async def run():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as aclient:
            plain = await aclient.chat.completions.create(model="tiny-serve", messages=user("a mat"), max_tokens=16,
                                                          temperature=0)
            stream = await aclient.chat.completions.create(model="tiny-serve", messages=user("a mat"),
                                                           max_tokens=16, temperature=0, stream=True)
            parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
            return plain.choices[0].message.content, "".join(parts)

    assert asyncio.run(run()) == (ref, ref)


def test_plain_http_and_server_sent_events(state, server):
    ref = state.gen.chat(user("tea"), 12, temperature=0).text
    body = {"model": "tiny-serve", "messages": user("tea"), "max_tokens": 12, "temperature": 0}
    r = httpx.post(server.url + "/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == ref
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(x) for x in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == ref
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_every_chunk_of_a_stream_has_the_same_created(server, monkeypatch):
    """OpenAI's chunks of one stream share one `created`: the clock read once per stream, not per chunk (here a
    clock a second later at every read)."""
    from speccompile.serve import protocol
    clock = iter(range(1_700_000_000, 1_800_000_000))
    monkeypatch.setattr(protocol, "now", lambda: next(clock))
    for path, body in (("/v1/chat/completions", {"messages": user("tea")}), ("/v1/completions", {"prompt": "tea"})):
        body = {**body, "max_tokens": 12, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", server.url + path, json=body) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        assert len(chunks) >= 3 and len({c["created"] for c in chunks}) == 1, (path, chunks)


def test_concurrent_clients_each_get_their_own_answer(state, server):
    """16 clients x 4 requests at once: none lost, each greedy answer the one the same request gets alone."""
    clients, per_client, n = 16, 4, 12
    requests = [(c, r, prompt_text(c * per_client + r)) for c in range(clients) for r in range(per_client)]
    alone = {p: state.gen.chat(user(p), n, temperature=0).text for _, _, p in requests}

    async def one_client(aclient, c):
        out = []
        for _, r, p in (q for q in requests if q[0] == c):
            if r % 2:
                stream = await aclient.chat.completions.create(model="tiny-serve", messages=user(p), max_tokens=n,
                                                               temperature=0, stream=True)
                out.append((p, "".join([x.choices[0].delta.content or "" async for x in stream if x.choices])))
            else:
                res = await aclient.chat.completions.create(model="tiny-serve", messages=user(p), max_tokens=n,
                                                            temperature=0)
                out.append((p, res.choices[0].message.content))
        return out

    async def run():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                                      timeout=120) as aclient:
            return await asyncio.gather(*(one_client(aclient, c) for c in range(clients)))

    answers = [a for per in asyncio.run(run()) for a in per]
    assert len(answers) == clients * per_client
    assert all(text == alone[p] for p, text in answers)
    assert len(set(alone.values())) > 1  # the prompts' answers differ, so a mixed-up answer would show


ERRORS = [  # (body or raw bytes, status, a word the message holds)
    (b"{not json", 400, "JSON"),
    (b"[1, 2]", 400, "JSON object"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2.5}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [], "logit_bias": {"1": 5}}, 400, "tools, logit_bias"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 129}, 400, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 33}, 400, "n: at most 32 choices"),  # --max-queue 32
    ({"messages": [{"role": "user", "content": "hi"}], "n": 0}, 400, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": [1]}, 400, "stop.0: "),
    # a value outside a union is reported by the branch its type matched, not by the first branch it is not
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a"] * 17}, 400, "stop: List should have at most 16"),
    ({"messages": [{"role": "user", "content": [{"type": "image"}]}]}, 400, "messages.0.content.0.type"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages.0.content.0"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ({"model": "gpt-5", "messages": [{"role": "user", "content": "hi"}]}, 404, "gpt-5"),
    ({"messages": [{"role": "user", "content": "hi " * 400}]}, 400, str(MAX_SEQ_LEN)),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10_000}, 400, str(MAX_SEQ_LEN)),
    ({"messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": True}}, 400,
     "stream_options: only allowed with stream: true"),
]


@pytest.mark.parametrize("body,status,word", ERRORS, ids=[f"{i}-{e[1]}" for i, e in enumerate(ERRORS)])
def test_bad_requests_get_openai_error_objects(server, body, status, word):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else \
        {"json": body}
    r = httpx.post(server.url + "/v1/chat/completions", **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert word in err["message"] and err["type"] and "Traceback" not in r.text


def test_a_runtime_refusal_names_the_field_at_fault(server):
    """A value the request model passes but the runtime refuses (a temperature above SamplingParams' cap): a 400
    whose `param` is the field, as pydantic's refusals name theirs."""
    r = httpx.post(server.url + "/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": "hi"}], "temperature": 1e7})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "temperature" and "temperature must be a number" in err["message"], err


def test_a_refusals_param_is_the_first_request_field_it_names():
    """A refusal may name an option the request has no field for (max_new_tokens is the request's max_tokens):
    param is the first one it does have, and none where it names no field."""
    from speccompile.errors import SpeccompileError, given, option
    from speccompile.serve.api_errors import from_runtime
    e = SpeccompileError(f"{given('num_draft', 3)} with {option('top_p')}, {option('seed')}: bad")
    assert from_runtime(e).param == "top_p"
    assert from_runtime(SpeccompileError(f"{option('num_draft')}: bad")).param is None


def test_a_body_without_the_json_content_type_is_refused_saying_so(server):
    """`curl -d '{...}'` sends a JSON object as application/x-www-form-urlencoded, which is not parsed: the error
    names the Content-Type to send, not that the body is no JSON object."""
    body = json.dumps({"prompt": "tea", "max_tokens": 2})
    for content_type in ("application/x-www-form-urlencoded", "text/plain", None):
        headers = {"content-type": content_type} if content_type else {}
        r = httpx.post(server.url + "/v1/completions", content=body, headers=headers)
        assert r.status_code == 400 and "Content-Type: application/json" in r.json()["error"]["message"], r.text
    ok = httpx.post(server.url + "/v1/completions", content=body,
                    headers={"content-type": "application/json; charset=utf-8"})
    assert ok.status_code == 200, ok.text


def test_completion_prompt_errors(server):
    def post(path, body):  # json.dumps escapes a lone surrogate (valid JSON), which httpx's json= cannot encode
        return httpx.post(server.url + path, content=json.dumps(body), headers={"content-type": "application/json"})
    for prompt, word in (([], "empty prompt"), ([10**6], "out of range"), ([2**63], "out of range"),
                         ([10**30], "out of range"), (["a", "b"], "prompt: List should have at most 1 item"), ("hi \ud83d", "not valid Unicode")):
        r = post("/v1/completions", {"prompt": prompt})
        assert r.status_code == 400 and word in r.json()["error"]["message"], r.text
    r = post("/v1/chat/completions", {"messages": user("half an emoji \ud83d")})
    assert r.status_code == 400 and "not valid Unicode" in r.json()["error"]["message"], r.text


def test_the_context_length_error_names_what_was_asked_for(server):
    """A completion without max_tokens gets OpenAI's default of 16, which the error says: the client asked for
    none. A limit the client sent is named by its field."""
    prompt = [5] * (MAX_SEQ_LEN - 8)
    cases = (("/v1/completions", {"prompt": prompt}, "+ 16 tokens to generate (max_tokens was not sent"),
             ("/v1/completions", {"prompt": prompt, "max_tokens": 9}, "+ 9 tokens asked for (max_tokens)"),
             ("/v1/chat/completions", {"messages": user("tea"), "max_completion_tokens": MAX_SEQ_LEN},
              f"+ {MAX_SEQ_LEN} tokens asked for (max_completion_tokens)"))
    for path, body, words in cases:
        r = httpx.post(server.url + path, json=body)
        assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
    assert httpx.post(server.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 8}).status_code == 200


def test_what_clients_send_by_default_is_accepted(server, client):
    """The official client sends 0.0 penalties; vLLM's clients top_k -1 (off) and response_format text; a single
    stop string may be longer than the 16 a list may hold."""
    body = {"messages": user("tea"), "max_tokens": 4, "temperature": 0}
    plain = httpx.post(server.url + "/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    for extra in ({"presence_penalty": 0.0, "frequency_penalty": 0.0}, {"top_k": -1},
                  {"response_format": {"type": "text"}}, {"stop": "### END OF THE ANSWER, AT LAST"},
                  {"logprobs": False}):
        r = httpx.post(server.url + "/v1/chat/completions", json={**body, **extra})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == plain, (extra, r.text)
    res = client.chat.completions.create(model="tiny-serve", presence_penalty=0.0, frequency_penalty=0.0, **body)
    assert res.choices[0].message.content == plain
    for extra in ({"presence_penalty": 0.5}, {"presence_penalty": True}, {"top_k": -2},
                  {"response_format": {"type": "json_object"}}, {"logprobs": 1}, {"echo": True}):
        assert httpx.post(server.url + "/v1/chat/completions", json={**body, **extra}).status_code == 400, extra


def test_an_answer_dumped_by_the_openai_client_is_taken_back_as_a_message(client):
    """`messages.append(answer.message.model_dump())` sends the fields the answer did not have as nulls
    (`refusal`, `tool_calls`, ...): null is unset, in a message as at the top of the body."""
    messages = user("tea")
    answer = client.chat.completions.create(model="tiny-serve", messages=messages, max_tokens=3, temperature=0)
    dumped = answer.choices[0].message.model_dump()
    assert dumped["refusal"] is None and dumped["tool_calls"] is None
    text_part = {"type": "text", "text": "more", "cache_control": None}
    follow_up = client.chat.completions.create(model="tiny-serve", max_tokens=3, temperature=0,
                                               messages=[*messages, dumped, {"role": "user", "content": [text_part]}])
    assert follow_up.choices[0].finish_reason in ("stop", "length")


def test_openai_client_raises_on_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=user("x"))
    with pytest.raises(openai.BadRequestError, match=str(MAX_SEQ_LEN)):
        client.completions.create(model="tiny-serve", prompt="x", max_tokens=MAX_SEQ_LEN)


def test_bearer_token_auth(state):
    srv = InProcessServer(make_state(state.gen, "tiny-serve", api_key="s3cret"))
    try:
        body = {"messages": user("tea"), "max_tokens": 4, "temperature": 0}
        assert httpx.post(srv.url + "/v1/chat/completions", json=body).status_code == 401
        wrong = httpx.post(srv.url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        for sent in ("Basic s3cret", "Token s3cret", "s3cret"):  # the key under another scheme, or none
            r = httpx.post(srv.url + "/v1/chat/completions", json=body, headers={"Authorization": sent})
            assert r.status_code == 401, sent
        assert httpx.post(srv.url + "/v1/completions", json={"prompt": "tea", "max_tokens": 2}).status_code == 401
        assert httpx.get(srv.url + "/v1/models").status_code == 401  # every /v1/ route, not the chat one alone
        ok = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        assert ok.chat.completions.create(model="tiny-serve", **body).choices[0].message.content is not None
    finally:
        srv.stop()


def test_a_request_without_the_api_key_is_refused_before_its_body_is_read(state):
    """The 401 comes from the headers alone: a client without the key cannot make the server take in (and hold in
    memory) a body of any size first."""
    srv = InProcessServer(make_state(state.gen, "tiny-serve", api_key="s3cret"))
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000000000\r\n\r\n{")  # a gigabyte announced, one byte of it sent
            answer = b""
            while b"invalid_api_key" not in answer and (part := s.recv(4096)):
                answer += part
        assert answer.startswith(b"HTTP/1.1 401") and b"invalid_api_key" in answer, answer
        assert httpx.get(srv.url + "/health").status_code == 200  # still open
    finally:
        srv.stop()


def _raw_post(port: int, head: bytes, body: bytes) -> bytes:
    """Send a request as bytes and read the answer's first bytes (up to its error code)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + head +
                  b"\r\n" + body)
        answer = b""
        while b"}}" not in answer and (part := s.recv(4096)):
            answer += part
    return answer


def test_a_body_larger_than_the_context_could_need_is_refused_before_it_is_read(server):
    """An authorized client, or any client of a server without a key, cannot make it hold a body of any size: one
    announced over the limit is refused at once, a chunked one as soon as it passes it."""
    limit = body_limit(MAX_SEQ_LEN)
    announced = _raw_post(server.port, f"Content-Length: {10 * limit}\r\n".encode(), b"{")
    assert announced.startswith(b"HTTP/1.1 413") and b"request_too_large" in announced, announced
    chunk = b"x" * 65536
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(limit // len(chunk) + 1))
    chunked = _raw_post(server.port, b"Transfer-Encoding: chunked\r\n", chunks)
    assert chunked.startswith(b"HTTP/1.1 413") and b"request_too_large" in chunked, chunked


def test_a_chunked_body_under_the_limit_reaches_the_route_whole(server):
    """The body the limit read is handed on: a request sent in chunks is answered as one sent at once."""
    body = json.dumps({"messages": user("tea"), "max_tokens": 3, "temperature": 0}).encode()
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:7], body[7:])) + b"0\r\n\r\n"
    answer = _raw_post(server.port, b"Transfer-Encoding: chunked\r\n", chunks)
    assert answer.startswith(b"HTTP/1.1 200") and b"chat.completion" in answer, answer


class SlowGenerator:
    """The Generator, each verify pass slowed down: a long request then surely outlasts the test's steps."""

    def __init__(self, gen, pass_s: float):
        self.gen, self.pass_s = gen, pass_s

    def __getattr__(self, name):
        return getattr(self.gen, name)

    def stream(self, *args, **kwargs):
        inner = self.gen.stream(*args, **kwargs)
        try:
            while True:
                chunk = next(inner)
                time.sleep(self.pass_s)
                yield chunk
        except StopIteration as stop:
            return stop.value
        finally:
            inner.close()


def test_full_queue_429_and_a_disconnect_frees_the_slot_at_once(state):
    srv = InProcessServer(make_state(SlowGenerator(state.gen, 0.2), "tiny-serve", max_queue=1))
    long = {"messages": user("soup"), "max_tokens": 200, "temperature": 0, "stream": True}  # 8+ s of passes
    try:
        with httpx.Client(timeout=60) as http:
            with http.stream("POST", srv.url + "/v1/chat/completions", json=long) as r:
                lines = r.iter_lines()  # held: a dropped line iterator closes the connection, ending the stream
                next(lines)  # the first event: the request is generating
                busy = httpx.post(srv.url + "/v1/chat/completions", json={**long, "stream": False})
                assert busy.status_code == 429 and busy.headers["Retry-After"].isdigit()
                assert busy.json()["error"]["type"] == "rate_limit_error"
            # the client went away mid-stream: the worker stops after its current pass and frees the slot
            wait_for(lambda: not httpx.get(srv.url + "/health").json()["in_flight"],
                     "the abandoned stream still holds its slot", 2)
            ok = httpx.post(srv.url + "/v1/chat/completions", json={**long, "stream": False, "max_tokens": 4})
            assert ok.status_code == 200
    finally:
        srv.stop()


def test_choices_are_admitted_all_or_none_and_a_disconnect_frees_them_all(state):
    """Each choice holds a --max-queue place: a request of more choices than there are places left is refused
    whole (429, none of its choices started); a streamed request of two choices whose client goes frees both."""
    srv = InProcessServer(make_state(SlowGenerator(state.gen, 0.2), "tiny-serve", max_queue=3))
    long = {"messages": user("soup"), "max_tokens": 200, "temperature": 0, "stream": True}  # 8+ s of passes
    try:
        with httpx.Client(timeout=60) as http:
            with http.stream("POST", srv.url + "/v1/chat/completions", json={**long, "n": 2}) as r:
                lines = r.iter_lines()  # held: a dropped line iterator closes the connection, ending the stream
                next(lines)
                assert httpx.get(srv.url + "/health").json()["in_flight"] == 2
                busy = httpx.post(srv.url + "/v1/chat/completions", json={**long, "stream": False, "n": 2})
                assert busy.status_code == 429 and httpx.get(srv.url + "/health").json()["in_flight"] == 2
            wait_for(lambda: not httpx.get(srv.url + "/health").json()["in_flight"],
                     "the abandoned choices still hold their places", 2)
            ok = httpx.post(srv.url + "/v1/chat/completions", json={**long, "stream": False, "max_tokens": 4, "n": 3})
            assert ok.status_code == 200 and len(ok.json()["choices"]) == 3
    finally:
        srv.stop()


class HeldChoice(SlowGenerator):
    """The Generator, the stream of one seed held before its first pass until `go` is set (30 s at most): a choice
    that waits its turn, as choices do where the bundle cannot batch them or under typical acceptance with top-p."""

    def __init__(self, gen, held_seed: int):
        super().__init__(gen, 0)
        self.held_seed, self.go, self.waited_out = held_seed, threading.Event(), False

    def stream(self, *args, **kwargs):
        if kwargs.get("seed") == self.held_seed and not self.go.wait(30):
            self.waited_out = True
        return (yield from self.gen.stream(*args, **kwargs))


@pytest.mark.parametrize("chat", [True, False])
def test_a_streamed_choice_is_sent_while_another_waits_its_turn(state, chat):
    """Streamed choices are sent as they come: choice 0's whole answer reaches the client while choice 1 has not
    begun (the server used to wait for every choice's first pass before sending a byte, so a request whose
    choices run one after another streamed nothing until all but the last had ended)."""
    gen = HeldChoice(state.gen, held_seed=8)
    srv = InProcessServer(make_state(gen, "tiny-serve"))
    body = {"max_tokens": 6, "temperature": 2.5, "seed": 7, "n": 2, "stream": True,
            **({"messages": user("soup")} if chat else {"prompt": "soup"})}
    ended = []
    try:
        with httpx.Client(timeout=60) as http, \
                http.stream("POST", srv.url + ("/v1/chat/completions" if chat else "/v1/completions"), json=body) as r:
            for line in r.iter_lines():
                choices = json.loads(line.removeprefix("data: "))["choices"] if line.startswith("data: {") else []
                ended += [c["index"] for c in choices if c["finish_reason"]]
                if ended == [0]:
                    gen.go.set()  # choice 0 ended, choice 1 still held: let it go
        assert ended == [0, 1] and not gen.waited_out
    finally:
        gen.go.set()
        srv.stop()


def test_a_plain_request_whose_client_goes_is_cancelled(state):
    """Not streamed: the client gives up (a timeout, say) before the answer; the job stops after its current pass
    instead of running to max_tokens, and its slot is free for the next request."""
    srv = InProcessServer(make_state(SlowGenerator(state.gen, 0.1), "tiny-serve"))
    long = {"messages": user("soup"), "max_tokens": 200, "temperature": 0}  # 20+ s of passes
    try:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(srv.url + "/v1/chat/completions", json=long, timeout=1.0)
        wait_for(lambda: not httpx.get(srv.url + "/health").json()["in_flight"], "the abandoned request still runs", 3)
    finally:
        srv.stop()


def test_a_request_whose_client_goes_while_every_slot_is_busy_leaves_at_once(state):
    """Cancelled while it waits for a sequence slot (every slot busy): the request leaves the server at once, its
    queue place free, instead of waiting for a slot and running its prompt for nobody."""
    g, runner = state.gen, make_state(state.gen, "tiny-serve", max_queue=4).runner
    busy = [g.stream(prompt_text(i), 200, temperature=0, speculate=False) for i in range(g.scheduler.cache.batch)]
    for s in busy:
        next(s)  # every slot holds a request
    prompt = list(range(200, 280))  # ids no other test sends

    async def submit_and_cancel():
        job = runner.submit(prompt, 5, {"speculate": False})
        job.cancel()
        return await job.next()

    try:
        kind, outcome = asyncio.run(submit_and_cancel())
        assert kind == "done" and outcome.finish_reason == "cancelled" and runner.in_flight == 0
        assert all(g.scheduler.slots)  # it left while the others still decode
        assert not g.context_cache.lookup(np.array(prompt), len(prompt), ["target"])  # its prompt never ran
    finally:
        for s in busy:
            s.close()


def test_a_request_whose_client_goes_while_it_waits_for_a_slot_never_takes_one(state, monkeypatch):
    """Every slot is busy and a request waits for one when its client gives up: it leaves the queue when the
    round under way ends, and never takes a slot (its prefill, a whole prompt's passes, would be wasted)."""
    g = state.gen
    sched = g.scheduler
    busy = [g.stream(list(range(3 + i, 10 + i)), 200, chat=False) for i in range(len(sched.slots))]
    for s in busy:
        next(s)  # every slot holds a request
    admitted = []
    new_slot = type(sched)._new_slot
    monkeypatch.setattr(type(sched), "_new_slot", lambda self, b, h: admitted.append(h) or new_slot(self, b, h))
    srv = InProcessServer(make_state(g, "tiny-serve"))
    runner, taken = srv.state.runner, []
    submit = runner.submit_choices
    monkeypatch.setattr(runner, "submit_choices", lambda *args: taken.extend(jobs := submit(*args)) or jobs)
    try:
        with sched.wake:
            sched.driving = True  # a round is under way: the waiting request's worker waits for it to end
        with pytest.raises(httpx.TimeoutException):
            httpx.post(srv.url + "/v1/completions", json={"prompt": list(range(3, 200)), "max_tokens": 10},
                       timeout=1.0)
        wait_for(lambda: taken, "the server never took the request")  # a slow machine's server may take seconds
        assert taken[0].cancelled.wait(30), "the server did not see the client go"
        end_round(sched)
        wait_for(lambda: not srv.state.runner.in_flight, "the abandoned request still waits")
        assert not admitted
    finally:
        end_round(sched)  # also where the test failed: a round left under way would stall every later test
        srv.stop()
        for s in busy:
            s.close()


class HeldTokenizer:
    """The bundle's tokenizer, its chat encoding held until `release` is set: a prompt of megabytes of text (or a
    slow chat template) takes seconds to encode."""

    def __init__(self, tokenizer, release: threading.Event):
        self.tokenizer, self.release, self.entered = tokenizer, release, threading.Event()

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def encode_messages(self, messages):
        self.entered.set()
        assert self.release.wait(60)
        return self.tokenizer.encode_messages(messages)


class WithTokenizer(SlowGenerator):
    def __init__(self, gen, tokenizer):
        super().__init__(gen, 0)
        self.tokenizer = tokenizer


def test_a_prompt_being_tokenized_stalls_no_other_request(state):
    """Encoding runs off the event loop: while one request's prompt is encoded, the server still answers."""
    held = HeldTokenizer(state.gen.tokenizer, threading.Event())
    srv = InProcessServer(make_state(WithTokenizer(state.gen, held), "tiny-serve"))
    try:
        answer = {}
        body = {"messages": user("tea"), "max_tokens": 4, "temperature": 0}
        asker = threading.Thread(target=lambda: answer.setdefault(
            "r", httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60)))
        asker.start()
        assert held.entered.wait(30)
        assert httpx.get(srv.url + "/health", timeout=10).json()["in_flight"] == 0
        held.release.set()
        asker.join(60)
        assert answer["r"].status_code == 200, answer["r"].text
    finally:
        held.release.set()
        srv.stop()


def test_tokenizing_lets_other_threads_run(state):
    """The tokenizer lets go of the GIL while it encodes (a long prompt, encoded in a worker thread, then does not
    hold up the event loop either): a thread counting meanwhile is not stopped."""
    text = "the cat sat on a mat " * 100_000
    done, ticks = threading.Event(), [0]

    def count():
        while not done.is_set():
            ticks[0] += 1
            time.sleep(0.001)

    counter = threading.Thread(target=count)
    counter.start()
    try:
        time.sleep(0.05)
        before = ticks[0]
        ids = state.gen.tokenizer.encode(text)
        during = ticks[0] - before
    finally:
        done.set()
        counter.join()
    assert ids == state.gen.tokenizer.tok.encode(text).ids
    assert during > 100  # it counts on about once a millisecond; a GIL held throughout leaves it a few steps


def test_a_request_leaves_the_queue_before_its_client_hears_the_end(state, monkeypatch):
    """A client that sends its next request as soon as the last one ended finds its place free (with --max-queue 1
    it got a 429 now and then): a job leaves the count before its last event (done, or an error) is handed on."""
    from speccompile.serve.runner import Job
    served = make_state(state.gen, "tiny-serve", max_queue=1)
    counted_at_end, put = [], Job.put

    def put_counting(job, kind, value):
        if kind != "chunk":
            counted_at_end.append(served.runner.in_flight)
        put(job, kind, value)

    monkeypatch.setattr(Job, "put", put_counting)
    srv = InProcessServer(served)
    try:
        statuses = [httpx.post(srv.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 2, **extra},
                               timeout=60).status_code
                    for prompt, extra in (("tea", {}), ("tea", {"stream": True}), ([10**6], {}))]
    finally:
        srv.stop()
    assert statuses == [200, 200, 400] and counted_at_end == [0, 0, 0]


class BrokenGenerator(SlowGenerator):
    def stream(self, *args, **kwargs):
        raise RuntimeError("a bug deep in the runtime")
        yield  # a generator, as Generator.stream is


def test_a_bug_is_a_500_error_object_without_traceback(state):
    srv = InProcessServer(make_state(BrokenGenerator(state.gen, 0), "tiny-serve"))
    try:
        for stream in (False, True):
            r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": user("x"), "stream": stream})
            assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
            assert "Traceback" not in r.text and "deep in the runtime" not in r.text
        assert httpx.get(srv.url + "/health").json()["in_flight"] == 0
    finally:
        srv.stop()


def test_a_failed_shared_pass_is_a_500_for_every_request_in_it(state, monkeypatch):
    """The engine fails in a pass two streams share: the request whose thread ran it and the other both end with
    a server_error naming the exception's type only, not a 400 blaming the client, nor the engine's message."""
    srv = InProcessServer(make_state(SlowGenerator(state.gen, 0.05), "tiny-serve"))
    engine = type(state.gen.scheduler.engine)
    engine_run = engine.run

    def failing(self, *args, **kwargs):
        monkeypatch.setattr(engine, "run", engine_run)
        raise RuntimeError("onnxruntime failed in /the/server/s/files")
    long = {"messages": user("soup"), "max_tokens": 200, "temperature": 0, "stream": True}
    try:
        with httpx.Client(timeout=60) as http, \
                http.stream("POST", srv.url + "/v1/chat/completions", json=long) as a, \
                http.stream("POST", srv.url + "/v1/chat/completions", json={**long, "seed": 1}) as b:
            lines = [r.iter_lines() for r in (a, b)]
            for it in lines:
                next(it)  # both generating, each in a slot
            monkeypatch.setattr(engine, "run", failing)
            last = [[line for line in it if line][-1] for it in lines]
        for event in last:
            error = json.loads(event.removeprefix("data: "))["error"]
            assert error["type"] == "server_error" and "RuntimeError" in error["message"], error
            assert "/the/server" not in error["message"]
    finally:
        srv.stop()


class NamedTemplateGenerator(SlowGenerator):
    """The Generator with a chat template that renders each message's `name`."""

    def __init__(self, gen):
        super().__init__(gen, 0)
        self.tokenizer = copy.copy(gen.tokenizer)
        self.tokenizer.chat_template = ("{% for m in messages %}{% if m.name %}{{ m.name }}: {% endif %}"
                                        "{{ m.content }}\n{% endfor %}")
        self.tokenizer._compiled = None


def test_a_message_name_reaches_the_chat_template(state):
    """As vLLM passes it: a template that knows `name` renders it (one that does not ignores it)."""
    gen = NamedTemplateGenerator(state.gen)
    named = [{"role": "user", "content": "tea", "name": "zebra"}]
    prompt_tokens = len(gen.tokenizer.encode_messages(named))
    assert prompt_tokens > len(gen.tokenizer.encode_messages([{"role": "user", "content": "tea"}]))
    srv = InProcessServer(make_state(gen, "tiny-serve"))
    try:
        r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": named, "max_tokens": 1})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == prompt_tokens, r.text
    finally:
        srv.stop()


def test_stopping_cancels_what_outlasts_the_shutdown_timeout(state):
    """What SIGTERM does (uvicorn's should_exit): no new connections; a request longer than the timeout is
    cancelled, its worker lets go of the Generator, and the server stops within the bound."""
    slow = make_state(SlowGenerator(state.gen, 0.2), "tiny-serve", shutdown_timeout_s=1.0)
    srv = InProcessServer(slow, shutdown_timeout_s=1.0)
    logged = RecordsOf("uvicorn.error")
    long = {"messages": user("soup"), "max_tokens": 200, "temperature": 0, "stream": True}  # 8+ s of passes
    try:
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json=long, timeout=60) as r:
            lines = r.iter_lines()
            next(lines)
            t0 = time.time()
            srv.server.should_exit = True
            with pytest.raises(httpx.HTTPError):
                list(lines)  # cut off: the stream never reaches [DONE]
        srv.thread.join(10)
    finally:
        logging.getLogger("uvicorn.error").removeHandler(logged)
    assert not srv.thread.is_alive() and time.time() - t0 < 5
    assert slow.runner.in_flight == 0 and not slow.runner.accepting
    errors = [r.getMessage() for r in logged.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "Cancel 1 running task" in errors[0], errors  # one line, no traceback
    assert not any(r.exc_info for r in logged.records)


def test_a_plain_request_cut_off_at_the_shutdown_timeout_gets_an_error_object(state):
    """Not streamed, the request has sent nothing when the shutdown timeout cuts it off: its client gets a 503
    error object saying the server is stopping, not uvicorn's plain-text 500."""
    slow = make_state(SlowGenerator(state.gen, 0.2), "tiny-serve", shutdown_timeout_s=1.0)
    srv = InProcessServer(slow, shutdown_timeout_s=1.0)
    long = {"messages": user("soup"), "max_tokens": 200, "temperature": 0}  # 8+ s of passes
    answer = []
    with httpx.Client(timeout=60) as http:
        asked = threading.Thread(target=lambda: answer.append(http.post(srv.url + "/v1/chat/completions",
                                                                         json=long)))
        asked.start()
        deadline = time.time() + 30
        while not slow.runner.in_flight:
            assert time.time() < deadline, "the request did not start"
            time.sleep(0.01)
        srv.server.should_exit = True  # what SIGTERM does
        asked.join(30)
    srv.thread.join(10)
    assert answer and answer[0].status_code == 503, answer and answer[0].text
    assert answer[0].json()["error"]["code"] == "shutting_down"


class RecordsOf(logging.Handler):
    """Every record a logger lets through, from now until removed."""

    def __init__(self, logger: str):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        logging.getLogger(logger).addHandler(self)

    def emit(self, record):
        self.records.append(record)


def _metric_values(server) -> tuple[str, dict]:
    text = httpx.get(server.url + "/metrics").text
    return text, {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line and not line.startswith("#")}


def test_metrics_show_requests_tokens_and_acceptance(server, client):
    _, before = _metric_values(server)
    res = client.chat.completions.create(model="tiny-serve", messages=user("tea and soup"), max_tokens=32,
                                         temperature=0)
    text, values = _metric_values(server)

    def metric(name, of=values, **labels):
        want = ",".join(f'{k}="{v}"' for k, v in sorted({"model_name": "tiny-serve", **labels}.items()))
        return of.get(f"speccompile:{name}{{{want}}}", 0.0)

    def added(name, **labels):
        return metric(name, **labels) - metric(name, before, **labels)

    # the request's own figures: its finish reason, its prompt and its answer, counted once each
    assert added("request_success_total", finished_reason=res.choices[0].finish_reason) == 1
    assert added("prompt_tokens_total") == res.usage.prompt_tokens
    assert added("generation_tokens_total") == res.usage.completion_tokens

    assert metric("spec_decode_num_drafts_total") > 0
    assert 0 < metric("spec_decode_num_accepted_tokens_total") <= metric("spec_decode_num_draft_tokens_total")
    assert metric("spec_decode_num_accepted_tokens_per_pos_total", position="0") > 0
    assert metric("generation_tokens_total") >= 32 and metric("prompt_tokens_total") > 0
    assert metric("time_to_first_token_seconds_count") > 0 and metric("time_per_output_token_seconds_count") > 0
    assert metric("num_requests_waiting") == 0 and "speccompile:prefix_cache_hits_total" in text


def test_serve_without_the_extra_is_one_error_line(monkeypatch, bundle):
    import importlib.util

    from click.testing import CliRunner

    from speccompile.cli import main
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    out = CliRunner().invoke(main, ["serve", bundle])
    assert out.exit_code == 2 and "pip install 'speccompile[serve]'" in out.output and "Traceback" not in out.output


def start_process(args: list[str], port: int, timeout_s: float):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "speccompile.cli", "serve", *args, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    deadline = time.time() + timeout_s
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the server did not come up:\n{proc.communicate()[0][-3000:]}")
        time.sleep(0.2)


def test_an_empty_api_key_is_refused(bundle, monkeypatch):
    """`serve --api-key "$KEY"` with KEY unset passes an empty key, which once served every client unchecked; a key
    with a space at an end can never match (HTTP strips a header value's ends), so it is refused too."""
    from click.testing import CliRunner

    import speccompile.serve.server as server_module
    from speccompile.cli import main
    served = []
    monkeypatch.setattr(server_module, "serve", lambda *args: served.append(args))  # never blocks on a refusal missed
    for key in ("", "  "):
        out = CliRunner().invoke(main, ["serve", bundle, "--port", "0", "--threads", "1", "--api-key", key])
        assert out.exit_code == 2 and out.output.startswith("error: --api-key is empty"), out.output
    out = CliRunner().invoke(main, ["serve", bundle, "--port", "0", "--threads", "1", "--api-key", "key "])
    assert out.exit_code == 2 and out.output.startswith("error: --api-key starts or ends with whitespace"), out.output
    assert not served
    assert "SPECCOMPILE_API_KEY" in CliRunner().invoke(main, ["serve", "--help"]).output  # the other way to give it


def test_sigterm_finishes_in_flight_requests_and_exits_0(bundle):
    port = free_port()
    proc = start_process([bundle, "--threads", "1", "--shutdown-timeout", "20"], port, 60)
    body = {"messages": user("soup"), "max_tokens": 150, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        next(lines)
        proc.send_signal(signal.SIGTERM)  # mid-stream: the answer still completes
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    assert proc.wait(30) == 0, proc.communicate()[0][-3000:]
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)


def test_serve_names_the_address_it_listens_on(bundle):
    """serve binds its socket before the bundle loads and hands it to uvicorn, which then names no address: the
    command says where it listens itself, the port the system chose with --port 0 included."""
    import queue
    import re
    proc = subprocess.Popen([sys.executable, "-m", "speccompile.cli", "serve", bundle, "--threads", "1", "--port",
                             "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        seen, deadline = [], time.time() + 60
        while not any(re.search(r"running on http://127\.0\.0\.1:[1-9]", line) for line in seen):
            assert time.time() < deadline and proc.poll() is None, "".join(seen)
            with contextlib.suppress(queue.Empty):
                seen.append(lines.get(timeout=1))
        port = int(re.search(r"127\.0\.0\.1:(\d+)", seen[-1]).group(1))
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


STOPPED_WHILE_LOADING = """
import os, signal, time
from speccompile.serve import server
def load_state(*_):  # a SIGTERM arrives while the bundle loads
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)
server.load_state = load_state
server.serve("unused", server.ServeOptions(port=0))
"""


def test_a_sigterm_while_the_bundle_loads_exits_0():
    """A stop before the server runs abandons the load and exits 0, as a stop while serving does (it was killed
    by the signal: status -15)."""
    proc = subprocess.run([sys.executable, "-c", STOPPED_WHILE_LOADING], capture_output=True, text=True, timeout=20)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_ray_serve_two_replicas_answer_the_same(bundle, state):
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'speccompile[ray]'")
    port = free_port()
    proc = start_process([bundle, "--replicas", "2", "--threads", "1"], port, 480)  # Ray starts slowly
    try:
        aclient_url = f"http://127.0.0.1:{port}/v1"
        c = openai.OpenAI(base_url=aclient_url, api_key="unused", max_retries=0, timeout=120)
        for i in range(4):
            p = prompt_text(i)
            ref = state.gen.chat(user(p), 12, temperature=0).text
            res = c.chat.completions.create(model="tiny-serve", messages=user(p), max_tokens=12, temperature=0)
            assert res.choices[0].message.content == ref
            streamed = c.chat.completions.create(model="tiny-serve", messages=user(p), max_tokens=12, temperature=0,
                                                 stream=True)
            assert "".join(x.choices[0].delta.content or "" for x in streamed if x.choices) == ref
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(120)
    assert rc == 0, proc.communicate()[0][-3000:]


def test_load_benchmark_tool(server, tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
    try:
        import bench_serve
    finally:
        sys.path.pop(0)
    out, png = tmp_path / "serve.json", tmp_path / "serve.png"
    assert bench_serve.main([server.url, "--concurrency", "1,3", "--requests", "1", "--max-tokens", "8",
                             "--json", str(out), "--plot", str(png)]) == 0
    doc = json.loads(out.read_text())
    assert doc["identical"] and len(doc["levels"]) == 4 and png.stat().st_size > 0
    assert all(lv["requests"] == lv["concurrency"] and lv["output_tokens_per_s"] > 0 for lv in doc["levels"])


@pytest.mark.slow
def test_real_model_served_text_equals_speccompile_generate(tmp_path_factory):
    """The default SmolLM2 bundle (prompt lookup and the MTP head): the official client's greedy text, plain and
    streamed, is what `speccompile generate` prints; 8 concurrent clients each get the answer their request gets
    alone."""
    from click.testing import CliRunner

    from speccompile.cli import main
    out = str(tmp_path_factory.mktemp("serve-smol") / "smollm2")
    build_bundle(None, out, progress=lambda *_: None)
    prompts = ["What is the capital of France?", "Name three primary colours.", "Write a haiku about rain.",
               "Explain what a prime number is."]
    expected = {}
    for p in prompts:
        res = CliRunner().invoke(main, ["generate", out, p, "--max-new-tokens", "32", "--json", "--threads", "2"])
        assert res.exit_code == 0, res.output
        expected[p] = json.loads(res.output)["text"]
    srv = InProcessServer(load_state(out, ServeOptions(threads=2)))
    try:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        accepted = []  # adaptive drafting may find no draft worth a row on one short answer, not on every one
        for p in prompts[:2]:
            msg = [{"role": "user", "content": p}]
            plain = c.chat.completions.create(model="smollm2", messages=msg, max_tokens=32, temperature=0)
            assert plain.choices[0].message.content == expected[p]
            accepted.append(plain.usage.mean_accepted_tokens)
            streamed = c.chat.completions.create(model="smollm2", messages=msg, max_tokens=32, temperature=0,
                                                 stream=True)
            assert "".join(x.choices[0].delta.content or "" for x in streamed if x.choices) == expected[p]
        assert max(accepted) > 1.0  # the server speculates with the bundle's drafter

        async def ask(aclient, p):
            r = await aclient.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": p}],
                                                      max_tokens=32, temperature=0)
            return p, r.choices[0].message.content

        async def run():
            async with openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0,
                                          timeout=600) as aclient:
                return await asyncio.gather(*(ask(aclient, prompts[i % len(prompts)]) for i in range(8)))

        answers = asyncio.run(run())
        assert len(answers) == 8 and all(text == expected[p] for p, text in answers)
    finally:
        srv.stop()


def test_a_server_keeps_its_context_cache_in_cache_dir_across_restarts(bundle, tmp_path):
    """serve --cache-dir: a prompt a server saw before it restarted is a cache hit after; --no-context-cache keeps
    none, and its options beside it are refused by the CLI."""
    from click.testing import CliRunner
    from speccompile.cli import main
    messages = user("the same long system prompt, again and again")
    hits = []
    for _ in range(2):  # a server, then its restart: a new process would load as this does
        srv = InProcessServer(load_state(bundle, ServeOptions(threads=1, cache_dir=str(tmp_path / "kv"))))
        try:
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
            res = client.chat.completions.create(model="tiny-serve", messages=messages, max_tokens=2, temperature=0)
            hits.append(res.usage.model_dump()["prompt_cache_hit_tokens"])
        finally:
            srv.stop()
    assert hits[0] == 0 and hits[1] > 0
    assert load_state(bundle, ServeOptions(threads=1, context_cache=False)).gen.context_cache is None
    out = CliRunner().invoke(main, ["serve", bundle, "--no-context-cache", "--cache-bytes", "10"])
    assert out.exit_code == 2 and "drop --cache-bytes" in out.output


def test_the_shutdown_timeout_counts_from_when_the_drain_began(state):
    """SIGTERM starts uvicorn's drain (admitting stops), and the app's own wait for its workers comes after it: that
    wait gets what is left of the timeout, not a whole timeout again (a stop took up to twice the timeout)."""
    from speccompile.serve.metrics import Metrics
    from speccompile.serve.runner import Runner

    class StuckJob:  # a worker that never lets go
        def cancel(self):
            pass
    runner = Runner(state.gen, Metrics("tiny-serve"), max_queue=2)
    runner.stop_admitting()
    runner.stopped_at -= 30.0  # the drain took 30 of the 31 s
    runner._jobs.add(StuckJob())
    t0 = time.monotonic()
    assert runner.shutdown(31.0) is False
    assert time.monotonic() - t0 < 10.0  # the 1 s left, not 31 more
    runner._jobs.clear()


def test_a_shutdown_racing_an_admission_still_ends_the_request(state):
    """A shutdown that came between a request's admission and its worker's start shut the pool under it: the
    admission raised RuntimeError (a 500) and the request stayed counted in flight."""
    import asyncio
    from speccompile.serve.metrics import Metrics
    from speccompile.serve.runner import Runner
    runner = Runner(state.gen, Metrics("tiny-serve"), max_queue=2)
    submit, stopper = runner._pool.submit, []

    def shutdown_meanwhile(*args):
        stopper.append(threading.Thread(target=runner.shutdown, args=(0.2,)))
        stopper[0].start()
        time.sleep(0.5)  # the shutdown runs as far as it can before the worker is started
        return submit(*args)

    async def admit():
        runner._pool.submit = shutdown_meanwhile
        job = runner.submit([5, 6, 7], 4, {})
        while (await job.next())[0] not in ("done", "error"):  # the shutdown cancels it: it ends unanswered
            pass
    asyncio.run(admit())
    stopper[0].join(10)
    assert not runner.in_flight and not stopper[0].is_alive()


def test_a_cancelled_request_counts_its_prompts_cache_hits(state):
    """/metrics left a cancelled request's runtime stats out: its prompt counted as cache queries with no hits,
    though the context cache gave it its prefix (a chat UI's Stop button cancels such requests)."""
    import asyncio
    from speccompile.serve.metrics import Metrics
    from speccompile.serve.runner import Runner
    metrics = Metrics("tiny-serve")
    runner = Runner(state.gen, metrics, max_queue=2)
    prompt = list(range(300, 360))  # ids no other test sends
    state.gen.generate(prompt, 2, speculate=False)  # its blocks now in the context cache

    async def cancelled_after_a_chunk():
        job = runner.submit(prompt, 40, {"speculate": False})
        assert (await job.next())[0] == "chunk"
        job.cancel()
        while (item := await job.next())[0] not in ("done", "error"):
            pass
        return item
    kind, outcome = asyncio.run(cancelled_after_a_chunk())
    assert kind == "done" and outcome.finish_reason == "cancelled"
    hits = metrics.registry.get_sample_value("speccompile:prefix_cache_hits_total", {"model_name": "tiny-serve"})
    assert hits and hits >= 48  # the prompt's whole blocks


def test_a_request_that_fails_is_counted_by_its_status(state):
    """/metrics left out an admitted request that ended in an error: a server answering 500s showed their first
    tokens (TTFT) and nothing else, no request finished, none failed."""
    import asyncio
    from speccompile.serve.metrics import Metrics
    from speccompile.serve.runner import Runner

    class FailsAfterAChunk(SlowGenerator):
        def stream(self, *args, **kwargs):
            inner = self.gen.stream(*args, **kwargs)
            try:
                yield next(inner)
                raise RuntimeError("a bug")
            finally:
                inner.close()
    metrics = Metrics("tiny-serve")
    runner = Runner(FailsAfterAChunk(state.gen, 0.0), metrics, max_queue=2)

    async def run():
        job = runner.submit([5, 6, 7], 4, {"speculate": False})
        while (item := await job.next())[0] not in ("done", "error"):
            pass
        return item[0]
    assert asyncio.run(run()) == "error"
    value = metrics.registry.get_sample_value
    assert value("speccompile:request_failure_total", {"model_name": "tiny-serve", "status": "500"}) == 1
    assert value("speccompile:num_requests_running", {"model_name": "tiny-serve"}) == 0


def test_logprobs_in_openais_forms(state, client):
    """Chat: logprobs true and top_logprobs K, as OpenAI's; completions: logprobs K (the legacy form). Each token's
    log-probability is the runtime's, streamed too; asking changes no token."""
    ref = state.gen.chat(user("seven zebras"), 8, temperature=0, logprobs=2)
    res = client.chat.completions.create(model="tiny-serve", messages=user("seven zebras"), max_tokens=8,
                                         temperature=0, logprobs=True, top_logprobs=2)
    content = res.choices[0].logprobs.content
    assert res.choices[0].message.content == ref.text and len(content) == len(ref.token_ids)
    assert [c.logprob for c in content] == pytest.approx([e.logprob for e in ref.logprobs])
    assert [t.logprob for c in content for t in c.top_logprobs] == pytest.approx(
        [v for e in ref.logprobs for _, v in e.top])
    assert content[0].token == state.gen.tokenizer.decode([ref.token_ids[0]])
    assert content[0].bytes == list(content[0].token.encode())
    plain = client.chat.completions.create(model="tiny-serve", messages=user("seven zebras"), max_tokens=8,
                                           temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == ref.text
    chunks = list(client.chat.completions.create(model="tiny-serve", messages=user("seven zebras"), max_tokens=8,
                                                 temperature=0, logprobs=True, stream=True))
    streamed = [c for ch in chunks if ch.choices and ch.choices[0].logprobs for c in ch.choices[0].logprobs.content]
    assert [c.logprob for c in streamed] == pytest.approx([e.logprob for e in ref.logprobs])
    text = client.completions.create(model="tiny-serve", prompt="seven zebras", max_tokens=6, temperature=0,
                                     logprobs=3)
    ref = state.gen.generate("seven zebras", 6, chat=False, temperature=0, logprobs=3)
    lp = text.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([e.logprob for e in ref.logprobs])
    assert [max(top.values()) for top in lp.top_logprobs] == pytest.approx([e.top[0][1] for e in ref.logprobs])
    assert lp.text_offset[0] == 0 and "".join(lp.tokens) == text.choices[0].text
    r = httpx.post(str(client.base_url.join("chat/completions")), json={"messages": user("hi"), "top_logprobs": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs", r.text


def test_completions_echo_the_prompt_with_its_logprobs(state, server, client):
    """echo: the prompt's text before the completion's and, with logprobs K, its tokens' logprobs before the
    completion's (the first token's null), as OpenAI's and vLLM's give them to lm-evaluation-harness, which sends
    the prompt as a list of one list of token ids."""
    ids = state.gen.tokenizer.encode("seven zebras walked to the river", add_special_tokens=True)
    ref = state.gen.generate(ids, 2, chat=False, temperature=0, logprobs=1, prompt_logprobs=1)
    r = httpx.post(server.url + "/v1/completions", json={"prompt": [ids], "max_tokens": 2, "temperature": 0,
                                                         "echo": True, "logprobs": 1})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == state.gen.tokenizer.decode(ids) + ref.text
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 2 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx([e.logprob for e in ref.prompt_logprobs[1:] + ref.logprobs])
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
    text = client.completions.create(model="tiny-serve", prompt="seven zebras", max_tokens=3, temperature=0,
                                     echo=True)
    plain = client.completions.create(model="tiny-serve", prompt="seven zebras", max_tokens=3, temperature=0)
    assert text.choices[0].text == "seven zebras" + plain.choices[0].text and text.choices[0].logprobs is None
    pieces = list(client.completions.create(model="tiny-serve", prompt=ids, max_tokens=2, temperature=0, echo=True,
                                            logprobs=1, stream=True))
    first = pieces[0].choices[0]
    assert first.text == state.gen.tokenizer.decode(ids) and first.logprobs.token_logprobs == lp["token_logprobs"][
        :len(ids)]
    streamed = [v for p in pieces for v in (p.choices[0].logprobs.token_logprobs if p.choices and
                                             p.choices[0].logprobs else [])]
    assert streamed[0] is None and streamed[1:] == pytest.approx(lp["token_logprobs"][1:])
    two = httpx.post(server.url + "/v1/completions", json={"prompt": ids, "max_tokens": 2, "temperature": 0.8,
                                                           "seed": 1, "n": 2, "echo": True, "logprobs": 0}).json()
    prompt_part = lp["token_logprobs"][1:len(ids)]
    assert [c["logprobs"]["token_logprobs"][1:len(ids)] for c in two["choices"]] == [prompt_part] * 2
    assert all(c["text"].startswith(state.gen.tokenizer.decode(ids)) for c in two["choices"])
