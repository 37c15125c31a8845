"""The FastAPI app: OpenAI's chat and text completions (plain and streamed as server-sent events), models, health
and Prometheus metrics, over one loaded Generator."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json

from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse

from speccompile.errors import SpeccompileError
from speccompile.serve import api_errors, protocol
from speccompile.serve.api_errors import APIError, from_runtime, shutting_down
from speccompile.serve.guards import BodyLimit, KeyBeforeBody, body_limit
from speccompile.serve.metrics import Metrics, choices_usage
from speccompile.serve.runner import Job, Outcome, Runner


@dataclasses.dataclass
class ServeState:
    gen: object  # the loaded speccompile Generator
    model: str  # the name clients ask for
    runner: Runner
    metrics: Metrics
    api_key: str | None = None
    created: int = dataclasses.field(default_factory=protocol.now)
    shutdown_timeout_s: float = 10.0


def make_state(gen, model: str, max_queue: int = 64, api_key: str | None = None,
               shutdown_timeout_s: float = 10.0) -> ServeState:
    metrics = Metrics(model)
    return ServeState(gen, model, Runner(gen, metrics, max_queue), metrics, api_key or None,
                      shutdown_timeout_s=shutdown_timeout_s)


def create_app(state: ServeState) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        state.runner.shutdown(state.shutdown_timeout_s)  # after uvicorn drained the connections it could

    app = FastAPI(title="speccompile", lifespan=lifespan, docs_url=None, redoc_url=None)
    api_errors.install(app)
    app.add_middleware(BodyLimit, limit=body_limit(state.gen.max_seq_len))
    if state.api_key is not None:  # added last, so it runs first: no body is read for a client without the key
        app.add_middleware(KeyBeforeBody, key=state.api_key)

    @app.api_route("/health", methods=["GET", "HEAD"])  # load balancers probe with either
    async def health():
        return {"status": "ok" if state.runner.accepting else "stopping", "model": state.model,
                "in_flight": state.runner.in_flight}

    @app.get("/metrics")
    async def metrics():
        body, content_type = state.metrics.exposition()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models():
        return protocol.model_list(state.model, state.created)

    @app.get("/v1/models/{model:path}")  # the openai client's models.retrieve()
    async def model(model: str):
        _check_model(state, model)
        return protocol.model_card(state.model, state.created)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: protocol.ChatRequest, request: Request):
        _check_request(state, body)
        ids = await _tokenize(state.gen.tokenizer.encode_messages, [m.as_dict() for m in body.messages])
        return await _respond(state, body, ids, request, chat=True)

    @app.post("/v1/completions")
    async def completions(body: protocol.CompletionRequest, request: Request):
        _check_request(state, body)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):  # a list of one prompt
            prompt = prompt[0]
        if isinstance(prompt, str):  # as the tokenizer encodes it alone (BOS where it adds one), as vLLM's do
            ids = await _tokenize(state.gen.tokenizer.encode, prompt, add_special_tokens=True)
        else:
            ids = list(prompt)
        echo = None
        if body.echo:  # the prompt as sent, or its tokens' text
            echo = prompt if isinstance(prompt, str) else state.gen.tokenizer.decode(ids)
        return await _respond(state, body, ids, request, chat=False, echo=echo)

    return app


async def _tokenize(encode, *args, **kwargs) -> list[int]:
    """encode(...) in a worker thread: a long prompt (megabytes of text, refused only once its tokens are counted)
    or a slow chat template would otherwise stall every other request's stream while it runs."""
    return await asyncio.to_thread(encode, *args, **kwargs)


def _check_request(state: ServeState, body) -> None:
    """What a request's fields refuse on their own, before its prompt is encoded."""
    _check_model(state, body.model)
    if body.stream_options is not None and not body.stream:  # as OpenAI and vLLM refuse it: it would do nothing
        raise APIError(400, "stream_options: only allowed with stream: true", param="stream_options")
    stray = [f for f in ("typical_epsilon", "typical_alpha") if f in body.model_fields_set]
    if stray and body.acceptance != "typical":  # it would do nothing: exact acceptance has no threshold
        raise APIError(400, f"{stray[0]}: only allowed with acceptance: typical", param=stray[0])
    if getattr(body, "top_logprobs", None) is not None and not body.logprobs:  # as OpenAI refuses it
        raise APIError(400, "top_logprobs: only allowed with logprobs: true", param="top_logprobs")
    if body.n > state.runner.max_queue:  # every choice holds a place: more than there are would never be admitted
        raise APIError(400, f"n: at most {state.runner.max_queue} choices on this server (each holds one of its "
                       f"--max-queue places)", param="n")


def _check_model(state: ServeState, model: str | None) -> None:
    if model is not None and model != state.model:
        raise APIError(404, f"the model {model!r} does not exist: this server serves {state.model!r}",
                       param="model", code="model_not_found")


async def _respond(state: ServeState, body, ids: list[int], request: Request, chat: bool, echo: str | None = None):
    """Admit the request (a job per choice) and wait for the first event of a choice, so that a refusal (a prompt
    over the compiled context, a bad setting) is a 4xx before any byte of a stream is sent; then answer plainly or
    as a stream. A client gone before the answer cancels the jobs. echo: a completion's echoed prompt text."""
    limit = _token_limit(state, body, ids, "messages" if chat else "prompt")
    jobs = state.runner.submit_choices(ids, limit, body.choice_kwargs())
    watcher = asyncio.ensure_future(_cancel_on_disconnect(request, jobs))
    firsts = [asyncio.ensure_future(job.next()) for job in jobs]  # each job's first event
    try:
        await _first_choice(firsts)
        if body.stream:
            events = _sse(state, body, jobs, firsts, chat, echo)
            jobs, firsts = [], []  # the stream owns them now
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        outcomes = [await _outcome(job, await first) for job, first in zip(jobs, firsts)]
        use = choices_usage(len(ids), outcomes)
        if echo is None:
            answers = [(o.text, o.finish_reason, _logprobs(state, o.logprobs, chat)) for o in outcomes]
        else:
            answers = [(echo + o.text, o.finish_reason, _echoed_logprobs(state, ids, o)) for o in outcomes]
        rid = protocol.new_id("chatcmpl" if chat else "cmpl")
        if chat:
            return protocol.chat_completion(rid, state.model, answers, use)
        return protocol.completion(rid, state.model, answers, use)
    except asyncio.CancelledError:  # nothing sent yet: cut off by the shutdown timeout, an error object, not a bare 500
        if state.runner.accepting:
            raise
        raise shutting_down() from None
    finally:
        watcher.cancel()  # a stream's client going is seen by Starlette, which cancels _sse
        for first in firsts:
            first.cancel()
        for job in jobs:
            job.cancel()  # answered, refused or abandoned: a no-op once the worker is done


async def _first_choice(firsts: list[asyncio.Future]) -> None:
    """Wait for the first event of whichever choice comes first; an error there is the request's refusal. Not
    every choice's: choices run one after another where the bundle cannot batch them (or under typical
    acceptance with top-p or min-p), and a stream would send nothing until all but the last had ended. One choice's refusal is
    every choice's (one prompt, one set of settings); a later failure ends the stream with an error event."""
    done, _ = await asyncio.wait(firsts, return_when=asyncio.FIRST_COMPLETED)
    for first in done:
        if first.result()[0] == "error":
            raise _as_api_error(first.result()[1])


async def _cancel_on_disconnect(request: Request, jobs: list[Job]) -> None:
    """Cancel `jobs` once their client disconnects (the body is read: what comes next is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    for job in jobs:
        job.cancel()


def _token_limit(state: ServeState, body, ids: list[int], param: str) -> int:
    """The tokens to generate at most: max_tokens, or unset the rest of the compiled context; a prompt that does
    not fit with it is refused here, in OpenAI's words, naming the limit."""
    context, asked = state.gen.max_seq_len, body.token_limit
    if len(ids) >= context or (asked and len(ids) + asked > context):
        raise APIError(400, f"this model's maximum context length is {context} tokens (the bundle's compiled "
                       f"context); the request has {len(ids)} prompt tokens{_asked_for(body)}", param=param,
                       code="context_length_exceeded")
    return asked or context - len(ids)


def _asked_for(body) -> str:
    """The tokens to generate as the context-length error counts them: named by the field the client sent, or
    as the default a completion falls back to (a client that sent no max_tokens asked for none)."""
    if not body.token_limit:
        return ""
    if body.token_limit_field:
        return f" + {body.token_limit} tokens asked for ({body.token_limit_field})"
    return (f" + {body.token_limit} tokens to generate (max_tokens was not sent; completions default to "
            f"{body.token_limit}, as OpenAI's)")


async def _outcome(job: Job, event) -> Outcome:
    while event[0] != "done":
        if event[0] == "error":
            raise _as_api_error(event[1])
        event = await job.next()
    return event[1]


def _as_api_error(e: Exception) -> APIError:
    if isinstance(e, SpeccompileError):
        return from_runtime(e)
    return APIError(500, f"internal error ({type(e).__name__}); see the server's log", type="server_error")


def _logprobs(state: ServeState, entries: list | None, chat: bool,
              offsets: protocol.TextOffsets | None = None) -> dict | None:
    """A choice's (or a streamed piece's) logprobs in OpenAI's form, each token's text decoded alone; offsets:
    a streamed completion choice's, carried from piece to piece (None: a whole choice's, from its start)."""
    tokenizer = state.gen.tokenizer
    text_of = lambda token: tokenizer.decode([token])  # noqa: E731
    if chat:
        return protocol.chat_logprobs(entries, text_of, tokenizer.token_bytes)
    return protocol.completion_logprobs(entries, text_of, offsets or protocol.TextOffsets(tokenizer))


def _echoed_logprobs(state: ServeState, ids: list[int], o: Outcome) -> dict | None:
    """An echoing completion choice's logprobs: its prompt's tokens' (the first one's null), then its own."""
    prompt = protocol.echoed_entries(ids, o.prompt_logprobs)
    return None if prompt is None else _logprobs(state, prompt + (o.logprobs or []), chat=False)


def _data(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _sse(state: ServeState, body, jobs: list[Job], firsts: list[asyncio.Future], chat: bool,
               echo: str | None = None):
    """The answer as server-sent events, ending with [DONE]: each choice's pieces as they come (chunks carry their
    choice's index), its finish_reason when it ends; an echoing completion's prompt (and its logprobs) as each
    choice's first piece. If the client goes, Starlette cancels this generator at its await: `finally` cancels the
    jobs, whose workers close the Generator's streams after the current pass."""
    rid, model, created = protocol.new_id("chatcmpl" if chat else "cmpl"), state.model, protocol.now()

    offsets = [protocol.TextOffsets(state.gen.tokenizer) for _ in jobs]  # a completion choice's text_offset so far

    def piece(index: int, text: str, finish: str | None = None, entries: list | None = None) -> dict:
        logprobs = _logprobs(state, entries, chat, offsets[index]) if entries else None
        if not chat:
            return protocol.completion(rid, model, [(text, finish, logprobs)], None, created, first_index=index)
        delta = {"content": text} if text or not finish else {}
        return protocol.chat_chunk(rid, model, created, delta, finish, index=index, logprobs=logprobs)

    merged: asyncio.Queue = asyncio.Queue()  # (choice, event) from every job, in the order they come
    pumps = [asyncio.ensure_future(_pump(i, job, first, merged)) for i, (job, first) in enumerate(zip(jobs, firsts))]
    try:
        if chat:
            for i in range(len(jobs)):
                yield _data(protocol.chat_chunk(rid, model, created, {"role": "assistant", "content": ""}, index=i))
        outcomes: list[Outcome | None] = [None] * len(jobs)
        echoed = [echo is None] * len(jobs)
        while any(o is None for o in outcomes):
            i, event = await merged.get()
            if not echoed[i] and event[0] != "error":
                echoed[i] = True
                scored = event[1].prompt_logprobs
                yield _data(piece(i, echo, None, protocol.echoed_entries(jobs[i].ids, scored)))
            if event[0] == "chunk":
                if event[1].text or event[1].logprobs:
                    yield _data(piece(i, event[1].text, None, event[1].logprobs))
            elif event[0] == "error":  # after the headers: the error object as the stream's last event
                e = _as_api_error(event[1])
                yield _data({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}})
                return
            else:
                outcomes[i] = event[1]
                yield _data(piece(i, "", outcomes[i].finish_reason))
        if body.include_usage:
            use = choices_usage(len(jobs[0].ids), outcomes)
            yield _data(protocol.chat_chunk(rid, model, created, None, usage=use) if chat else
                        protocol.completion_usage_chunk(rid, model, created, use))
        yield "data: [DONE]\n\n"
    finally:
        for task in pumps + firsts:
            task.cancel()
        for job in jobs:
            job.cancel()


async def _pump(index: int, job: Job, first: asyncio.Future, merged: asyncio.Queue) -> None:
    """Job's events, from its `first` on, into `merged` with its choice's index, until its last (done or error)."""
    event = await first
    merged.put_nowait((index, event))
    while event[0] == "chunk":
        event = await job.next()
        merged.put_nowait((index, event))
