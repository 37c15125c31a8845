"""Load a bundle and generate: prefill, then draft -> verify -> accept -> roll back, streaming the tokens."""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import threading
import time
from typing import Callable, Iterator

import numpy as np

from speccompile.errors import BundleError, SpeccompileError
from speccompile.format.bundle import read_manifest, resolve_inside
from speccompile.format.drafter_kinds import KINDS
from speccompile.format.summary import pass_weight_bytes
from speccompile.format.trees import ADAPTIVE_LOOKUP, TreeSpec, depths
from speccompile.graphs import MAX_STEP_TOKENS, MAX_VERIFY_TOKENS, trees_exact
from speccompile.runtime import cost_cache
from speccompile.runtime.adaptive import AdaptiveDrafting
from speccompile.runtime.cost_model import CostModel
from speccompile.runtime.acceptance import SpecDecodeStats, Verdict, accept_on_host, chain_parents
from speccompile.runtime.context_cache import (DEFAULT_CACHE_BYTES, ContextCache, bundle_identity, cache_parts, kept_on,
                                               runtime_identity)
from speccompile.runtime.drafters.base import Drafter, Proposal, RuntimeContext
from speccompile.runtime.drafters.lookup import LookupDrafter, LookupReach, join_lookup
from speccompile.runtime.engine import Engine
from speccompile.runtime.sessions import check_threads
from speccompile.runtime.kv_cache import KVCache, host_caches
from speccompile.runtime.noise import GumbelNoise, runs_greedy, sampled_by_noise, takes_noise
from speccompile.runtime.request import Request, build_request, check_messages, is_batch, own_loop, sampling_params
from speccompile.runtime.row_parity import match_rows
from speccompile.runtime.sampling import PositionDraws, SamplingParams
from speccompile.runtime.scheduler import Scheduler
from speccompile.runtime.streams import GenerationResult, OwnLoop, SubmittedStream, drain, finish_reason, handed_out
from speccompile.runtime.text_stream import Chunk, TextStream
from speccompile.runtime.tokenizer import BundleTokenizer

PREFILL_CHUNK = MAX_STEP_TOKENS
# a joined tree's lookup continuations reach at most this many times L deep (drafters/lookup.py LookupReach): a
# wide pass costs a few narrow ones, so a repeating answer may commit that many more tokens for it
LOOKUP_REACH_LIMIT = 4


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


class Generator:
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
        self._ctx = ctx = RuntimeContext(bundle_dir, manifest, threads, device, self.target, MAX_VERIFY_TOKENS)
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

    def fork_drafter(self, name: str) -> Drafter:
        """A second instance of a bundle drafter, with state of its own (a sequence slot's)."""
        return load_drafter(next(d for d in self.manifest["drafters"] if d["name"] == name), self._ctx)

    @classmethod
    def load(cls, bundle_dir: str, threads: int | None = None, device: str = "cpu", verify: bool = True, **cache):
        """cache: the context cache's options (context_cache, cache_bytes, cache_dir)."""
        check_threads(threads)  # before hashing the bundle
        return cls(bundle_dir, read_manifest(bundle_dir, verify_hashes=verify), threads, device, **cache)

    @property
    def drafter_names(self) -> list[str]:
        return list(self.drafters)

    def encode_chat(self, text: str) -> list[int]:
        return self.tokenizer.encode_chat(text)

    # ---- the decode loop -------------------------------------------------------------------------------------
    def steps(self, prompt: np.ndarray, max_new_tokens: int, drafter: Drafter | None, k: int,
              params: SamplingParams, stats: SpecDecodeStats, tree: TreeSpec | None = None) -> Iterator[list[int]]:
        """Yield the tokens committed by each pass: the prefill's first token, then each verify pass's."""
        rng, draws = np.random.default_rng(params.seed), PositionDraws(params.seed)
        params, noise = sampled_by_noise(params, self.noise_ok, self.target.vocab_size)  # then greedy + noise
        adapt = self.adaptive_for(drafter, tree, params) if tree is not None and tree.adaptive else None
        token = self._prefill(prompt, drafter, params, draws, stats, noise)
        context = np.concatenate([np.asarray(prompt, np.int64), np.zeros(max_new_tokens, np.int64)])
        n, generated = len(prompt), 1
        reach = None if adapt else LookupReach.joining(tree, LOOKUP_REACH_LIMIT)
        yield [token]
        while generated < max_new_tokens:
            context[n] = token  # committed, but not yet in the target's cache
            n += 1
            room = min(max_new_tokens - generated - 1, self.max_seq_len - n)  # draft tokens that could be used
            prop = (self.propose_adaptive(context[:n], drafter, adapt, room, params, rng) if adapt else
                    self.propose(context[:n], drafter, k, tree, room, reach, params, rng))
            (path, token), in_graph = self.verify(token, prop, n, params, rng, noise, draws)
            self.commit(n, prop.parents, path, drafter)
            accepted = prop.tokens[path]
            context[n:n + len(path)] = accepted
            n += len(path)
            new = [*accepted.tolist(), token]
            generated += len(new)
            if reach:
                reach.update(len(path), prop.depth)
            if adapt:
                adapt.update(path)
                stats.adaptive = adapt.summary()
            stats.record(len(prop.tokens), len(path), prop.depth, in_graph)
            yield new

    def _prefill(self, prompt: np.ndarray, drafter: Drafter | None, params: SamplingParams, draws: PositionDraws,
                 stats: SpecDecodeStats, noise: GumbelNoise | None = None) -> int:
        """Run the prompt into the target's cache (and the drafter's features), after the longest prefix the
        context cache gives back; returns the first new token (with noise: the noisy argmax, a draw)."""
        if drafter:
            drafter.reset()
        cache = self.target.cache
        hit = self.context_cache.restore(prompt, cache, drafter) if self.context_cache else 0
        cache.truncate(hit)
        stats.prompt_cache_hit_tokens, stats.prompt_cache_miss_tokens = hit, len(prompt) - hit
        for start in range(hit, len(prompt), PREFILL_CHUNK):
            chunk = prompt[start:start + PREFILL_CHUNK]
            last = noise.rows([len(prompt)]) if noise and start + len(chunk) == len(prompt) else None
            logits, argmax = self.target.forward(chunk, full_logits=not params.greedy, noise=last)  # greedy: argmax
            if drafter and drafter.wants_hidden:
                drafter.observe(start, drafter.features(self.target, slice(0, len(chunk))))
            cache.truncate(start + len(chunk))
        if self.context_cache:
            self.context_cache.save(prompt, len(prompt), cache, drafter)
        return int(argmax[0]) if params.greedy else draws.token(logits[0], params, len(prompt))

    def propose(self, context, drafter, k, tree, room, reach, params, rng) -> Proposal:
        """The drafter's chain (at most k tokens) or tree, within `room` tokens; joined by lookup if asked."""
        if not drafter or room <= 0:
            return Proposal.empty()
        if tree is None:
            prop = drafter.propose(context, min(k, room), params, rng)
            return Proposal(prop.tokens[:min(k, room)], prop.q)
        prop = drafter.propose_tree(context, tree.limited(room, self.target.max_rows - 1), params, rng)
        if reach and prop.q is None:
            free = max(0, min(room, self.target.max_rows - 1) - len(prop.tokens))
            prop = join_lookup(prop, context, self.lookup, min(reach.reach, free), min(room, reach.reach))
        return prop if self.trees_exact else prop.first_path()

    def adaptive_for(self, drafter: Drafter | None, tree: TreeSpec, params: SamplingParams) -> AdaptiveDrafting | None:
        """The per-request state of adaptive drafting (runtime/adaptive.py), priced by this machine's cost model."""
        if drafter is None:
            return None
        is_lookup = isinstance(drafter, LookupDrafter)
        if is_lookup and not tree.lookup:  # prompt lookup drafting alone: its nodes are the whole tree
            tree = dataclasses.replace(tree, lookup=ADAPTIVE_LOOKUP)
        return AdaptiveDrafting(self._measured_cost(), drafter.name, not is_lookup, tree, params.greedy,
                                self.target.max_rows, chains_only=not self.trees_exact)

    def propose_adaptive(self, context, drafter: Drafter, adapt: AdaptiveDrafting, room: int, params,
                         rng, match: tuple | None = None, lookup_only: bool = False) -> Proposal:
        """The drafter's dynamic tree as deep as the plan says (or none), joined by prompt lookup, cut to the nodes
        worth verifying (maybe none: a plain step). match: prompt lookup's here, if the caller has it;
        lookup_only: no drafter pass, prompt lookup's nodes alone (a shared pass's rows)."""
        cap = min(room, self.target.max_rows - 1)
        if cap <= 0:
            return adapt.skip()
        lookup = self.lookup_of(drafter)
        match = lookup.matches(context) if match is None and adapt.reach else match
        plan = adapt.lookup_plan(cap) if lookup_only else adapt.plan(len(context), match[1] if match else 0)
        prop = Proposal.empty()
        if plan.head_depth:
            prop = adapt.draft(drafter, context, plan, cap, params, rng)
        head, scores = len(prop.tokens), prop.scores
        if plan.lookup_nodes:
            prop = join_lookup(prop, context, lookup, min(plan.lookup_nodes, max(0, cap - head)),
                               min(room, plan.lookup_nodes), match)
        return adapt.choose(prop, head, scores, plan, len(context))

    def lookup_of(self, drafter: Drafter | None) -> LookupDrafter:
        """The prompt lookup that joins `drafter`'s drafts (itself, if it is one)."""
        return drafter if isinstance(drafter, LookupDrafter) else self.lookup

    def cost_model(self, recalibrate: bool = False) -> CostModel:
        """This bundle's cost model on this machine (runtime/cost_model.py): cached, or measured now (a few seconds,
        running the target engine: from any thread, once no generation holds it) and cached; recalibrate=True too."""
        if (self._cost is not None and not recalibrate) or self._owner == threading.get_ident():
            return self._measured_cost(recalibrate)
        with self._exclusive(), (self.scheduler.exclusive() if self.scheduler else contextlib.nullcontext()):
            return self._measured_cost(recalibrate)

    def _measured_cost(self, recalibrate: bool = False) -> CostModel:  # for callers holding the engines already
        if self._cost is None or recalibrate:
            self._cost = cost_cache.cached_or_calibrated(self.bundle_dir, self.target, self.drafters, self.threads,
                                                         self.lookup, recalibrate)
        return self._cost

    def verify(self, token: int, prop: Proposal, n: int, params: SamplingParams, rng,
               noise: GumbelNoise | None = None, draws: PositionDraws | None = None) -> tuple[Verdict, bool | None]:
        """One target pass over the pending token and the draft: (the verdict, whether acceptance ran in the
        graph; None for a plain decode step, without drafts). Timed into the cost model once adaptive drafting
        has loaded it, so that its prices follow the passes as they run now."""
        t0 = time.perf_counter()
        out = self._target_pass(token, prop, n, params, rng, noise, draws)
        if self._cost is not None:
            self._cost.observe(1 + len(prop.tokens), n - 1, params.greedy, (time.perf_counter() - t0) * 1e3)
        return out

    def _target_pass(self, token: int, prop: Proposal, n: int, params: SamplingParams, rng, noise, draws):
        if not len(prop.tokens):  # nothing to verify: a plain decode step (the verify ops would only cost time)
            self._pending[0] = token
            logits, argmax = self.target.forward(self._pending, full_logits=not params.greedy,
                                                 noise=noise.rows([n]) if noise else None)
            return Verdict([], int(argmax[0]) if params.greedy else draws.token(logits[0], params, n)), None
        block = np.concatenate([[token], prop.tokens]).astype(np.int64)
        if prop.parents is None:  # a chain
            block_parents, positions = None, None
        else:
            block_parents = np.concatenate([[-1], prop.parents + 1])  # tree roots hang off the pending token
            positions = n - 1 + depths(block_parents)
        drawn = noise.rows(n + (np.arange(len(block)) if positions is None else positions - n + 1)) if noise else None
        if self.target.verifies and params.greedy or self.target.verifies_sampled and (
                params.top_p >= 1.0 and prop.q is None and not params.typical):
            # the verify graph accepts: O(nodes) numbers come back, not the [nodes, V] logits. The host path
            # remains for top-p, for chains drawn from draft distributions q (see verify.emit_verify) and for
            # bundles built before the verify extension.
            verdict = self.target.verify(block, positions, chain_parents(len(block)) if block_parents is None
                                         else block_parents, params.temperature, params.top_k,
                                         None if params.greedy else rng.random((len(block), 2)), drawn)
            return Verdict(*verdict), True
        logits, argmax = self.target.forward(block, positions, block_parents, rows=np.arange(len(block)),
                                             full_logits=not params.greedy, noise=drawn)  # greedy: the argmax
        return accept_on_host(prop, logits, argmax, params, rng, draws, n), False

    def commit(self, n: int, parents: np.ndarray | None, path: list[int], drafter: Drafter | None) -> None:
        """Keep the accepted nodes' K/V after the committed tokens; the rejected slots are simply forgotten."""
        cache = self.target.cache
        if parents is not None:
            cache.compact(n + np.array(path, np.int64), n)  # node i sits at slot n + i
        cache.truncate(n + len(path))
        if drafter and drafter.wants_hidden:  # the pending token and the accepted nodes, now committed
            drafter.observe(n - 1, drafter.features(self.target, np.concatenate([[0], np.add(path, 1)]).astype(int)))

    # ---- the API ---------------------------------------------------------------------------------------------
    def stream(self, prompt, max_new_tokens: int = 128, drafter: str | None = None, speculate: bool = True,
               temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
               seed: int | None = None, stop: tuple[str, ...] | str = (), num_draft: int | None = None,
               tree: str | TreeSpec | None = None, chat: bool = True, on_text: Callable[[str], None] | None = None,
               params: SamplingParams | None = None, acceptance: str | None = None, **unknown) -> Iterator[Chunk]:
        """Generate, yielding a Chunk per verify pass: the new text (held back while it could still become a stop
        string) and the token ids committed. The final GenerationResult is the StopIteration value (`generate`
        just returns it). prompt: text (through the chat template unless chat=False) or token ids. temperature (0:
        greedy), top_k (0: off), top_p (1: off), seed, acceptance ("exact", or "typical[:EPS[,ALPHA]]": lossy, see
        SamplingParams), or `params` in place of them all. Stops at an end-of-sequence token, at max_new_tokens,
        or where a stop string begins (text and token_ids both end before it). Other keywords are refused."""
        params = sampling_params(params, unknown, temperature, top_k, top_p, seed, acceptance)
        request = build_request(self, prompt, max_new_tokens, params, drafter, speculate, stop, num_draft, tree, chat,
                                on_text)
        if self.scheduler and not own_loop(request):  # submitted now: its passes start before the first read
            self._check_owner()  # this thread's own loop holds the scheduler: the request would wait for ever
            handle = self._submit(request)
            return SubmittedStream(self._run(request, on_text, (handle, time.perf_counter())), handle)
        own = OwnLoop()  # cancel() too, as a submitted request's stream has it
        return SubmittedStream(self._serialized(request, on_text, own), own)

    def _serialized(self, request: Request, on_text, own: OwnLoop):
        """This thread's own decode loop, under the lock and, with a scheduler, its slots all free (typical too)."""
        with self._exclusive(), (self.scheduler.exclusive() if self.scheduler else contextlib.nullcontext()):
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
                streams.extend(self.stream(p, max_new_tokens, **kwargs) for p in prompt)
                return [drain(it) for it in streams]
            finally:
                for it in streams:  # those a bad prompt or an error left unread: their slots freed
                    it.close()
        return drain(self.stream(prompt, max_new_tokens, **kwargs))

    def chat(self, messages: list[dict], max_new_tokens: int = 128, **kwargs) -> GenerationResult:
        """Answer a conversation: messages [{"role": "system" | "user" | "assistant" | "tool", "content": str}, ...],
        through the bundle's chat template; the keyword arguments are `stream`'s (but chat=False)."""
        if not kwargs.pop("chat", True):
            raise SpeccompileError("chat() renders the messages through the chat template: for text without it, "
                                   "call generate(..., chat=False)")
        return self.generate(self.tokenizer.encode_messages(check_messages(messages)), max_new_tokens, **kwargs)

    def _run(self, req: Request, on_text: Callable[[str], None] | None, submitted=None, own: OwnLoop | None = None):
        """The chunks of this thread's own loop (until `own` is cancelled), or of `submitted` = (the scheduler's
        Handle, when submitted); timed when their passes ran (produced_at), not read (generate reads a list in turn)."""
        handle, t0 = submitted or (None, time.perf_counter())
        stats, source = (handle.stats, handle) if handle else (req.new_stats(), own)
        passes = handle.passes() if handle else own.passes(self.steps(req.ids, req.max_new_tokens, req.drafter, req.k,
                                                                       req.params, stats, req.tree))
        text, out, given, ttft, done = TextStream(self.tokenizer, req.stop), [], 0, None, False
        for new in passes:
            ttft = ttft if ttft is not None else source.produced_at - t0
            done = self._take(new, out, text, req.max_new_tokens)
            if done:
                break
            delta, n = text.certain()
            chunk, given = handed_out(delta, out[given:given + n], on_text), given + n
            yield chunk
            if submitted is None:  # resumed, maybe by another thread (a pool reading the stream): it holds the lock
                self._owner = threading.get_ident()
        # done (at a stop string out loses the tokens from the one it begins in), or cancelled: the passes ended
        # first (SubmittedStream.cancel). The text held back (a partial character, a stop string's start) comes last
        final, delta, n = text.finish(out)
        if done or delta or n:
            yield handed_out(delta, out[given:given + n], on_text)
            if submitted is None:
                self._owner = threading.get_ident()
        total = (source.produced_at if done else time.perf_counter()) - t0  # done: at its last pass
        if self.context_cache and submitted is None:  # the answer's blocks too (the scheduler saves its own)
            context = np.concatenate([req.ids, np.asarray(out, np.int64)])
            self.context_cache.save(context, min(self.target.cache.length, len(context)), self.target.cache,
                                    req.drafter)
        prefill_passes = -(-stats.prompt_cache_miss_tokens // PREFILL_CHUNK)
        weight_bytes = self.pass_bytes["screened" if runs_greedy(req.params, self.noise_ok) else "full"]
        result = stats.as_dict(len(out), total, ttft, weight_bytes, prefill_passes)
        result["acceptance"] = "typical (lossy)" if req.params.typical else "exact"
        reason = finish_reason(out, req.max_new_tokens, self.tokenizer.eos_token_ids, cancelled=not done)
        return GenerationResult(out, final, result, reason)

    def _take(self, new: list[int], out: list[int], text: TextStream, max_new_tokens: int) -> bool:
        """Append a pass's tokens to `out` (and its text) up to an end-of-sequence token, max_new_tokens or a stop
        string; returns whether the output is complete."""
        for t in new:
            out.append(t)
            if text.add(t) or t in self.tokenizer.eos_token_ids or len(out) >= max_new_tokens:
                return True
        return False

    def _check_owner(self) -> None:
        if self._owner == threading.get_ident():
            raise SpeccompileError("this Generator is already generating in this thread (an unfinished stream()); "
                                   "finish or close() it first")

    @contextlib.contextmanager
    def _exclusive(self):
        """One generation at a time: the engines' caches and buffers are shared state."""
        self._check_owner()
        with self._lock:
            try:  # the owner set inside: an interrupt right after it would leave this thread refused for good
                self._owner = threading.get_ident()
                yield
            finally:
                self._owner = None
