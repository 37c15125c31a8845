"""Load a bundle and generate from it: the API (`generate`, `stream`, `chat`) over the decode loop
(runtime/decode_loop.py), one request at a time or, with a batched graph, through the scheduler."""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import threading
import time
from typing import Callable, Iterator

import numpy as np

from speccompile.errors import BundleError, SpeccompileError, prefixed
from speccompile.format.bundle import read_manifest, resolve_inside
from speccompile.format.drafter_kinds import KINDS
from speccompile.format.summary import pass_weight_bytes
from speccompile.format.trees import TreeSpec
from speccompile.graphs import MAX_VERIFY_TOKENS, trees_exact
from speccompile.runtime.context_cache import (DEFAULT_CACHE_BYTES, ContextCache, bundle_identity, cache_parts, kept_on,
                                               runtime_identity)
from speccompile.runtime.cost_model import CostModel
from speccompile.runtime.decode_loop import LOOKUP_REACH_LIMIT, PREFILL_CHUNK, DecodeLoop, prefill_spans
from speccompile.runtime.drafters.base import Drafter, RuntimeContext
from speccompile.runtime.drafters.lookup import LookupDrafter
from speccompile.runtime.engine import Engine
from speccompile.runtime.kv_cache import KVCache, host_caches
from speccompile.runtime.noise import runs_greedy, takes_noise
from speccompile.runtime.request import Request, build_request, check_messages, is_batch, own_loop, sampling_params
from speccompile.runtime.row_parity import match_rows
from speccompile.runtime.sampling import SamplingParams
from speccompile.runtime.scheduler import Scheduler
from speccompile.runtime.sessions import check_threads
from speccompile.runtime.streams import GenerationResult, OwnLoop, SubmittedStream, drain, finish_reason, handed_out
from speccompile.runtime.text_stream import Chunk, TextStream
from speccompile.runtime.tokenizer import BundleTokenizer

__all__ = ["Generator", "GenerationResult", "drain", "load_drafter"]


def load_drafter(entry: dict, ctx: RuntimeContext) -> Drafter:
    """The drafter a manifest entry describes, built by its kind's runtime module (format/drafter_kinds.py)."""
    kind = KINDS.get(entry.get("kind"))
    if kind is None:
        raise BundleError(f"bundle names drafter kind {entry.get('kind')!r}, unknown to this runtime (it knows "
                          f"{', '.join(KINDS)}); rebuild the bundle with this speccompile")
    try:
        return importlib.import_module(kind.runtime_module).load(entry, ctx)
    except KeyError as e:
        raise BundleError(f"drafter {entry.get('name')!r} ({kind.name}): its manifest entry lacks {e}") from None


class Generator(DecodeLoop):
    """A loaded bundle. `generate`, `stream` and `chat` may be called from several threads at once, several
    streams may be open in one thread, and `generate` takes a list of prompts: with a batched target graph
    (`build --max-batch`) the requests share passes (runtime/scheduler.py), each giving exactly the tokens it would
    give alone. A bundle without one serializes the calls (a stream holds the Generator until exhausted or closed).
    A pass is `propose` (or `propose_adaptive`), `verify`, `commit`: `steps` runs them, and the scheduler per slot."""
    prefill_chunk = PREFILL_CHUNK
    lookup_reach_limit = LOOKUP_REACH_LIMIT

    def __init__(self, bundle_dir: str, manifest: dict, threads: int | None = None, device: str = "cpu",
                 context_cache: bool = True, cache_bytes: int = DEFAULT_CACHE_BYTES, cache_dir: str | None = None):
        """context_cache: reuse the K/V of prompt prefixes seen before (runtime/context_cache.py), within
        cache_bytes of memory, and in cache_dir across restarts if given."""
        self.bundle_dir, self.manifest, self.threads, self.device = bundle_dir, manifest, threads, device
        target = manifest["models"]["target"]
        # sequence slots sharing passes: host caches only (the batched graph binds numpy arrays)
        batched, cache = host_caches(manifest, device, Engine.resident_on_cpu)  # refused where they cannot fit
        # the single-sequence graph is bound to slot 0 of the batched cache: a request alone runs it unchanged
        self.target = Engine(bundle_dir, target, threads, device, max_rows=MAX_VERIFY_TOKENS,
                             cache=cache.slot(0) if cache else None)
        if isinstance(self.target, Engine):  # one-token steps computed as verify rows are (runtime/row_parity.py)
            match_rows(self.target)
        self.max_seq_len = self.target.max_seq_len
        self.pass_bytes = pass_weight_bytes(manifest, target, self.target.weight_bytes)
        self.tokenizer = BundleTokenizer(resolve_inside(bundle_dir, manifest["tokenizer"]["dir"]),
                                         target["config"].get("eos_token_ids", ()))
        self._ctx = ctx = RuntimeContext(bundle_dir, manifest, threads, device, self.target, MAX_VERIFY_TOKENS,
                                         slots=cache.batch if cache else 1)
        self.drafters: dict[str, Drafter] = {d["name"]: load_drafter(d, ctx) for d in manifest["drafters"]}
        self.num_draft = {d["name"]: d["num_draft"] for d in manifest["drafters"]}
        self.trees = {d["name"]: TreeSpec.from_dict(d["tree"]) if d.get("tree") else None
                      for d in manifest["drafters"]}
        # joins the trees that ask for it (TreeSpec.lookup): the bundle's lookup drafter, as configured, if it has one
        self.lookup = next((d for d in self.drafters.values() if isinstance(d, LookupDrafter)), LookupDrafter())
        self.trees_exact = trees_exact(manifest.get("quantization"))
        self.noise_ok = takes_noise(self.target, batched)  # temperature sampling by noisy argmaxes (runtime/noise.py)
        self._pending = np.zeros(1, np.int64)  # a plain decode step's one token
        self._lock, self._owner = threading.Lock(), None
        self._cost = None  # the cost model, measured or read on first use
        # the context cache copies K/V rows through host arrays: device caches (--device cuda, TensorRT) go without
        engines = [self.target, *(d.engine for d in self.drafters.values() if getattr(d, "engine", None))]
        kept = kept_on(context_cache, all(isinstance(e.cache, KVCache) for e in engines), cache_dir, bundle_dir)
        identity = bundle_identity(manifest, runtime_identity(getattr(self.target, "min_rows", 1), device))
        self.context_cache = ContextCache(identity,
                                          cache_parts(self.target.cache, self.drafters.values()), cache_bytes,
                                          cache_dir=cache_dir) if kept else None
        self.scheduler = Scheduler(self, cache, batched) if cache else None

    @property
    def drafter_context(self) -> RuntimeContext:
        """What the bundle's drafters were loaded with (the head caches their slots share among it)."""
        return self._ctx

    def fork_drafter(self, name: str, slot: int) -> Drafter:
        """A second instance of a bundle drafter, with state of its own (sequence slot `slot`'s)."""
        return load_drafter(next(d for d in self.manifest["drafters"] if d["name"] == name),
                            dataclasses.replace(self._ctx, slot=slot))

    @classmethod
    def load(cls, bundle_dir: str, threads: int | None = None, device: str = "cpu", verify: bool = True, **cache):
        """cache: the context cache's options (context_cache, cache_bytes, cache_dir)."""
        check_threads(threads)  # before hashing the bundle
        threads = threads if threads is None else int(threads)  # a numpy integer: no JSON for the cost model's file
        return cls(bundle_dir, read_manifest(bundle_dir, verify_hashes=verify), threads, device, **cache)

    @property
    def drafter_names(self) -> list[str]:
        return list(self.drafters)

    def encode_chat(self, text: str) -> list[int]:
        return self.tokenizer.encode_chat(text)

    def cost_model(self, recalibrate: bool = False) -> CostModel:
        """This bundle's cost model on this machine (runtime/cost_model.py): cached, or measured now (a few seconds,
        running the target engine: from any thread, once no generation holds it) and cached; recalibrate=True too.
        Refused in a thread whose own generation is unfinished (a half-read stream, an on_text callback): measuring
        then would overwrite that generation's K/V."""
        if self._cost is not None and not recalibrate:
            return self._cost
        with self._exclusive(), (self.scheduler.exclusive() if self.scheduler else contextlib.nullcontext()):
            return self._measured_cost(recalibrate)

    def warm_up(self) -> None:
        """Run once what a process pays extra for the first time, so that no request pays it: the cost model's
        calibration where none is cached, and the largest passes (a pass over every sequence slot's prompt chunk is
        much slower the first time in a process: docs/results.md, "The concurrency benchmark's first timed run").
        One prompt-chunk-long prompt alone, then one in every sequence slot at once, two tokens each;
        nothing of them is kept (the context cache is off meanwhile). Before serving: not while requests run."""
        kept, self.context_cache = self.context_cache, None
        try:
            words = self.encode_chat("Warm up.")
            prompt = (words * (self.prefill_chunk // len(words) + 1))[:min(self.prefill_chunk, self.max_seq_len - 4)]
            self.generate(prompt, 2, chat=False)
            if self.scheduler:
                self.generate([prompt] * self.scheduler.cache.batch, 2, chat=False)
        finally:
            self.context_cache = kept

    # ---- the API ---------------------------------------------------------------------------------------------
    def stream(self, prompt, max_new_tokens: int = 128, drafter: str | None = None, speculate: bool = True,
               temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
               seed: int | None = None, stop: tuple[str, ...] | str = (), num_draft: int | None = None,
               tree: str | TreeSpec | None = None, chat: bool = True, on_text: Callable[[str], None] | None = None,
               params: SamplingParams | None = None, acceptance: str | None = None, min_p: float | None = None,
               ignore_eos: bool = False, stop_token_ids=(), logprobs: int | None = None,
               prompt_logprobs: int | None = None, **unknown) -> Iterator[Chunk]:
        """Generate, yielding a Chunk per verify pass: the new text (held back while it could still become a stop
        string) and the token ids committed. The final GenerationResult is the StopIteration value (`generate`
        just returns it). prompt: text (through the chat template unless chat=False) or token ids. temperature (0:
        greedy), top_k (0: off), top_p (1: off), min_p (0: off), seed, acceptance ("exact", or
        "typical[:EPS[,ALPHA]]": lossy, see SamplingParams), or `params` in place of them all. Stops at an
        end-of-sequence token (not with ignore_eos=True: fixed lengths, as vLLM's) or one of stop_token_ids (it
        included, as an end-of-sequence token is), at max_new_tokens, or where a stop string begins (text and
        token_ids both end before it). logprobs=K (0 to 20): each token's log-probability under the target and the
        K likeliest tokens' (runtime/logprobs.py), in the chunks and the result; prompt_logprobs=K the same for
        the prompt's tokens after the first, in the result (such a request runs its whole prompt, with no context
        cache, and not in shared passes). Other keywords are refused."""
        params = sampling_params(params, unknown, temperature, top_k, top_p, seed, acceptance, min_p)
        request = build_request(self, prompt, max_new_tokens, params, drafter, speculate, stop, num_draft, tree, chat,
                                on_text, ignore_eos, stop_token_ids, logprobs, prompt_logprobs)
        if self.scheduler and not own_loop(request, self.noise_ok):  # submitted now: its passes start before the first read
            self.check_owner()  # this thread's own loop holds the scheduler: the request would wait for ever
            handle = self._submit(request)
            return SubmittedStream(self._run(request, on_text, (handle, time.perf_counter())), handle)
        own = OwnLoop()  # cancel() too, as a submitted request's stream has it
        return SubmittedStream(self._serialized(request, on_text, own), own)

    def _serialized(self, request: Request, on_text, own: OwnLoop):
        """This thread's own decode loop, under the lock and, with a scheduler, its slots all free (own_loop's requests).
        Cancelled while it waits for them, it stops waiting and holds neither: its loop then runs no pass, and a
        server's place in its queue is not kept until the generation ahead of it ends."""
        with self._exclusive(own) as held:
            with self.scheduler.exclusive(own) if self.scheduler and held else contextlib.nullcontext():
                result = yield from self._run(request, on_text, own=own)
        return result

    def _submit(self, request: Request):
        """Hand the request to the scheduler now (its passes start whether or not the caller reads them yet); its
        handle. Adaptive drafting's first request measures the cost model first, with the slots to itself: the
        calibration runs the target engine, which is slot 0's."""
        if request.tree is not None and request.tree.adaptive and request.drafter is not None and self._cost is None:
            with self.scheduler.exclusive():
                self._measured_cost()
        return self.scheduler.submit(request, request.new_stats())

    def generate(self, prompt, max_new_tokens: int = 128, **kwargs) -> GenerationResult | list[GenerationResult]:
        """Generate for one prompt (text or token ids) or a list of prompts (a list of results, in order); the
        keyword arguments are `stream`'s."""
        if is_batch(prompt):  # every stream opened (with the scheduler: submitted) before any is read
            streams = []
            try:
                for i, p in enumerate(prompt):
                    streams.append(self._stream_of_list(i, p, max_new_tokens, kwargs))
                return [drain(it) for it in streams]
            finally:
                for it in streams:  # those a bad prompt or an error left unread: their slots freed
                    it.close()
        return drain(self.stream(prompt, max_new_tokens, **kwargs))

    def _stream_of_list(self, i: int, prompt, max_new_tokens, kwargs: dict):
        """The stream of prompt i of a list; a refusal says which prompt it was (a list of long prompts would
        otherwise leave the caller to find the one that does not fit)."""
        try:
            return self.stream(prompt, max_new_tokens, **kwargs)
        except SpeccompileError as e:
            raise prefixed(e, f"prompt {i} of the list") from None

    def chat(self, messages: list[dict], max_new_tokens: int = 128, **kwargs) -> GenerationResult:
        """Answer a conversation: messages [{"role": "system" | "user" | "assistant" | "tool", "content": str}, ...],
        through the bundle's chat template; the keyword arguments are `stream`'s (but chat=False)."""
        flag = kwargs.get("chat", True)
        if isinstance(flag, (bool, np.bool_)) and not flag:
            raise SpeccompileError("chat() renders the messages through the chat template: for text without it, "
                                   "call generate(..., chat=False)")
        # chat stays in kwargs: generate refuses a value other than True or False (the string "no" would be true)
        return self.generate(self.tokenizer.encode_messages(check_messages(messages)), max_new_tokens, **kwargs)

    def _run(self, req: Request, on_text: Callable[[str], None] | None, submitted=None, own: OwnLoop | None = None):
        """The chunks of this thread's own loop (until `own` is cancelled), or of `submitted` = (the scheduler's
        Handle, when submitted); timed when their passes ran (produced_at), not read (generate reads a list in turn)."""
        handle, t0 = submitted or (None, time.perf_counter())
        stats, source = (handle.stats, handle) if handle else (req.new_stats(), own)
        passes = handle.passes() if handle else own.passes(self.steps(req.ids, req.max_new_tokens, req.drafter, req.k,
                                                                       req.params, stats, req.tree))
        text, out, given, ttft, done = TextStream(self.tokenizer, req.stop), [], 0, None, False
        logprobs = stats.logprobs.tokens if stats.logprobs else None  # appended as the tokens are committed
        prompt_given = stats.prompt_logprobs is None  # asked for: on the first chunk, whatever tokens it holds

        def first(chunk: Chunk) -> Chunk:
            nonlocal prompt_given
            if not prompt_given:
                chunk.prompt_logprobs, prompt_given = scored_prompt(stats), True
            return chunk
        for new in passes:
            ttft = ttft if ttft is not None else source.produced_at - t0
            done = self._take(new, out, text, req)
            if done:
                break
            delta, n = text.certain()
            chunk, given = handed_out(delta, out[given:given + n], on_text, logprobs, given), given + n
            yield first(chunk)
            if submitted is None:  # resumed, maybe by another thread (a pool reading the stream): it holds the lock
                self._owner = threading.get_ident()
        # done (at a stop string out loses the tokens from the one it begins in), or cancelled: the passes ended
        # first (SubmittedStream.cancel). The text held back (a partial character, a stop string's start) comes last
        final, delta, n = text.finish(out)
        if done or delta or n:
            yield first(handed_out(delta, out[given:given + n], on_text, logprobs, given))
            if submitted is None:
                self._owner = threading.get_ident()
        total = (source.produced_at if done else time.perf_counter()) - t0  # done: at its last pass
        # the answer's blocks too (the scheduler saves its own); none where no pass ran (cancelled before its first):
        # the target's cache still holds the previous request's K/V, which must not be keyed by this prompt
        if self.context_cache and submitted is None and ttft is not None:
            context = np.concatenate([req.ids, np.asarray(out, np.int64)])
            self.context_cache.save(context, min(self.target.cache.length, len(context)), self.target.cache,
                                    req.drafter)
        scored_rows = self.target.max_rows if stats.prompt_logprobs is not None else 0
        prefill_passes = len(prefill_spans(len(req.ids), stats.prompt_cache_hit_tokens, scored_rows))
        weight_bytes = self.pass_bytes["screened" if runs_greedy(req.params, self.noise_ok) else "full"]
        result = stats.as_dict(len(out), total, ttft, weight_bytes, prefill_passes)
        result["acceptance"] = "typical (lossy)" if req.params.typical else "exact"
        reason = finish_reason(out, req.max_new_tokens, req.end_ids, cancelled=not done)
        return GenerationResult(out, final, result, reason, None if logprobs is None else logprobs[:len(out)],
                                scored_prompt(stats))

    @staticmethod
    def _take(new: list[int], out: list[int], text: TextStream, req: Request) -> bool:
        """Append a pass's tokens to `out` (and its text) up to an end-of-sequence token, max_new_tokens or a stop
        string; returns whether the output is complete."""
        for t in new:
            out.append(t)
            if text.add(t) or t in req.end_ids or len(out) >= req.max_new_tokens:
                return True
        return False

    def check_owner(self) -> None:
        """Refuse to wait for this Generator in the thread whose own unfinished generation holds it: that wait
        would never end."""
        if self._owner == threading.get_ident():
            raise SpeccompileError("this Generator is already generating in this thread (an unfinished stream()); "
                                   "finish or close() it first")

    @contextlib.contextmanager
    def _exclusive(self, own: OwnLoop | None = None):
        """One generation at a time: the engines' caches and buffers are shared state. Yields whether it holds the
        Generator: not if `own`, the request waiting for it, was cancelled meanwhile."""
        self.check_owner()
        if not (self._lock.acquire() if own is None else own.acquire(self._lock)):
            yield False
            return
        try:  # the owner set inside: an interrupt right after it would leave this thread refused for good
            self._owner = threading.get_ident()
            yield True
        finally:
            self._owner = None
            self._lock.release()


def scored_prompt(stats) -> list | None:
    """prompt_logprobs' entries: None for the first prompt token (nothing before it predicts it), then each one's."""
    return None if stats.prompt_logprobs is None else [None, *stats.prompt_logprobs.tokens]
