"""Tokenizer and chat template from the bundle's tokenizer files, with `tokenizers` and jinja2 only.

A chat template is code that came with the bundle: it renders in jinja2's immutable sandbox, with the helpers
Hugging Face templates expect (as transformers sets them up), so a template can format messages but reach
nothing else: no attribute of Python's internals, no module, no file.
"""
from __future__ import annotations

import datetime
import json
import os

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers.decoders
from tokenizers import Tokenizer

from speccompile.errors import SpeccompileError


class ChatTemplateError(SpeccompileError):
    """A chat template that fails, or that tries to leave jinja2's sandbox."""


class BundleTokenizer:
    def __init__(self, directory: str, eos_token_ids=()):
        self.tok = Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
        cfg = {}
        p = os.path.join(directory, "tokenizer_config.json")
        if os.path.isfile(p):
            with open(p) as f:
                cfg = json.load(f)
        template = cfg.get("chat_template")
        p = os.path.join(directory, "chat_template.jinja")
        if os.path.isfile(p):
            with open(p) as f:
                template = f.read()
        self.chat_template = template
        self._compiled = None  # the template, compiled on first use
        self.bos_token = _token_str(cfg.get("bos_token"))
        self.eos_token = _token_str(cfg.get("eos_token"))
        eos = set(eos_token_ids)
        if self.eos_token and self.tok.token_to_id(self.eos_token) is not None:
            eos.add(self.tok.token_to_id(self.eos_token))
        self.eos_token_ids = frozenset(eos)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate: valid JSON ("\\ud83d"), not text
            raise SpeccompileError(f"text is not valid Unicode: {e.reason} at character {e.start}") from None
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def decode_stream(self):
        """An incremental decoder: `.step(self.tok, id)` returns the text the id completes (None while a character's
        bytes are still partial), decoding only a few trailing ids each time: `tokenizers`' DecodeStream, or the
        same prefix-offset method where the installed `tokenizers` predates it."""
        stream = getattr(tokenizers.decoders, "DecodeStream", None)
        return stream(skip_special_tokens=True) if stream else PrefixOffsetDecoder()

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ChatTemplateError("this tokenizer has no chat template")
        try:
            if self._compiled is None:
                self._compiled = _sandbox().from_string(self.chat_template)
            return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token or "", eos_token=self.eos_token or "")
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
        self.prefix, self.read = self.read, len(self.ids)
        return now[len(before):]


class _Sandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
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
