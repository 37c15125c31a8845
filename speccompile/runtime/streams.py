"""What `Generator.stream` returns and `generate` gives back: a stream of chunks ending in a GenerationResult."""
from __future__ import annotations

import dataclasses
import time

from speccompile.runtime.text_stream import Chunk

CANCEL_POLL_S = 0.05  # how often a request waiting for its turn looks whether it was cancelled


@dataclasses.dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    stats: dict  # SpecDecodeStats.as_dict(): timing, passes, acceptance
    # why the output ended, as OpenAI and vLLM name it: "stop" (an end-of-sequence token or a stop string),
    # "length" (max_new_tokens reached), "cancelled" (SubmittedStream.cancel)
    finish_reason: str = "stop"
    logprobs: list | None = None  # logprobs=K: per token, a runtime/logprobs.TokenLogprob
    # prompt_logprobs=K: per prompt token, None for the first (nothing before it to predict it), then TokenLogprobs
    prompt_logprobs: list | None = None


def finish_reason(token_ids: list[int], max_new_tokens: int, eos_token_ids, cancelled: bool) -> str:
    """The finish reason of an output that ended with token_ids (cut at a stop string, which then drops the token
    it completes, so a cut output is always short of max_new_tokens)."""
    if cancelled:
        return "cancelled"
    ended = bool(token_ids) and token_ids[-1] in eos_token_ids
    return "length" if len(token_ids) >= max_new_tokens and not ended else "stop"


def handed_out(delta: str, token_ids: list[int], on_text, logprobs: list | None = None, first: int = 0) -> Chunk:
    """The chunk a stream hands out now, its text told to on_text first (if there is text and an on_text); with
    the request's logprobs, those of its tokens (the output's from index `first` on)."""
    if on_text and delta:
        on_text(delta)
    return Chunk(delta, token_ids, None if logprobs is None else logprobs[first:first + len(token_ids)])


def drain(stream) -> GenerationResult:
    """Run a stream to its end; its GenerationResult."""
    while True:
        try:
            next(stream)
        except StopIteration as stop:
            return stop.value


class OwnLoop:
    """The handle of a request its caller's own decode loop runs (Generator._serialized), as a scheduler's Handle
    is a submitted one's: cancel(), from any thread, ends its passes before the next one; produced_at, when the
    pass that committed the last list yielded ran."""
    cancelled = False
    produced_at: float | None = None

    def cancel(self) -> None:
        self.cancelled = True

    def acquire(self, lock) -> bool:
        """Take `lock` (the Generator's, which the generation ahead of this one holds), unless this request is
        cancelled while it waits: False, and the lock is not taken. cancel() cannot wake a waiting thread, so the
        wait looks at it every CANCEL_POLL_S."""
        while not lock.acquire(timeout=CANCEL_POLL_S):
            if self.cancelled:
                return False
        return True

    def passes(self, steps):
        """steps' passes (each one run when asked for) until cancelled."""
        while not self.cancelled:
            new = next(steps, None)
            if new is None:
                return
            self.produced_at = time.perf_counter()
            yield new


class SubmittedStream:
    """The chunks of a request already handed to the scheduler (runtime/slots.py Handle), or of one its caller's
    own loop runs (OwnLoop), with cancel() either way. A generator closed or
    dropped before its first read never runs its body, so its `finally` could not cancel the request: this one
    cancels on close() and when dropped, so the request's slot is freed either way."""

    def __init__(self, chunks, handle):
        self._chunks, self._handle = chunks, handle

    def __iter__(self):
        return self

    def __next__(self):
        return self._ended_on_failure(next, self._chunks)

    def send(self, value):
        return self._ended_on_failure(self._chunks.send, value)

    def throw(self, *args):
        return self._ended_on_failure(self._chunks.throw, *args)

    def _ended_on_failure(self, step, *args):
        """step(*args); if it raises (the request failed, or its own on_text did), the request ends here: the
        exception's traceback holds the stream's frames, so neither closing nor collecting them would free the
        slot while the caller keeps the exception (a Future does)."""
        try:
            return step(*args)
        except StopIteration:
            raise
        except BaseException:
            self.close()
            raise

    def cancel(self) -> None:
        """Cancel the request from any thread (close() belongs to the thread reading): it ends before its next
        pass, at once if it still waits for a slot, and its stream then returns what it had."""
        self._handle.cancelled = True  # only marked: the reader's next round ends it

    def close(self) -> None:
        self._chunks.close()  # a started stream cancels its handle here (Handle.passes)
        if not self._handle.cancelled:
            self._handle.cancel()

    def __del__(self):
        # only marked: the next round frees the slot (a finalizer may run inside the scheduler's own lock)
        self._handle.cancelled = True
