"""Load a bundle and generate: prefill, then draft -> verify -> accept -> roll back, streaming the tokens."""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, Iterator

import numpy as np

from speccompile.format.bundle import read_manifest, resolve_inside
from speccompile.runtime.drafters.base import Drafter, Proposal
from speccompile.runtime.drafters.draft_model import DraftModelDrafter
from speccompile.runtime.drafters.lookup import LookupDrafter, LookupReach, join_lookup
from speccompile.runtime.drafters.medusa import MedusaDrafter
from speccompile.runtime.drafters.mtp import MtpDrafter
from speccompile.errors import ContextLengthError, SpeccompileError
from speccompile.format.trees import TreeSpec, depths
from speccompile.runtime.acceptance import accept_tree_greedy, accept_tree_sampled
from speccompile.graphs import MAX_STEP_TOKENS, MAX_VERIFY_TOKENS
from speccompile.runtime.engine import Engine
from speccompile.runtime.sampling import SamplingParams, probabilities, sample
from speccompile.runtime.acceptance import accept_greedy, accept_sampled
from speccompile.runtime.tokenizer import BundleTokenizer

PREFILL_CHUNK = MAX_STEP_TOKENS
# a joined tree's lookup continuations reach at most this many times L deep (drafters/lookup.py LookupReach): on
# SmolLM2 a 25-row pass costs ~3x a 1-row pass, so a repeating answer commits up to 25 tokens for it
LOOKUP_REACH_LIMIT = 4


@dataclasses.dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    stats: dict


def pass_weight_bytes(manifest: dict, entry: dict, file_bytes: int) -> dict[str, int]:
    """Weight bytes one pass of the target reads: "full" (float32 head, the screen's tensors unread) and
    "screened" (a greedy pass through the exact greedy head: its int8 screen instead of the float32 head, of
    which it reads only the rescored rows). The weight files' size for bundles that do not list initializers."""
    names = set(entry.get("initializers", ()))
    sizes = {n: r["length"] for f in entry["weights"] for n, r in manifest.get("weights", {}).get(f, {}).items()
             if n in names}
    if not sizes:
        return {"full": file_bytes, "screened": file_bytes}
    screen = sum(v for n, v in sizes.items() if n.startswith("head_screen."))
    full = sum(sizes.values()) - screen
    head = sizes.get("lm_head", sizes.get("embed", 0))
    return {"full": full, "screened": full - head + screen if screen else full}


class Generator:
    def __init__(self, bundle_dir: str, manifest: dict, threads: int | None = None, device: str = "cpu"):
        self.bundle_dir, self.manifest = bundle_dir, manifest
        models = manifest["models"]
        self.target = Engine(bundle_dir, models["target"], threads, device, max_rows=MAX_VERIFY_TOKENS)
        self.max_seq_len = self.target.max_seq_len
        self.pass_bytes = pass_weight_bytes(manifest, models["target"], self.target.weight_bytes)
        cfg = models["target"]["config"]
        self.tokenizer = BundleTokenizer(resolve_inside(bundle_dir, manifest["tokenizer"]["dir"]),
                                         cfg.get("eos_token_ids", ()))
        self.drafters: dict[str, Drafter] = {}
        self.num_draft: dict[str, int] = {}
        self.trees: dict[str, TreeSpec | None] = {}
        for d in manifest["drafters"]:
            if d["kind"] == "lookup":
                self.drafters[d["name"]] = LookupDrafter(d["name"], d.get("max_ngram", 3))
            elif d["kind"] == "mtp":
                eng = Engine(bundle_dir, models[d["model"]], threads, device, max_rows=MAX_VERIFY_TOKENS)
                self.drafters[d["name"]] = MtpDrafter(d["name"], eng, models[d["model"]].get("draft_to_target"),
                                                      self.target.vocab_size)
            elif d["kind"] in ("eagle", "eagle3"):
                from speccompile.runtime.drafters.eagle import EagleDrafter
                self.drafters[d["name"]] = EagleDrafter.load(d, bundle_dir, manifest, threads, device,
                                                             MAX_VERIFY_TOKENS)
            elif d["kind"] == "medusa":
                self.drafters[d["name"]] = MedusaDrafter(d["name"], bundle_dir, models[d["model"]], threads,
                                                         self.max_seq_len)
            elif d["kind"] in ("layerskip", "model"):
                # An early exit reads the target's weight file: unpacked, its matrices stay the mapped file's pages
                # (one copy in memory); it multiplies one row at a time, where packing gains nothing.
                eng = Engine(bundle_dir, models[d["model"]], threads, device, max_rows=MAX_VERIFY_TOKENS,
                             prepack=d["kind"] != "layerskip")
                self.drafters[d["name"]] = DraftModelDrafter(d["name"], eng)
            else:
                raise SpeccompileError(f"bundle names drafter kind {d['kind']!r}, unknown to this runtime")
            self.num_draft[d["name"]] = d["num_draft"]
            self.trees[d["name"]] = TreeSpec.from_dict(d["tree"]) if d.get("tree") else None
        # joins the trees that ask for it (TreeSpec.lookup): the bundle's lookup drafter, as configured, if it has one
        self.lookup = next((d for d in self.drafters.values() if isinstance(d, LookupDrafter)), LookupDrafter())

    @classmethod
    def load(cls, bundle_dir: str, threads: int | None = None, device: str = "cpu", verify: bool = True):
        return cls(bundle_dir, read_manifest(bundle_dir, verify_hashes=verify), threads, device)

    @property
    def drafter_names(self) -> list[str]:
        return list(self.drafters)

    def encode_chat(self, text: str) -> list[int]:
        return self.tokenizer.encode_chat(text)

    # ---- the decode loop -------------------------------------------------------------------------------------
    def _prefill(self, prompt: np.ndarray, drafter: Drafter | None, greedy: bool):
        cache = self.target.cache
        cache.truncate(0)
        for start in range(0, len(prompt), PREFILL_CHUNK):
            chunk = prompt[start:start + PREFILL_CHUNK]
            logits, argmax = self.target.forward(chunk, full_logits=not greedy)  # greedy reads the argmax only
            if drafter and drafter.wants_hidden:
                drafter.observe(start, drafter.features(self.target, slice(0, len(chunk))))
            cache.truncate(start + len(chunk))
        return logits[0], argmax[0]

    def steps(self, prompt: np.ndarray, max_new_tokens: int, drafter: Drafter | None, k: int,
              params: SamplingParams, stats: dict, tree: TreeSpec | None = None) -> Iterator[list[int]]:
        """Yield the tokens committed by each pass: the prefill's first token, then each verify pass's."""
        rng = np.random.default_rng(params.seed)
        cache = self.target.cache
        if drafter:
            drafter.reset()
        logits, argmax = self._prefill(prompt, drafter, params.greedy)
        token = int(argmax) if params.greedy else sample(probabilities(logits, params), rng)
        context = np.zeros(len(prompt) + max_new_tokens, np.int64)
        context[:len(prompt)] = prompt
        n = len(prompt)
        generated = 1
        reach = LookupReach(tree.lookup, LOOKUP_REACH_LIMIT * tree.lookup) if tree is not None and tree.lookup else None
        yield [token]
        while generated < max_new_tokens:
            context[n] = token  # committed, but not yet in the target's cache
            n += 1
            room = min(max_new_tokens - generated - 1, self.max_seq_len - n)  # draft tokens that could be used
            prop = Proposal.empty()
            if drafter and room > 0:
                if tree is not None:
                    prop = drafter.propose_tree(context[:n], tree.limited(room, self.target.max_rows - 1),
                                                params, rng)
                    if reach and prop.q is None:
                        free = max(0, min(room, self.target.max_rows - 1) - len(prop.tokens))
                        prop = join_lookup(prop, context[:n], self.lookup, min(reach.reach, free),
                                           min(room, reach.reach))
                else:
                    prop = drafter.propose(context[:n], min(k, room), params, rng)
            draft, parents = prop.tokens, prop.parents
            if parents is None:  # a chain
                draft = draft[:max(0, min(k, room))]
                block_parents, positions = None, None
            else:
                block_parents = np.concatenate([[-1], parents + 1])  # tree roots hang off the pending token
                positions = n - 1 + depths(block_parents)
            block = np.concatenate([[token], draft]).astype(np.int64)
            if not len(draft):  # nothing to verify: a plain decode step (the verify ops would only cost time)
                path, token = self._accept_on_host(block, draft, parents, block_parents, positions, prop, params,
                                                   rng)
            elif self.target.verifies and (params.greedy or (params.top_p >= 1.0 and prop.q is None)):
                # the verify graph accepts: O(nodes) numbers come back, not the [nodes, V] logits. The host path
                # remains for top-p, for chains drawn from draft distributions q (see verify.emit_verify) and for
                # bundles built before the verify extension.
                path, token = self.target.verify(
                    block, positions, np.arange(len(block)) - 1 if block_parents is None else block_parents,
                    params.temperature, params.top_k, None if params.greedy else rng.random((len(block), 2)))
                stats["verified_in_graph"] += 1
            else:
                path, token = self._accept_on_host(block, draft, parents, block_parents, positions, prop, params,
                                                   rng)
                stats["verified_on_host"] += 1
            if parents is not None:
                cache.compact(n + np.array(path, np.int64), n)  # node i sits at slot n + i
            cache.truncate(n + len(path))  # roll back: the rejected draft slots are simply forgotten
            if drafter and drafter.wants_hidden:  # the pending token and the accepted nodes, now committed
                drafter.observe(n - 1, drafter.features(self.target, np.concatenate([[0], np.add(path, 1)]).astype(int)))
            new = [int(t) for t in draft[path]] + [token]
            context[n:n + len(path)] = draft[path]
            n += len(path)
            generated += len(new)
            stats["verify_steps"] += 1
            stats["committed"] += len(new)
            stats["committed_per_pass"][len(new)] = stats["committed_per_pass"].get(len(new), 0) + 1
            stats["proposed"] += len(draft)
            max_depth = int(depths(parents).max()) + 1 if parents is not None and len(draft) else len(draft)
            if reach:
                reach.update(len(path), max_depth)
            for depth in range(max_depth):
                a = stats["accepted_per_depth"].setdefault(depth, [0, 0])
                a[0] += depth < len(path)
                a[1] += 1
            yield new

    def _accept_on_host(self, block, draft, parents, block_parents, positions, prop, params, rng):
        """Acceptance from the logits, copied to the host: (accepted draft nodes, the token after them)."""
        logits, argmax = self.target.forward(block, positions, block_parents, rows=np.arange(len(block)),
                                             full_logits=not params.greedy)  # greedy reads the argmax only
        if parents is not None:
            return (accept_tree_greedy(draft, parents, argmax) if params.greedy else
                    accept_tree_sampled(draft, parents, probabilities(logits, params), rng))
        if params.greedy:
            accepted, token = accept_greedy(draft, argmax)
        else:
            q = prop.q[:len(draft)] if prop.q is not None else None
            if q is not None and q.shape[1] < logits.shape[1]:  # a draft vocabulary may be a prefix
                q = np.pad(q, ((0, 0), (0, logits.shape[1] - q.shape[1])))
            accepted, token = accept_sampled(draft, q, probabilities(logits, params), rng)
        return list(range(accepted)), token

    def stream(self, prompt, max_new_tokens: int = 128, drafter: str | None = None, speculate: bool = True,
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
               stop: tuple[str, ...] = (), num_draft: int | None = None, tree: str | TreeSpec | None = None,
               chat: bool = True,
               on_text: Callable[[str], None] | None = None) -> Iterator[list[int]]:
        """Generate, yielding new token ids as they are committed; the final GenerationResult is the
        StopIteration value (use `generate` to just get it)."""
        params = SamplingParams(temperature, top_k, top_p, seed)
        ids = np.asarray(self.encode_chat(prompt) if isinstance(prompt, str) and chat else
                         self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt, np.int64)
        if len(ids) == 0:
            raise SpeccompileError("empty prompt")
        if max_new_tokens < 1:
            raise SpeccompileError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
        if len(ids) >= self.max_seq_len:
            raise ContextLengthError(f"prompt of {len(ids)} tokens does not fit the compiled context of "
                                     f"{self.max_seq_len} tokens (rebuild with a larger --max-seq-len)")
        if len(ids) + max_new_tokens > self.max_seq_len:
            raise ContextLengthError(f"prompt ({len(ids)} tokens) + --max-new-tokens {max_new_tokens} exceeds the "
                                     f"compiled context of {self.max_seq_len} tokens; ask for at most "
                                     f"{self.max_seq_len - len(ids)} new tokens")
        dr = None
        if speculate and self.drafters:
            name = drafter or next(iter(self.drafters))
            if name not in self.drafters:
                raise SpeccompileError(f"drafter {name!r} is not in this bundle (it has: {', '.join(self.drafters)})")
            dr = self.drafters[name]
        k = num_draft or (self.num_draft[dr.name] if dr else 0)
        if not 0 <= k < MAX_VERIFY_TOKENS:
            raise SpeccompileError(f"--num-draft {k}: must be between 1 and {MAX_VERIFY_TOKENS - 1}")
        if isinstance(tree, str):
            tree = TreeSpec.parse(tree)
        elif tree is None and dr is not None and self.trees.get(dr.name):
            tree = self.trees[dr.name]
        stats = {"drafter": dr.name if dr else None, "prompt_tokens": len(ids), "verify_steps": 0, "committed": 0, "proposed": 0,
                 "verified_in_graph": 0, "verified_on_host": 0,
                 "committed_per_pass": {},
                 "accepted_per_depth": {}}
        out: list[int] = []
        text, emitted = "", 0
        t0 = time.perf_counter()
        ttft = None
        stats["tree"] = tree.to_dict() if tree else None
        for new in self.steps(ids, max_new_tokens, dr, k, params, stats, tree):
            ttft = ttft if ttft is not None else time.perf_counter() - t0
            done, before = False, len(out)
            for t in new:
                out.append(t)
                if t in self.tokenizer.eos_token_ids or len(out) >= max_new_tokens:
                    done = True
                    break
            if stop or on_text:  # only these read the text as it grows; else it is decoded once, at the end
                text = self.tokenizer.decode(out)
                for s in stop:
                    if s and s in text:
                        text, done = text[:text.index(s)], True
                if on_text and not text.endswith("\ufffd"):  # hold back a partial UTF-8 character
                    on_text(text[emitted:])
                    emitted = len(text)
            yield out[before:]
            if done:
                break
        total = time.perf_counter() - t0
        if not (stop or on_text):
            text = self.tokenizer.decode(out)
        if on_text and emitted < len(text):
            on_text(text[emitted:])
        steps = stats["verify_steps"]
        weight_bytes = self.pass_bytes["screened" if params.greedy else "full"]
        stats.update(
            new_tokens=len(out), total_s=total, ttft_s=ttft,
            tokens_per_second=len(out) / total if total > 0 else 0.0,
            decode_tokens_per_second=(len(out) - 1) / (total - ttft) if total > ttft else 0.0,
            mean_accepted_tokens=stats.pop("committed") / steps if steps else 1.0,
            acceptance_rate_per_depth=[a / b for _, (a, b) in sorted(stats.pop("accepted_per_depth").items())],
            target_weight_bytes=weight_bytes,
            prefill_passes=-(-len(ids) // PREFILL_CHUNK),
            # bytes the target's weights cost per pass over the whole run: memory-bound decoding streams them all
            achieved_weight_bandwidth_gbps=weight_bytes * (steps + -(-len(ids) // PREFILL_CHUNK))
            / total / 1e9 if total > 0 else 0.0,
        )
        return GenerationResult(out, text, stats)

    def generate(self, prompt, max_new_tokens: int = 128, **kwargs) -> GenerationResult:
        it = self.stream(prompt, max_new_tokens, **kwargs)
        while True:
            try:
                next(it)
            except StopIteration as stop:
                return stop.value
