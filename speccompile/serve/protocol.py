"""The OpenAI request bodies the server accepts (pydantic, strict types, unknown fields refused by name) and the
response objects it returns: chat.completion, chat.completion.chunk, text_completion."""
from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from speccompile.runtime.logprobs import MAX_TOP_LOGPROBS, TokenLogprob
from speccompile.runtime.text_stream import TextStream

# Fields clients send with their neutral value by default: accepted (and dropped) at that value; any other value
# is refused like any unsupported field, by name.
NEUTRAL = {"presence_penalty": 0, "frequency_penalty": 0, "logprobs": False, "echo": False, "best_of": 1,
           "logit_bias": {}, "parallel_tool_calls": True, "store": False, "metadata": {},
           "response_format": {"type": "text"}}


def _neutral(key: str, value) -> bool:
    """`value` is `key`'s neutral value: numbers compared as numbers (0.0 is 0), a bool only with a bool."""
    neutral = NEUTRAL[key]
    number = (int, float)
    if isinstance(neutral, number) and not isinstance(neutral, bool):
        return isinstance(value, number) and not isinstance(value, bool) and value == neutral
    return type(value) is type(neutral) and value == neutral


# OpenAI's bound on n; the server's --max-queue bounds it too (every choice holds a place)
MAX_CHOICES = 128


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data):
        """A field sent as null is a field not sent, in a message as at the top: the openai client's
        `message.model_dump()`, appended to the next request's messages, carries `refusal: null`,
        `tool_calls: null` and the like. A required field's null stays, refused as the wrong type it is."""
        if isinstance(data, dict):
            required = {k for k, f in cls.model_fields.items() if f.is_required()}
            data = {k: v for k, v in data.items() if v is not None or k in required}
        return data


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def as_dict(self) -> dict:
        """The message the chat template reads: OpenAI's "developer" is the system role; text parts joined by
        newlines, as vLLM and TensorRT-LLM join them; a participant's `name` passed on as vLLM does (templates that
        know it render it, the others ignore it)."""
        text = self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)
        message = {"role": "system" if self.role == "developer" else self.role, "content": text}
        return message if self.name is None else {**message, "name": self.name}


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0)  # OpenAI's default; 0 is greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)  # an extension, as vLLM's: 0 (or vLLM's -1) is off
    min_p: float = Field(0.0, ge=0.0, le=1.0)  # an extension, as vLLM's (after temperature): 0 is off
    seed: int | None = Field(None, ge=0, lt=2**64)
    stop: str | Annotated[list[str], Field(max_length=16)] | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)  # choices: each a request of its own to the runtime (choice_kwargs)
    user: str | None = None
    speculate: bool = True  # an extension: False decodes without drafting (same output, the baseline's speed)
    ignore_eos: bool = False  # an extension, as vLLM's: generate max_tokens whatever end-of-sequence tokens come
    stop_token_ids: Annotated[list[int], Field(max_length=64)] | None = None  # an extension, as vLLM's
    # extensions: typical acceptance, lossy and opt-in (runtime/sampling.py SamplingParams); greedy stays exact
    acceptance: Literal["exact", "typical"] = "exact"
    typical_epsilon: float = Field(0.09, gt=0.0, le=1.0)
    typical_alpha: float = Field(0.3, gt=0.0, le=1.0)

    @model_validator(mode="before")
    @classmethod
    def _drop_neutral(cls, data):
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if not (k in NEUTRAL and _neutral(k, v))}
        return data

    def stream_kwargs(self) -> dict:
        """Generator.stream's keywords for these settings."""
        return dict(temperature=float(self.temperature), top_p=float(self.top_p), top_k=max(self.top_k, 0),
                    min_p=float(self.min_p), seed=self.seed,
                    stop=(self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ()),
                    speculate=self.speculate, acceptance=self.acceptance_rule, ignore_eos=self.ignore_eos,
                    stop_token_ids=tuple(self.stop_token_ids or ()), logprobs=self.logprobs_asked)

    def choice_kwargs(self) -> list[dict]:
        """Generator.stream's keywords for each of the n choices. With a seed, choice i samples from seed + i: one
        seed for all would give n copies of one answer (vLLM's choices differ too); the request's answers are
        reproducible as a whole. Greedy choices are all alike, as they are in vLLM and OpenAI."""
        one = self.stream_kwargs()
        if self.seed is None:
            return [one] * self.n
        return [{**one, "seed": (self.seed + i) % 2**64} for i in range(self.n)]

    @property
    def acceptance_rule(self) -> str:
        """Generator.stream's acceptance: "exact", or "typical:EPS,ALPHA"."""
        if self.acceptance == "exact":
            return "exact"
        return f"typical:{float(self.typical_epsilon)!r},{float(self.typical_alpha)!r}"

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @property
    def logprobs_asked(self) -> int | None:
        """Generator.stream's logprobs: None, or how many likeliest tokens to list beside each token's own."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def token_limit_field(self) -> str | None:
        """The field the client set token_limit with; None: it sent neither."""
        return "max_completion_tokens" if self.max_completion_tokens else "max_tokens" if self.max_tokens else None


class CompletionRequest(_Sampling):
    # OpenAI also takes a list of prompts; one prompt per request here, so a list of one (as some clients send:
    # lm-evaluation-harness a list of one list of token ids)
    prompt: (str | list[int] | Annotated[list[str], Field(min_length=1, max_length=1)]
             | Annotated[list[list[int]], Field(min_length=1, max_length=1)])
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # OpenAI's legacy form: how many likeliest
    echo: bool = False  # the prompt before the completion, in the text and (with logprobs) in the logprobs

    @property
    def logprobs_asked(self) -> int | None:
        return self.logprobs

    def stream_kwargs(self) -> dict:
        """With echo and logprobs, the prompt's tokens' logprobs too (the runtime's prompt_logprobs)."""
        scored = self.echo and self.logprobs is not None
        return {**super().stream_kwargs(), **({"prompt_logprobs": self.logprobs} if scored else {})}

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens

    @property
    def token_limit_field(self) -> str | None:
        """"max_tokens" if the client sent it; None: the default of 16 applies."""
        return "max_tokens" if "max_tokens" in self.model_fields_set else None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def chat_completion(rid: str, model: str, answers: list[tuple[str, str, dict | None]], usage: dict) -> dict:
    """answers: each choice's (text, finish_reason, logprobs: chat_logprobs' or None)."""
    choices = [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                "finish_reason": finish} for i, (text, finish, logprobs) in enumerate(answers)]
    return {"id": rid, "object": "chat.completion", "created": now(), "model": model, "choices": choices,
            "usage": usage}


def chat_chunk(rid: str, model: str, created: int, delta: dict | None, finish: str | None = None,
               usage: dict | None = None, index: int = 0, logprobs: dict | None = None) -> dict:
    """A chat.completion.chunk of choice `index`; delta None: the usage-only chunk after the last choice (choices
    empty). Every chunk of a stream carries the stream's `created`, as OpenAI's do."""
    choices = [] if delta is None else [{"index": index, "delta": delta, "logprobs": logprobs,
                                         "finish_reason": finish}]
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices,
            "usage": usage}


def completion(rid: str, model: str, answers: list[tuple[str, str | None, dict | None]], usage: dict | None,
               created: int | None = None, first_index: int = 0) -> dict:
    """A text_completion: the whole answers (each choice's text, finish_reason and completion_logprobs' or None),
    or (streamed, with the stream's `created`) one piece of choice `first_index`'s."""
    choices = [{"index": first_index + i, "text": text, "logprobs": logprobs, "finish_reason": finish}
               for i, (text, finish, logprobs) in enumerate(answers)]
    return {"id": rid, "object": "text_completion", "created": now() if created is None else created, "model": model,
            "choices": choices, "usage": usage}


def chat_logprobs(entries: list | None, text_of, bytes_of) -> dict | None:
    """A chat choice's logprobs from the runtime's (runtime/logprobs.TokenLogprob per token); text_of: a token's
    text; bytes_of: its own bytes (a byte token's byte, not its lone text's U+FFFD: joined, they are the text's
    UTF-8, as OpenAI gives them)."""
    if entries is None:
        return None

    def item(token: int, logprob: float) -> dict:
        return {"token": text_of(token), "logprob": logprob, "bytes": list(bytes_of(token))}
    return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, v) for t, v in e.top]}
                        for e in entries], "refusal": None}


def completion_logprobs(entries: list | None, text_of, offsets: TextOffsets) -> dict | None:
    """A text completion's logprobs (OpenAI's legacy form); offsets: the choice's TextOffsets, which a stream's
    later pieces go on with. An echoed prompt's first token has no log-probability: null, as OpenAI's."""
    if entries is None:
        return None
    return {"tokens": [text_of(e.token) for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [None if e.top is None else {text_of(t): v for t, v in e.top} for e in entries],
            "text_offset": offsets.starts([e.token for e in entries])}


def echoed_entries(ids: list[int], scored: list | None) -> list | None:
    """An echoed prompt's logprobs entries: the runtime's prompt_logprobs (None first), the first token's without
    a log-probability."""
    if scored is None:
        return None
    return [TokenLogprob(ids[0], None, None), *scored[1:]]


class TextOffsets:
    """Where each token of a choice begins in its text (text_offset), the tokens decoded in order by the runtime's
    TextStream, as the text was: a token that ends inside a character (a byte token) begins where that character
    does. Summing the tokens' lone texts would count a U+FFFD for each such byte token, past the text's own
    characters."""

    def __init__(self, tokenizer):
        self.stream = TextStream(tokenizer)

    def starts(self, tokens: list[int]) -> list[int]:
        out = []
        for token in tokens:
            out.append(len(self.stream.text))
            self.stream.add(token)
        return out


def completion_usage_chunk(rid: str, model: str, created: int, usage: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [], "usage": usage}


def model_card(model: str, created: int) -> dict:
    return {"id": model, "object": "model", "created": created, "owned_by": "speccompile"}


def model_list(model: str, created: int) -> dict:
    return {"object": "list", "data": [model_card(model, created)]}
