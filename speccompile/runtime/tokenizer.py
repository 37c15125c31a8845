"""Tokenizer and chat template from the bundle's tokenizer files, with `tokenizers` and jinja2 only.

A chat template is code that came with the bundle: it renders in jinja2's immutable sandbox, with the helpers
Hugging Face templates expect (as transformers sets them up), so a template can format messages but reach
nothing else: no attribute of Python's internals, no module, no file; within a deadline and bounds on what it
builds (runtime/template_sandbox.py).
"""
from __future__ import annotations

import json
import os
import re
import secrets

import jinja2
import tokenizers.decoders
from tokenizers import Tokenizer

from speccompile.errors import BundleError, SpeccompileError
from speccompile.runtime.template_sandbox import TEMPLATE_MAX_ITEMS, TEMPLATE_SECONDS, TemplateRefusal, \
    TemplateStopped, render, sandbox


class ChatTemplateError(SpeccompileError):
    """A chat template that fails, or that tries to leave jinja2's sandbox."""


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
        control = sorted((t.content for t in self.tok.get_added_tokens_decoder().values() if t.special), key=len)
        self._control_texts = re.compile("|".join(map(re.escape, control[::-1]))) if control else None
        self._control_ids = frozenset(self.tok.token_to_id(t) for t in control)
        self._plain = None  # a copy of the tokenizer that reads special tokens' texts as text, made on first use

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._encoding(text, add_special_tokens).ids

    def _encoding(self, text: str, add_special_tokens: bool = False):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate: valid JSON ("\\ud83d"), not text
            raise SpeccompileError(f"text is not valid Unicode: {e.reason} at character {e.start}") from None
        # encode_batch, even of one text, lets go of the GIL while it runs (encode holds it throughout): a long
        # text tokenized in one thread does not stall the others, such as a server's event loop
        return self.tok.encode_batch([text], add_special_tokens=add_special_tokens)[0]

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def token_bytes(self, token: int) -> bytes:
        """A token's own bytes (OpenAI's logprobs `bytes`): its text's UTF-8, but for a byte token (part of a
        character split over tokens, which alone decodes as U+FFFD) the bytes it stands for: byte fallback's
        <0xNN> piece, or a byte-level BPE piece's characters mapped back to their bytes."""
        text = self.decode([token])
        if "\ufffd" not in text:
            return text.encode()
        piece = self.tok.id_to_token(token) or ""
        byte = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
        if byte:
            return bytes([int(byte[1], 16)])
        if piece and all(c in _BYTE_LEVEL for c in piece):
            return bytes(_BYTE_LEVEL[c] for c in piece)
        return text.encode()

    def decode_stream(self):
        """An incremental decoder: `.step(self.tok, id)` returns the text the id completes (None while a character's
        bytes are still partial), decoding only a few trailing ids each time, or raises InvalidPrefix: `tokenizers`'
        DecodeStream, or the same prefix-offset method where the installed `tokenizers` predates it."""
        stream = getattr(tokenizers.decoders, "DecodeStream", None)
        return _CheckedDecodeStream(stream(skip_special_tokens=True)) if stream else PrefixOffsetDecoder()

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ChatTemplateError("this tokenizer has no chat template")
        # what transformers' apply_chat_template passes without tools or documents
        variables = {"bos_token": "", "eos_token": "", **self.special_tokens, "tools": None, "documents": None}
        try:
            return render(self._compile, _text_limit(messages), messages=messages,
                          add_generation_prompt=add_generation_prompt, **variables)
        except TemplateStopped as e:
            spent = "took too much memory" if "memory" in e.args else f"ran for more than {TEMPLATE_SECONDS:g} s"
            raise ChatTemplateError(f"the bundle's chat template {spent} and was stopped: do not trust this "
                                    "bundle") from None
        except TemplateRefusal as e:  # the messages' fault, not the bundle's: say what the template says
            raise ChatTemplateError(f"the model's chat template refuses this conversation: {e}") from None
        except jinja2.exceptions.SecurityError as e:
            raise ChatTemplateError(f"the bundle's chat template tried to leave jinja2's sandbox ({e}); "
                                    "nothing was run: do not trust this bundle") from None
        except Exception as e:  # a template is the bundle's data: whatever it raises, it is the bundle's fault
            raise ChatTemplateError(f"the bundle's chat template failed: {type(e).__name__}: {e}") from None

    def _compile(self) -> jinja2.Template:
        if self._compiled is None:
            self._compiled = sandbox().from_string(self.chat_template)
        return self._compiled

    def encode_chat(self, text: str) -> list[int]:
        if not self.chat_template:
            return self.encode(text, add_special_tokens=True)
        return self.encode_messages([{"role": "user", "content": text}])

    def encode_messages(self, messages: list[dict]) -> list[int]:
        """A conversation (system / user / assistant turns) through the chat template, ready for the answer.
        A special token's text inside a message (a user who types <|im_end|>) is spelled out as plain text, never
        read as that token: only the template's own markup opens and ends turns (transformers and llama.cpp read
        it as the token, so a message could end its own turn and write the next one)."""
        mark = f"\ufdd0{secrets.token_hex(8)}\ufdd1"  # a text no message holds: a fresh secret each time
        marked = [self._mark_control_texts(m, mark) for m in messages]
        if marked == messages:
            return self.encode(self.apply_chat_template(messages))
        text, literal = _unmark(self.apply_chat_template(marked), mark)
        enc, ids = self._encoding(text), []
        for token, (start, end), inside in zip(enc.ids, enc.offsets, _within_spans(enc.offsets, literal)):
            ids.extend(self._spelled(text[start:end]) if inside and token in self._control_ids else [token])
        return ids

    def _mark_control_texts(self, message: dict, mark: str) -> dict:
        """The message with each special token's text in its strings (but the role) between two marks."""
        if self._control_texts is None:
            return message
        return {key: self._control_texts.sub(lambda m: mark + m.group(0) + mark, value)
                if isinstance(value, str) and key != "role" else value for key, value in message.items()}

    def _spelled(self, text: str) -> list[int]:
        """text's ids as plain text, its special tokens' texts read as text."""
        if self._plain is None:
            plain = Tokenizer.from_str(self.tok.to_str())
            plain.encode_special_tokens = True
            self._plain = plain
        return self._plain.encode_batch([text], add_special_tokens=False)[0].ids


def _byte_level_chars() -> dict[str, int]:
    """Byte-level BPE's (GPT-2's) alphabet: the character that stands for each byte in its pieces, inverted."""
    shown = [*range(33, 127), *range(161, 173), *range(174, 256)]
    hidden = [b for b in range(256) if b not in shown]
    return {**{chr(b): b for b in shown}, **{chr(256 + i): b for i, b in enumerate(hidden)}}


_BYTE_LEVEL = _byte_level_chars()


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
        token = _token_str(cfg.get(key))
        if not isinstance(token, (str, type(None))):
            raise ValueError(f"{key} is neither a string nor a token object")
        if token is not None:
            token.encode("utf-8")  # a lone surrogate ("\\udcff" in the JSON) is no text the tokenizer can look up
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


def _unmark(text: str, mark: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text without the marks, and where in it the marked texts lie."""
    pieces = text.split(mark)
    if len(pieces) % 2 == 0:  # a template that cut a marked text apart: which side is the message's is unknown
        raise ChatTemplateError("the bundle's chat template cut a special token's text in a message apart")
    spans, at = [], 0
    for i, piece in enumerate(pieces):
        if i % 2:
            spans.append((at, at + len(piece)))
        at += len(piece)
    return "".join(pieces), spans


def _within_spans(offsets, spans):
    """For each (start, end) of offsets (in order), whether it overlaps one of spans (in order): one pass."""
    k = 0
    for start, end in offsets:
        while k < len(spans) and spans[k][1] <= start:
            k += 1
        yield k < len(spans) and spans[k][0] < end


def _text_limit(messages) -> int:
    """The most characters a chat template may render: a turn's markup on top of the messages' own text."""
    try:
        size = len(json.dumps(messages, default=str))
    except (TypeError, ValueError, RecursionError):
        size = 0
    return TEMPLATE_MAX_ITEMS + 4 * size


def _token_str(t):
    return t.get("content") if isinstance(t, dict) else t
