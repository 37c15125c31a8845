"""Tokenizer and chat template from the bundle's tokenizer files, with `tokenizers` and jinja2 only.

A chat template is code that came with the bundle: it renders in jinja2's immutable sandbox, with the helpers
Hugging Face templates expect (as transformers sets them up), so a template can format messages but reach
nothing else: no attribute of Python's internals, no module, no file.
"""
from __future__ import annotations

import ctypes
import datetime
import json
import os
import threading

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers.decoders
from tokenizers import Tokenizer

from speccompile.errors import BundleError, SpeccompileError


class ChatTemplateError(SpeccompileError):
    """A chat template that fails, or that tries to leave jinja2's sandbox."""


# A chat template renders in milliseconds; one still running after this long loops on purpose (jinja2's sandbox
# bounds what a template may touch, not how long it runs). And the most items its * may build.
TEMPLATE_SECONDS = 5.0
TEMPLATE_MAX_ITEMS = 1 << 22


class _TemplateTimeout(BaseException):  # not an Exception: jinja2's own handlers pass it through
    pass


class InvalidPrefix(Exception):
    """The ids decoded so far no longer begin with the text already decoded: with byte fallback, byte tokens that
    decoded as a character can join later ones in a run that is not UTF-8, and then decode as U+FFFD each."""


# The named special tokens transformers hands a chat template (SPECIAL_TOKENS_ATTRIBUTES)
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class BundleTokenizer:
    def __init__(self, directory: str, eos_token_ids=()):
        try:
            self.tok, cfg, template = _read_tokenizer_files(directory)
        except Exception as e:  # noqa: BLE001 - the bundle's files, whatever is wrong with them
            raise BundleError(f"{directory}: unreadable tokenizer files ({type(e).__name__}: {e})"[:400]) from None
        self.chat_template = template
        self._compiled = None  # the template, compiled on first use
        self.special_tokens = {key: _token_str(cfg[key]) for key in SPECIAL_TOKENS if _token_str(cfg.get(key))}
        self.bos_token = self.special_tokens.get("bos_token")
        self.eos_token = self.special_tokens.get("eos_token")
        eos = set(eos_token_ids)
        if self.eos_token and self.tok.token_to_id(self.eos_token) is not None:
            eos.add(self.tok.token_to_id(self.eos_token))
        self.eos_token_ids = frozenset(eos)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate: valid JSON ("\\ud83d"), not text
            raise SpeccompileError(f"text is not valid Unicode: {e.reason} at character {e.start}") from None
        # encode_batch, even of one text, lets go of the GIL while it runs (encode holds it throughout): a long
        # text tokenized in one thread does not stall the others, such as a server's event loop
        return self.tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def decode_stream(self):
        """An incremental decoder: `.step(self.tok, id)` returns the text the id completes (None while a character's
        bytes are still partial), decoding only a few trailing ids each time, or raises InvalidPrefix: `tokenizers`'
        DecodeStream, or the same prefix-offset method where the installed `tokenizers` predates it."""
        stream = getattr(tokenizers.decoders, "DecodeStream", None)
        return _CheckedDecodeStream(stream(skip_special_tokens=True)) if stream else PrefixOffsetDecoder()

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ChatTemplateError("this tokenizer has no chat template")
        try:
            if self._compiled is None:
                self._compiled = _sandbox().from_string(self.chat_template)
            # what transformers' apply_chat_template passes without tools or documents
            variables = {"bos_token": "", "eos_token": "", **self.special_tokens, "tools": None, "documents": None}
            return _within(TEMPLATE_SECONDS, lambda: self._compiled.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **variables))
        except _TemplateTimeout:
            raise ChatTemplateError(f"the bundle's chat template ran for more than {TEMPLATE_SECONDS:g} s and was "
                                    "stopped: do not trust this bundle") from None
        except jinja2.exceptions.SecurityError as e:
            raise ChatTemplateError(f"the bundle's chat template tried to leave jinja2's sandbox ({e}); "
                                    "nothing was run: do not trust this bundle") from None
        except Exception as e:  # a template is the bundle's data: whatever it raises, it is the bundle's fault
            raise ChatTemplateError(f"the bundle's chat template failed: {type(e).__name__}: {e}") from None

    def encode_chat(self, text: str) -> list[int]:
        if not self.chat_template:
            return self.encode(text, add_special_tokens=True)
        return self.encode_messages([{"role": "user", "content": text}])

    def encode_messages(self, messages: list[dict]) -> list[int]:
        """A conversation (system / user / assistant turns) through the chat template, ready for the answer."""
        return self.encode(self.apply_chat_template(messages))


class PrefixOffsetDecoder:
    """Incremental detokenization by prefix offsets (as text-generation-inference does): decode the ids from
    `prefix` on with and without the new ones; the difference is the new text, once it ends in a whole character."""

    def __init__(self):
        self.ids: list[int] = []
        self.prefix = self.read = 0

    def step(self, tok: Tokenizer, token: int) -> str | None:
        self.ids.append(token)
        before = tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        now = tok.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return None
        if not now.startswith(before):
            raise InvalidPrefix(f"{now!r} does not begin with {before!r}")
        self.prefix, self.read = self.read, len(self.ids)
        return now[len(before):]


class _CheckedDecodeStream:
    """`tokenizers`' DecodeStream, its invalid prefix raised as InvalidPrefix (it raises a plain Exception)."""

    def __init__(self, stream):
        self.stream = stream

    def step(self, tok: Tokenizer, token: int) -> str | None:
        try:
            return self.stream.step(tok, token)
        except Exception as e:
            if "Invalid prefix" in str(e):
                raise InvalidPrefix(str(e)) from None
            raise


def _read_tokenizer_files(directory: str):
    """tokenizer.json, tokenizer_config.json (a JSON object, if present) and the chat template. Special tokens
    in special_tokens_map.json count as transformers reads them: over tokenizer_config.json's, unless that one
    lists added_tokens_decoder (newer saves, whose tokenizer_config.json transformers reads alone)."""
    tok = Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
    cfg, special = _json_object(directory, "tokenizer_config.json"), _json_object(directory, "special_tokens_map.json")
    template = cfg.get("chat_template")
    p = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(p):
        with open(p, encoding="utf-8") as f:
            template = f.read()
    if "added_tokens_decoder" not in cfg:
        cfg = {**cfg, **{key: special[key] for key in SPECIAL_TOKENS if key in special}}
    for key in SPECIAL_TOKENS:
        if not isinstance(_token_str(cfg.get(key)), (str, type(None))):
            raise ValueError(f"{key} is neither a string nor a token object")
    if isinstance(template, list):
        template = _default_template(template)
    if not isinstance(template, (str, type(None))):
        raise ValueError("chat_template is not a string")
    return tok, cfg, template


def _default_template(named: list) -> str:
    """Of several chat templates, saved by transformers as [{"name": ..., "template": ...}, ...] (a default and,
    say, a tool_use one), the one transformers applies when none is named: "default"."""
    if not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in named):
        raise ValueError("chat_template is a list, but not of {name, template} objects")
    templates = {t["name"]: t.get("template") for t in named}
    if "default" not in templates:
        raise ValueError(f"chat_template names templates {', '.join(templates)}, none of them 'default'")
    return templates["default"]


def _json_object(directory: str, name: str) -> dict:
    p = os.path.join(directory, name)
    if not os.path.isfile(p):
        return {}
    with open(p, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{name} is not a JSON object")
    return data


def _within(seconds: float, render):
    """render() in this thread, interrupted by _TemplateTimeout raised into it after `seconds`."""
    tid, lock, state = ctypes.c_ulong(threading.get_ident()), threading.Lock(), {"done": False, "fired": False}

    def fire():
        with lock:
            if not state["done"]:
                state["fired"] = True
                ctypes.pythonapi.PyThreadState_SetAsyncExc(tid, ctypes.py_object(_TemplateTimeout))
    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        return render()
    finally:
        with lock:
            state["done"] = True
            if state["fired"]:  # raised already, or still pending: never later, elsewhere
                ctypes.pythonapi.PyThreadState_SetAsyncExc(tid, None)
        timer.cancel()


class _Sandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context, operator, left, right):
        """* and ** that would build a huge sequence or number are refused: one C call, no deadline stops it."""
        if operator == "*":
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > TEMPLATE_MAX_ITEMS:
                raise jinja2.exceptions.TemplateRuntimeError(f"a sequence of {len(seq) * n} items is too long")
        elif isinstance(left, int) and isinstance(right, int) and abs(right) > 4096:
            raise jinja2.exceptions.TemplateRuntimeError(f"an exponent of {right} is too large")
        return super().call_binop(context, operator, left, right)

    def unsafe_undefined(self, obj, attribute):
        """Refuse an unsafe attribute (__class__, __globals__, ...) at once: jinja2's default hands back an
        undefined value that renders as "" and fails only when used further, so a probe would pass unnoticed."""
        raise jinja2.exceptions.SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} "
                                              "object is unsafe")


def _sandbox() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    """The environment transformers renders chat templates in (its AssistantTracker extension aside)."""
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = _strftime_now
    return env


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _token_str(t):
    return t.get("content") if isinstance(t, dict) else t


def _raise(msg):
    raise jinja2.exceptions.TemplateError(msg)
