"""Runs requests against one Generator: each admitted request's `Generator.stream` in a thread of its own (a stream
belongs to the thread that started it), its chunks handed to the event loop through an asyncio queue.

Admission is bounded: at most `max_queue` requests are in the server at once (waiting or generating); past that a
request is refused at once (429). A cancelled request (its client gone, or the server stopping) stops after the
verify pass under way and closes its stream, which frees its place in the Generator for the next one. Whether
concurrent streams run one after another or share passes is the Generator's business, not this module's.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from speccompile.errors import SpeccompileError
from speccompile.serve.api_errors import busy, from_runtime, shutting_down
from speccompile.serve.metrics import Metrics

log = logging.getLogger("speccompile.serve")
RETRY_AFTER_S = 1
CANCELLED_LET_GO_S = 1.0  # a cancelled request's worker lets go at the end of its pass under way


@dataclasses.dataclass
class Outcome:
    """How a request ended: its tokens, its text, the runtime's stats (empty if cancelled), OpenAI's
    finish_reason ("stop", "length", or "cancelled") and the tokens' logprobs where asked for."""
    token_ids: list[int]
    text: str
    stats: dict
    finish_reason: str
    logprobs: list | None = None
    prompt_logprobs: list | None = None  # echo with logprobs: the runtime's prompt_logprobs


class Job:
    """One request: the worker thread puts ("chunk", Chunk), then ("error", exception) or ("done", Outcome)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, ids: list[int], max_new_tokens: int, kwargs: dict):
        self.loop, self.ids, self.max_new_tokens, self.kwargs = loop, ids, max_new_tokens, kwargs
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.arrival = time.perf_counter()
        self.stream = None  # the Generator's stream, once the worker opened it

    def put(self, kind: str, value) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone (the server stopped): nobody is listening
            pass

    async def next(self) -> tuple[str, object]:
        return await self.events.get()

    def cancel(self) -> None:
        """From any thread. The worker sees it between chunks; a request still waiting for a sequence slot (the
        worker blocked reading its first chunk) is cancelled in the Generator too, or it would wait for a slot and
        run its prefill for nobody, holding its place in the queue."""
        self.cancelled.set()
        cancel = getattr(self.stream, "cancel", None)  # None until the worker has opened the stream
        if cancel is not None:
            cancel()


def _stats_when_cancelled(stream) -> dict:
    """A cancelled request's runtime stats (its prompt's cache hits, its passes), for /metrics: its stream, told to
    end, read to its result (it ends at its next read; a few reads at most hand out the text it held back)."""
    if stream is None or not hasattr(stream, "cancel"):
        return {}
    stream.cancel()
    try:
        for _ in range(4):
            next(stream)
    except StopIteration as stop:
        return getattr(stop.value, "stats", None) or {}
    except Exception:  # noqa: BLE001 - its client is gone: a failure here only leaves the figures out
        pass
    return {}


class Runner:
    def __init__(self, gen, metrics: Metrics, max_queue: int = 64):
        if max_queue < 1:
            raise SpeccompileError(f"--max-queue {max_queue}: must be at least 1")
        self.gen, self.metrics, self.max_queue = gen, metrics, max_queue
        self._pool = ThreadPoolExecutor(max_queue, thread_name_prefix="speccompile-request")
        self._lock = threading.Lock()
        self._jobs: set[Job] = set()
        self._idle = threading.Condition(self._lock)
        self.accepting = True
        self.stopped_at = 0.0  # time.monotonic() when admitting stopped

    @property
    def in_flight(self) -> int:
        return len(self._jobs)

    def submit(self, ids: list[int], max_new_tokens: int, kwargs: dict) -> Job:
        """Admit a request (APIError 429 past the bound, 503 while stopping) and start it."""
        return self.submit_choices(ids, max_new_tokens, [kwargs])[0]

    def submit_choices(self, ids: list[int], max_new_tokens: int, choices: list[dict]) -> list[Job]:
        """Admit a request of several choices (each stream's keywords), all or none: each holds a place."""
        loop = asyncio.get_running_loop()
        jobs = [Job(loop, ids, max_new_tokens, kwargs) for kwargs in choices]
        with self._lock:
            if not self.accepting:
                raise shutting_down()
            if len(self._jobs) + len(jobs) > self.max_queue:
                self.metrics.refused.labels(self.metrics.model, "429").inc()
                raise busy(RETRY_AFTER_S)
            for job in jobs:
                self._jobs.add(job)
                self.metrics.waiting.inc()
                # under the lock: a shutdown between the two cancelled the job before its worker existed, then shut
                # the pool, and this submit raised (a 500), leaving the job counted in flight for good
                self._pool.submit(self._work, job)
        return jobs

    def _work(self, job: Job) -> None:
        tokens, text, first_at, outcome, stream, error = [], [], None, None, None, None
        try:
            stream = job.stream = self.gen.stream(job.ids, job.max_new_tokens, **job.kwargs)
            while not job.cancelled.is_set():
                try:
                    chunk = next(stream)
                except StopIteration as stop:
                    result = stop.value
                    outcome = None if job.cancelled.is_set() else Outcome(
                        result.token_ids, result.text, result.stats, result.finish_reason, result.logprobs,
                        result.prompt_logprobs)
                    break
                if first_at is None:
                    first_at = time.perf_counter()
                    self.metrics.waiting.dec()
                    self.metrics.running.inc()
                    self.metrics.ttft.observe(first_at - job.arrival)
                tokens += chunk.token_ids
                text.append(chunk.text)
                job.put("chunk", chunk)
            if outcome is None:  # cancelled: between chunks, or inside the Generator
                outcome = Outcome(tokens, "".join(text), _stats_when_cancelled(stream), "cancelled")
        except SpeccompileError as e:
            error = e
        except Exception as e:  # a bug: logged with its traceback here, a plain 500 for the client
            log.exception("request failed")
            error = e
        finally:
            if stream is not None:
                stream.close()  # frees the Generator for the next request now, not when collected
            self._finish(job, outcome, error, first_at)

    def _finish(self, job: Job, outcome: Outcome | None, error: Exception | None, first_at: float | None) -> None:
        (self.metrics.running if first_at is not None else self.metrics.waiting).dec()
        if outcome is not None:
            ttft = None if first_at is None else first_at - job.arrival
            self.metrics.finished(len(job.ids), len(outcome.token_ids), outcome.stats, outcome.finish_reason, ttft,
                                  time.perf_counter() - job.arrival)
        with self._lock:  # out of the count before its client hears the end: a next request finds the place free
            self._jobs.discard(job)
            self._idle.notify_all()
        if error is not None:
            self.metrics.failure(from_runtime(error).status if isinstance(error, SpeccompileError) else 500)
            job.put("error", error)
        elif outcome is not None:
            job.put("done", outcome)

    def stop_admitting(self) -> None:
        """Refuse new requests (503) from now on; those in flight go on."""
        with self._lock:
            if self.accepting:
                self.stopped_at = time.monotonic()
            self.accepting = False

    def shutdown(self, timeout_s: float) -> bool:
        """Stop admitting, cancel what is still running, and wait for the workers to let go until timeout_s after
        admitting stopped (the server's drain, which began then, spent its part of it), or CANCELLED_LET_GO_S
        after the cancel where the drain spent it all; returns whether they all did."""
        self.stop_admitting()
        with self._lock:
            for job in self._jobs:
                job.cancel()
            left = max(timeout_s - (time.monotonic() - self.stopped_at), min(timeout_s, CANCELLED_LET_GO_S))
            done = self._idle.wait_for(lambda: not self._jobs, left)
        self._pool.shutdown(wait=done, cancel_futures=True)
        return done
