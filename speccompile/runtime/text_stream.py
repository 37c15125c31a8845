"""The output as text while it is generated: incremental detokenization and stop strings.

Text is decoded a token at a time (the tokenizer's incremental decoder), never the whole output again. Text that
could still become a stop string is held back until it cannot; at a stop string the text ends where the stop
string begins, and the tokens end with the last one whose text lies wholly before it.
"""
from __future__ import annotations

import dataclasses

from speccompile.runtime.tokenizer import BundleTokenizer, InvalidPrefix


@dataclasses.dataclass
class Chunk:
    """What one verify pass added: the text now certain, and the token ids committed (both cut at a stop)."""
    text: str
    token_ids: list[int]
    logprobs: list | None = None  # logprobs=K: per token, a runtime/logprobs.TokenLogprob
    prompt_logprobs: list | None = None  # prompt_logprobs=K, on a stream's first chunk: GenerationResult's


class TextStream:
    def __init__(self, tokenizer: BundleTokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer, self.decoder = tokenizer, tokenizer.decode_stream()
        self.stop = tuple(s for s in stop if s)
        self.longest = max(map(len, self.stop), default=0)
        self.text = ""  # the text decoded so far
        self.ends: list[int] = []  # per token whose text is complete: len(self.text) after it
        self.tokens = 0  # tokens added
        self.emitted = 0  # characters handed out
        self.given = 0  # tokens handed out
        self.stop_at: int | None = None  # where the first stop string begins
        self.partial: list[int] = []  # the tokens added since the last text: a character's first bytes, say

    def add(self, token: int) -> bool:
        """Decode one more token; True once a stop string is complete."""
        self.tokens += 1
        self.partial.append(token)
        try:
            piece = self.decoder.step(self.tokenizer.tok, token)
        except InvalidPrefix:
            piece = self._decode_afresh()
        if piece is None:  # a partial character: its tokens get the end of the text that completes it
            return False
        self.partial.clear()
        start = max(0, len(self.text) - self.longest + 1)
        self.text += piece
        self.ends += [len(self.text)] * (self.tokens - len(self.ends))
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.stop_at = min(hits)
        return bool(hits)

    def _decode_afresh(self) -> str | None:
        """The text handed out stands; decoding starts again at the tokens whose text is not out yet, not at the
        newest token alone (as vLLM recovers): their bytes, which no longer form a character, show as U+FFFD each
        (as the whole output decodes them), and the newest token is not a text's first, whose leading space a
        sentencepiece decoder strips."""
        self.decoder = self.tokenizer.decode_stream()
        try:
            pieces = [self.decoder.step(self.tokenizer.tok, t) for t in self.partial]
        except InvalidPrefix:  # not seen with byte fallback; the newest token alone then
            self.decoder = self.tokenizer.decode_stream()
            pieces = [self.decoder.step(self.tokenizer.tok, self.partial[-1])]
        return "".join(p for p in pieces if p) or None

    def kept_tokens(self) -> int:
        """How many of the added tokens the output keeps: all, or those wholly before the stop string."""
        if self.stop_at is None:
            return self.tokens
        return sum(1 for end in self.ends if end <= self.stop_at)

    def certain(self) -> tuple[str, int]:
        """The text not handed out yet that no stop string can still claim, and how many more tokens that text
        completes (a token is handed out with the last of its text)."""
        end = self.stop_at if self.stop_at is not None else len(self.text) - self._open_stop_prefix()
        out = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return out, self._tokens_until(self.emitted)

    def finish(self, token_ids: list[int]) -> tuple[str, str, int]:
        """At the end of the output (token_ids, all added; cut here, in place, to the kept tokens): the final text,
        the part of it not handed out yet, and the number of tokens not handed out yet. Without a stop string the
        final text is the tokens decoded at once (a partial character left at the end decodes as U+FFFD, as it
        would alone), unless that no longer begins with the text handed out: with byte fallback, byte tokens
        already decoded as characters decode as U+FFFD each once later bytes join them in a run that is not
        UTF-8. Then the text handed out stands, and the final text is the text decoded so far and the tokens still
        partial. A stop string in the text only this adds (a U+FFFD) ends the output there too."""
        if self.stop_at is not None:
            final = self.text[:self.stop_at]
        else:
            final = self.tokenizer.decode(token_ids)
            if not final.startswith(self.text[:self.emitted]):
                final = self.text + self.tokenizer.decode(token_ids[len(self.ends):])
            hits = [i for i in (final.find(s, self.emitted) for s in self.stop) if i >= 0]
            if hits:  # the partial tokens, which this text completes, are not kept: they end after the stop begins
                self.stop_at = min(hits)
                final = final[:self.stop_at]
        del token_ids[self.kept_tokens():]
        rest = final[self.emitted:]
        self.emitted = len(final)
        rest_tokens = len(token_ids) - self.given
        self.given = len(token_ids)
        return final, rest, rest_tokens

    def _tokens_until(self, end: int) -> int:
        before = self.given
        while self.given < len(self.ends) and self.ends[self.given] <= end:
            self.given += 1
        return self.given - before

    def _open_stop_prefix(self) -> int:
        """Length of the longest end of the text that begins some stop string (that could still complete it).
        Only ends within the text not handed out yet can: one that began earlier began a stop string then too (the
        text only grows), so it was held back. A client's stop string of a million characters would otherwise
        cost a scan of the whole output at every pass."""
        for n in range(min(self.longest - 1, len(self.text) - self.emitted), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0
