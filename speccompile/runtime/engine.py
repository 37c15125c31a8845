"""One compiled decoder graph + its KV cache, driven through IO binding.

`Engine.forward` runs one step: S tokens at given positions, written at cache slots [length, length+S), each
attending to the committed cache and to the tokens of the step its `parents` make it a descendant of (a chain
when no parents are given). The caller decides what to commit (`cache.truncate` / `cache.compact`).
"""
from __future__ import annotations

import os
import time

import numpy as np

from speccompile.format.bundle import resolve_inside
from speccompile.errors import SpeccompileError, given
from speccompile.graphs import MAX_STEP_TOKENS
from speccompile.runtime.kv_cache import DeviceKVCache, KVCache
# re-exported: the drafters and tools import them from here
from speccompile.runtime.sessions import (NEG_INF, ancestor_mask, open_session,  # noqa: F401
                                          bind_host, check_graph, providers_for, run_bound, session_options)

BIAS_WIDTH_STEP = 64  # the attention bias's width grows in steps of this many slots


def check_device_dtype(entry: dict, device: str) -> None:
    """A graph's dtype must have kernels on the device: onnxruntime's CPU provider has no bfloat16 MatMul, its
    CUDA GroupQueryAttention no float32 kernel (the nodes would fall back to the CPU, copying every cache each
    pass)."""
    dtype = entry["kv_cache"].get("dtype", "float32")
    if dtype == "bfloat16" and device == "cpu":
        raise SpeccompileError("this bundle is bfloat16, which onnxruntime's CPU provider cannot run (no bfloat16 "
                               f"MatMul): generate with {given('device', 'cuda')}, or build with --dtype float32 or "
                               "float16")
    if dtype == "float32" and device == "cuda" and entry.get("attention") == "ort":
        raise SpeccompileError(f"{given('device', 'cuda')} runs float16 or bfloat16 bundles (onnxruntime's CUDA "
                               "GroupQueryAttention has no float32 kernel): build with --dtype float16")


class Engine:
    def __new__(cls, bundle_dir: str, entry: dict, threads: int | None = None, device: str = "cpu", *args, **kw):
        """device="tensorrt": the model's TensorRT engine (runtime/trt_engine.py), wherever an Engine is made."""
        if device == "tensorrt":  # not an Engine, so Python does not call __init__ on it again
            from speccompile.runtime.trt_engine import TensorRTEngine
            return TensorRTEngine(bundle_dir, entry, threads, device, *args, **kw)
        return super().__new__(cls)

    def __init__(self, bundle_dir: str, entry: dict, threads: int | None = None, device: str = "cpu",
                 max_rows: int = 64, prepack: bool = True, cache: KVCache | None = None):
        """cache: the KV cache to bind (a slot of a batched cache, KVCache.slot); by default one of its own."""
        self.entry, self.device = entry, device
        cfg = entry["config"]
        kv = entry["kv_cache"]
        self.num_layers = entry["num_layers"]
        # a draft head with a reduced vocabulary scores fewer tokens than its config's vocab_size
        self.vocab_size = next(o["shape"][1] for o in entry["outputs"] if o["name"] == "logits")
        self.max_seq_len = kv["max_seq_len"]
        path = resolve_inside(bundle_dir, entry["graph"])
        providers = providers_for(device)
        check_device_dtype(entry, device)
        self.session = open_session(path, session_options(threads, prepack), providers)
        check_graph(self.session, entry, {"logits": self.vocab_size, "hidden_states": cfg["hidden_size"]})
        self.input_names = {i.name for i in self.session.get_inputs()}  # as TensorRTEngine's
        if self.session.get_providers()[0] != providers[0]:  # onnxruntime fell back to the CPU with a warning
            raise SpeccompileError(f"onnxruntime could not start its {providers[0]} (the CUDA or cuDNN libraries "
                                   "are missing or do not match the driver; its log above says which)")
        self.cache = cache or self._make_cache(bundle_dir, entry, device, providers)
        # a graph with the verify extension (speccompile.graphs) accepts drafts itself (`verify`); the generator
        # uses it while `verifies` is true (set it false to compare with acceptance on the host)
        self.verifies = "accept_node" in {o.name for o in self.session.get_outputs()}
        # Two bindings over the same cache: `forward` fetches the logits, `verify` leaves them unbound, so they
        # stay inside the graph (onnxruntime still computes them for the argmax and the sampling, but never
        # hands them out).
        self.io, self.io_verify = self.session.io_binding(), self.session.io_binding()
        for name, ov in self.cache.ortvalues():  # bound once: past and present share one buffer per layer
            for io in (self.io, self.io_verify):
                io.bind_ortvalue_input(f"past_{name}", ov)
                io.bind_ortvalue_output(f"present_{name}", ov)
        self.max_rows = max_rows
        width = next(i.shape[3] for i in self.session.get_inputs() if i.name == "attention_bias")
        self.bias_width = width if isinstance(width, int) else None  # bundles before graph version 3: LMAX
        self._bias = np.empty(MAX_STEP_TOKENS * self.max_seq_len, np.float32)  # attention_bias, reused each step
        # a step's small inputs live in fixed buffers bound by address: on the CPU a binding is redone only when a
        # shape changes (plain decoding rebinds just the attention bias, once per BIAS_WIDTH_STEP steps; see _bind)
        self._ids, self._pos = np.zeros((1, MAX_STEP_TOKENS), np.int64), np.zeros((1, MAX_STEP_TOKENS), np.int64)
        self._seqlens = np.zeros(1, np.int32)
        self._steps, self._rows = np.arange(MAX_STEP_TOKENS, dtype=np.int64), np.zeros(MAX_STEP_TOKENS, np.int64)
        self._bound: dict[int, dict[str, tuple]] = {id(self.io): {}, id(self.io_verify): {}}
        self._rebind_inputs = isinstance(self.cache, DeviceKVCache)  # inputs copied at binding (bind_host)
        self._chain = np.tril(np.ones((MAX_STEP_TOKENS, MAX_STEP_TOKENS), bool))  # a chain's visibility
        self.logits = np.zeros((max_rows, self.vocab_size), np.float32)
        self.next_token = np.zeros((max_rows,), np.int64)
        self.hidden = np.zeros((MAX_STEP_TOKENS, cfg["hidden_size"]), np.float32)  # last step's hidden states
        aux = next((o["shape"][1] for o in entry["outputs"] if o["name"] == "aux_hidden_states"), 0)
        self.aux = np.zeros((MAX_STEP_TOKENS, aux), np.float32) if aux else None  # what EAGLE heads read
        self.verify_feed = {"node_parents": np.zeros(max_rows, np.int64), "temperature": np.zeros(1, np.float32),
                            "top_k": np.zeros(1, np.int64), "uniforms": np.zeros((max_rows, 2))}
        self._head_inputs(max_rows)
        # the verify outputs of the last `verify` pass
        self.node_prob = np.zeros(max_rows, np.float64)
        self.accept = np.zeros(3, np.int64)  # accept_node, accept_len, accept_token
        self.weight_bytes = sum(os.path.getsize(resolve_inside(bundle_dir, w)) for w in entry["weights"])
        self.passes, self.tokens_run, self.run_s = 0, 0, 0.0  # forward calls, their tokens; seconds in onnxruntime
        self.min_rows = 1  # fewer tokens run with a pad row, where one row takes another kernel (row_parity.py)
        self._pad_tokens, self._first_row = np.zeros(2, np.int64), np.zeros(1, np.int64)  # reused each pad step
        self._slots = self.max_seq_len + kv.get("scratch_slots", 0)  # what the cache holds, scratch included

    @property
    def verifies_sampled(self) -> bool:
        """Whether sampled drafts are accepted in the graph: float32 graphs only. A float16 graph would take the
        softmax of logits / T in float16 (probabilities rounded to float16, and logits / T past float16's range
        infinite at low temperatures); the host accepts them from the logits in float64 instead."""
        return self.verifies and self.entry["kv_cache"].get("dtype", "float32") == "float32"

    def _head_inputs(self, max_rows: int) -> None:
        """The buffers of a graph with the exact greedy head (compile/graph/head_screen.py): full_logits, false
        letting a greedy pass read a quarter of the head's bytes (its logits then estimates, its next_token still
        exact); sample_noise, rows added to the logits before the argmax (runtime/noise.py), [1, 1] zeros: none."""
        optional = {i.name for i in self.session.get_overridable_initializers()}  # inputs with defaults
        self._full_logits = np.ones(1, bool) if "full_logits" in optional else None
        self.takes_noise = "sample_noise" in optional
        self.takes_noise_top_k = "noise_top_k" in optional  # the noisy argmax within each row's top-k
        self._no_noise, self._noise_top_k = np.zeros((1, 1), np.float32), np.zeros(1, np.int64)
        self._noise = np.zeros((max_rows if self.takes_noise else 0, self.vocab_size), np.float32)  # stays bound

    # tests set this to drive the device-resident cache's code path (OrtValues, compaction graph) on the CPU
    resident_on_cpu = False

    def _make_cache(self, bundle_dir: str, entry: dict, device: str, providers: list[str]):
        """The KV cache in the bundle's dtype: host numpy arrays on the CPU, device memory elsewhere (the step's
        small inputs and outputs stay in host buffers bound by address, which onnxruntime copies across: a few
        hundred bytes a pass, the [R, V] logits only when `forward` asks for them)."""
        kv = entry["kv_cache"]
        dims = (self.num_layers, kv["num_kv_heads"], self.max_seq_len, kv["head_dim"])
        dtype = kv.get("dtype", "float32")
        scratch = kv.get("scratch_slots", 0)
        if device == "cpu" and not self.resident_on_cpu:
            return KVCache(*dims, dtype=dtype, scratch=scratch)
        compact = entry.get("kv_compact")
        session = (open_session(resolve_inside(bundle_dir, compact), session_options(1), providers)
                   if compact else None)
        return DeviceKVCache(*dims, dtype=dtype, device=device if device == "cpu" else "cuda",
                             compact_session=session, scratch=scratch)

    def forward(self, tokens: np.ndarray, positions: np.ndarray | None = None, parents: np.ndarray | None = None,
                rows: np.ndarray | None = None, committed: int | None = None, hidden_in: np.ndarray | None = None,
                full_logits: bool = True, noise: np.ndarray | None = None):
        """Run S = len(tokens) tokens, writing their K/V at slots [length, length+S).

        Slots below `committed` (default: the cache length) are visible to every token. Slots from `committed` on
        form a tree region that ends with this step's tokens; `parents` (one per region slot, relative to
        `committed`, -1 for a root) says which of them each token sees: itself and its ancestors. None means
        a chain. Returns (logits[R, V], next_token[R]) views, valid until the next call; `rows` (default: the
        last token) selects the tokens whose logits are computed. `self.hidden[:S]` then holds the step's hidden
        states. `hidden_in` [S, H] feeds an MTP head. full_logits=False: the caller reads only next_token (greedy),
        so a graph with the exact greedy head may return estimated logits. noise (a graph that `takes_noise`): R rows
        of V values, added to the rows' logits before next_token's argmax (runtime/noise.py)."""
        self.passes, self.tokens_run = self.passes + 1, self.tokens_run + len(tokens)
        padded = len(tokens) < self.min_rows and hidden_in is None and self.cache.length + 2 <= self._slots
        if padded:
            tokens, positions, parents, rows = self._with_pad_row(tokens, positions, parents, rows)
        R = self._bind_step(self.io, tokens, positions, parents, rows, committed, hidden_in, full_logits, noise,
                            padded)
        self._bind(self.io, "logits", self.logits, [R, self.vocab_size], output=True)
        self._run(self.io)
        return self.logits[:R], self.next_token[:R]

    def _run(self, io) -> None:
        t0 = time.perf_counter()
        run_bound(self.session, io, self.entry["graph"])
        self.run_s += time.perf_counter() - t0

    def _with_pad_row(self, tokens, positions, parents, rows):
        """A one-token step as a two-token one (min_rows): the token again as its child, one slot on. Only the
        first row's results are read; the pad row's K/V land in the slot the next step writes before it reads it."""
        self._pad_tokens[:] = tokens[0]
        positions = None if positions is None else np.array([positions[0], positions[0] + 1], np.int64)
        parents = None if parents is None else np.append(np.asarray(parents, np.int64), len(parents) - 1)
        return self._pad_tokens, positions, parents, (self._first_row if rows is None else rows)

    def verify(self, tokens: np.ndarray, positions: np.ndarray | None, parents: np.ndarray,
               temperature: float = 0.0, top_k: int = 0, uniforms: np.ndarray | None = None,
               noise: np.ndarray | None = None):
        """One verify pass with acceptance in the graph (a graph with the verify extension); no logits are fetched.

        tokens: the pending token, then the draft nodes; parents: per token its parent in the block (-1 for the
        pending token; a chain is arange(S) - 1); temperature 0: greedy, else sampled with top_k (0 = off), using
        uniforms [S, 2] drawn by the caller (see speccompile.graphs); noise: S rows, as `forward`'s. Returns (the
        accepted nodes, as indices into tokens[1:], root first; the token to commit after them); `self.hidden[:S]`
        holds the hidden states.
        The host only walks the accepted path back from its end."""
        parents = np.asarray(parents, np.int64)
        S, io = len(tokens), self.io_verify
        self._bind_step(io, tokens, positions, parents, np.arange(S), None, None, False, noise)  # no logits leave
        # defaulted inputs are initializers to onnxruntime, which bind_cpu_input rejects: bind them by pointer
        f = self.verify_feed
        f["node_parents"][:S] = parents
        f["temperature"][0], f["top_k"][0] = temperature, top_k if 0 < top_k < self.vocab_size else 0
        f["uniforms"][:S] = 0.0 if uniforms is None else uniforms
        for name, shape in (("node_parents", [S]), ("temperature", [1]), ("top_k", [1]), ("uniforms", [S, 2])):
            self._bind(io, name, f[name], shape)
        self._bind(io, "node_prob", self.node_prob, [S], output=True)
        for i, name in enumerate(("accept_node", "accept_len", "accept_token")):
            self._bind(io, name, self.accept[i:], [1], output=True)
        self._run(io)
        end, path = int(self.accept[0]), []
        while end > 0:
            path.append(end - 1)
            end = int(parents[end])
        return path[::-1], int(self.accept[2])

    def _bind_step(self, io, tokens, positions, parents, rows, committed, hidden_in, full_logits, noise=None,
                   padded: bool = False) -> int:
        """Bind a step's inputs and its next_token / hidden_states outputs; returns R. padded: the last token is a
        pad row (`_with_pad_row`), which may take a scratch slot."""
        S = len(tokens)
        if S > MAX_STEP_TOKENS:
            raise SpeccompileError(f"step of {S} tokens: at most {MAX_STEP_TOKENS} per pass")
        W = self.cache.length
        C = W if committed is None else committed
        if W + S - padded > self.max_seq_len:
            raise SpeccompileError(f"step of {S - padded} tokens at length {W} exceeds the compiled context "
                                   f"{self.max_seq_len}")
        self._ids[0, :S] = tokens
        if positions is None:  # a chain: the slots' own positions
            np.add(self._steps[:S], W, out=self._pos[0, :S])
        else:
            self._pos[0, :S] = positions
        self._seqlens[0] = W + S - 1
        if rows is None:
            R, self._rows[0] = 1, S - 1
        else:
            R = len(rows)
            if R > self.max_rows:
                raise SpeccompileError(f"{R} logits rows requested; at most {self.max_rows}")
            self._rows[:R] = rows
        region = W + S - C
        # the slots in use (the kernel works over as many slots as the bias is wide), unless the graph fixes the
        # width; rounded up to BIAS_WIDTH_STEP so plain decoding rebinds the bias once per that many steps (a
        # binding costs more than the masked extra slots cost the kernel: docs/results.md, runtime constants)
        T = self.bias_width or max(min(-(-(W + S) // BIAS_WIDTH_STEP) * BIAS_WIDTH_STEP, self.max_seq_len), W + S)
        bias = self._bias[:S * T].reshape(1, 1, S, T)  # a view of one buffer: no allocation per step
        bias.fill(NEG_INF)
        bias[0, 0, :, :C] = 0.0
        visible = (self._chain[:region, :region] if parents is None else ancestor_mask(parents))[-S:]
        np.copyto(bias[0, 0, :, C:W + S], 0.0, where=visible)  # in place: no gathered copy
        self._bind(io, "input_ids", self._ids, [1, S])
        self._bind(io, "position_ids", self._pos, [1, S])
        self._bind(io, "seqlens_k", self._seqlens, [1])
        self._bind(io, "attention_bias", self._bias, [1, 1, S, T])  # the buffer `bias` views
        self._bind(io, "logits_index", self._rows, [R])
        self._bind(io, "next_token", self.next_token, [R], output=True)
        self._bind(io, "hidden_states", self.hidden, [S, self.hidden.shape[1]], output=True)
        if self.aux is not None:
            self._bind(io, "aux_hidden_states", self.aux, [S, self.aux.shape[1]], output=True)
        if self._full_logits is not None:  # bound by address: io_verify and io share the buffer, set per pass
            self._full_logits[0] = full_logits
            self._bind(io, "full_logits", self._full_logits, [1])
        self._bind_noise(io, noise, R)
        if hidden_in is not None:
            io.bind_cpu_input("hidden_in", np.ascontiguousarray(hidden_in, np.float32).reshape(1, S, -1))
        return R

    def _bind_noise(self, io, noise, R: int) -> None:
        """sample_noise: the R rows of `noise` ([1, 1] zeros for None), and their top_k (runtime/noise.py)."""
        if not self.takes_noise:
            if noise is not None:
                raise SpeccompileError("this graph takes no sample_noise (a bundle built before it, or without "
                                       "the exact greedy head)")
            return
        if noise is None:
            self._bind(io, "sample_noise", self._no_noise, [1, 1])
            return
        if len(noise) != R:
            raise SpeccompileError(f"{len(noise)} noise rows for {R} rows of logits")
        for i, row in enumerate(noise):  # copied into the bound buffer: cheaper than a new binding
            self._noise[i] = row
        self._bind(io, "sample_noise", self._noise, [R, self.vocab_size])
        self._bind_top_k(io, getattr(noise, "top_k", 0))

    def _bind_top_k(self, io, top_k: int) -> None:
        """The noise's top_k, for graphs that take it (one value for every row)."""
        if self.takes_noise_top_k:
            self._noise_top_k[0] = top_k
            self._bind(io, "noise_top_k", self._noise_top_k, [1])
        elif top_k:
            raise SpeccompileError("this graph cannot keep sampling by noise to the top k (built before "
                                   "noise_top_k): rebuild the bundle")

    def _bind(self, io, name: str, buf: np.ndarray, shape: list[int], output: bool = False) -> None:
        """`buf` bound as `name` with `shape` in `io` (sessions.bind_host: kept while it stands, on the CPU)."""
        bind_host(io, self._bound[id(io)], name, buf, shape, output, self._rebind_inputs)
