"""Tokenizer and chat template from the bundle's tokenizer files, with `tokenizers` and jinja2 only."""
from __future__ import annotations

import json
import os

from tokenizers import Tokenizer


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
        self.bos_token = _token_str(cfg.get("bos_token"))
        self.eos_token = _token_str(cfg.get("eos_token"))
        eos = set(eos_token_ids)
        if self.eos_token and self.tok.token_to_id(self.eos_token) is not None:
            eos.add(self.tok.token_to_id(self.eos_token))
        self.eos_token_ids = frozenset(eos)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        import jinja2
        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    def encode_chat(self, text: str) -> list[int]:
        if not self.chat_template:
            return self.encode(text, add_special_tokens=True)
        return self.encode(self.apply_chat_template([{"role": "user", "content": text}]))


def _token_str(t):
    return t.get("content") if isinstance(t, dict) else t


def _raise(msg):
    raise ValueError(msg)
