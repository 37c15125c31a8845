"""A batched graph (speccompile.graphs, batched form: the target's, or a drafter's for its slots' catch-ups,
runtime/shared_catch_up.py) over the sequence slots of one KV cache.

One `run` is one pass over a consecutive run of slots: each slot its own step (a prefill chunk, a pending token and
its draft tree, or nothing), laid out padded to the longest step's rows for the attention; a graph of version 4
runs everything else over the real rows alone (row_index), so a slot's draft rows cost the others nothing. The
cache is the batched KVCache the Generator (or RuntimeContext.slot_cache) allocates; slot b's committed length
lives in `cache.slot(b)`-style views the caller keeps (`SlotStep.length`).
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import onnxruntime as ort

from speccompile.errors import SpeccompileError
from speccompile.format.bundle import resolve_inside
from speccompile.graphs import MAX_STEP_TOKENS
from speccompile.runtime.engine import BIAS_WIDTH_STEP, NEG_INF, ancestor_mask, open_session, providers_for, \
    session_options
from speccompile.runtime.kv_cache import KVCache
from speccompile.runtime.sessions import bind_host, check_graph, run_bound

# A chain's bias rows up to this many are written row by row (a decode step's one row, a short chain): cheaper than
# building its visibility mask, which a prefill chunk's many rows still use.
CHAIN_ROWS_BY_ROW = 8


@dataclasses.dataclass
class SlotStep:
    """One slot's part of a pass: tokens written at cache slots [length, length + S); slots below `committed`
    (default: length) visible to all of them, the rest a tree region whose visibility `parents` gives (relative
    to committed; None: a chain), as Engine.forward. rows: the tokens whose logits and next_token are wanted."""
    slot: int
    tokens: np.ndarray
    length: int
    positions: np.ndarray | None = None
    parents: np.ndarray | None = None
    committed: int | None = None
    rows: np.ndarray | None = None  # default: the last token
    noise: list | None = None  # a [V] row per wanted row, added to its logits before the argmax (runtime/noise.py)
    hidden_in: np.ndarray | None = None  # a draft head's graph: the feature before each token, [len(tokens), H]

    @property
    def wanted(self) -> np.ndarray:
        return np.array([len(self.tokens) - 1]) if self.rows is None else np.asarray(self.rows, np.int64)


class BatchEngine:
    def __init__(self, bundle_dir: str, entry: dict, cache: KVCache, threads: int | None = None,
                 device: str = "cpu", min_rows: int = 1, prepack: bool = True):
        """min_rows: a pass of fewer rows runs a neighbour slot's throw-away row too (Engine.min_rows,
        runtime/row_parity.py); prepack: as Engine's (a graph over the target's mapped weights keeps to them)."""
        self.entry, self.cache, self.min_rows = entry, cache, min_rows
        self.num_layers, self.max_seq_len = entry["num_layers"], cache.max_seq_len
        self.slots = cache.batch
        self.vocab_size = next(o["shape"][1] for o in entry["outputs"] if o["name"] == "logits")
        self.session = open_session(resolve_inside(bundle_dir, entry["graph"]), session_options(threads, prepack),
                                    providers_for(device))
        check_graph(self.session, entry, {"logits": self.vocab_size, "hidden_states": entry["config"]["hidden_size"]})
        self._rebind_inputs = device != "cpu"  # inputs copied at binding (sessions.bind_host)
        B, S = self.slots, MAX_STEP_TOKENS
        self._id_buf, self._pos_buf = np.zeros(B * S, np.int64), np.zeros(B * S, np.int64)  # [n, S] views per pass
        self._seqlens, self._qlens = np.zeros(B, np.int32), np.zeros(B, np.int32)
        self._bias = np.empty(B * S * self.max_seq_len, np.float32)
        self._rows = np.zeros(B * S, np.int64)
        self.packed = "row_index" in {i.name for i in self.session.get_inputs()}  # batched graph version 4
        # the attention runs each slot's real rows alone (speccompile's kernel): slots as deep as the pass's longest
        # step cost nothing for their padding rows, so prompt chunks of several slots may share a pass
        self.padding_free = self.packed and entry.get("attention") == "kernel"
        self._row_index, self._layout_index = np.zeros(B * S, np.int64), np.zeros(B * S, np.int64)
        self.logits = np.zeros((B * S, self.vocab_size), np.float32)
        self.next_token = np.zeros(B * S, np.int64)
        self.hidden = np.zeros((B * S, entry["config"]["hidden_size"]), np.float32)
        self.takes_hidden = "hidden_in" in {i.name for i in self.session.get_inputs()}  # a draft head's batched form
        self._hidden_in = np.zeros_like(self.hidden) if self.takes_hidden else None
        aux = next((o["shape"][1] for o in entry["outputs"] if o["name"] == "aux_hidden_states"), 0)
        self.aux = np.zeros((B * S, aux), np.float32) if aux else None
        optional = {i.name for i in self.session.get_overridable_initializers()}
        self._full_logits = np.ones(1, bool) if "full_logits" in optional else None
        self.takes_noise, self._no_noise = "sample_noise" in optional, np.zeros((1, 1), np.float32)
        self.takes_noise_top_k = "noise_top_k" in optional  # each noisy row's argmax within its request's top-k
        self._top_k = np.zeros(B * S, np.int64)
        self._noise_rows = np.zeros((0, self.vocab_size), np.float32)  # grown to the most rows a noisy pass had
        self._io: dict[tuple[int, int], tuple[ort.IOBinding, dict]] = {}  # per slot run: binding, bound shapes
        self.weight_bytes = sum(os.path.getsize(resolve_inside(bundle_dir, w)) for w in entry["weights"])

    def _binding(self, first: int, n: int):
        """The IO binding of slots [first, first + n): their cache rows bound once as past and present."""
        if (first, n) not in self._io:
            io = self.session.io_binding()
            for i in range(self.num_layers):
                for kind, arr in (("key", self.cache.key[i]), ("value", self.cache.value[i])):
                    ov = ort.OrtValue.ortvalue_from_numpy(arr[first:first + n])
                    io.bind_ortvalue_input(f"past_{kind}.{i}", ov)
                    io.bind_ortvalue_output(f"present_{kind}.{i}", ov)
            self._io[(first, n)] = (io, {})
        return self._io[(first, n)]

    def run(self, steps: list[SlotStep], full_logits: bool = True, idle: dict[int, int] | None = None):
        """One pass over the slots of `steps`. A slot between them that has no step runs one throw-away row
        written just past its committed length, `idle[slot]` (0 for a free slot): never over its committed K/V.
        Returns {slot: (logits rows, next_token rows, hidden-state row indices)}: views valid until the next call;
        hidden rows index `self.hidden` (and `self.aux`)."""
        by_slot = {s.slot: s for s in steps}
        first, last = min(by_slot), max(by_slot)
        S = max(len(s.tokens) for s in steps)
        if (last - first + 1) * S < self.min_rows:  # one row alone: a neighbour slot's throw-away row beside it
            first, last = (first, last + 1) if last + 1 < self.slots else (first - 1, last)
        n = last - first + 1
        if S > MAX_STEP_TOKENS:
            raise SpeccompileError(f"step of {S} tokens: at most {MAX_STEP_TOKENS} per pass")
        idle = {b: (idle or {}).get(b, 0) for b in range(first, last + 1) if b not in by_slot}
        width = max([s.length + len(s.tokens) for s in steps] + [w + 1 for w in idle.values()])
        if width > self.max_seq_len:
            raise SpeccompileError(f"step reaches {width} tokens: the compiled context is {self.max_seq_len}")
        deepest = max([s.length for s in steps] + list(idle.values()))
        if deepest + S > self.cache.capacity:  # every slot of the run is laid out S rows deep past its K/V
            raise SpeccompileError(f"a shared pass of {S} rows a slot after {deepest} committed tokens does not fit "
                                   f"in the cache's {self.cache.capacity} slots a sequence")
        T = min(-(-width // BIAS_WIDTH_STEP) * BIAS_WIDTH_STEP, self.max_seq_len)
        bias = self._bias[:n * S * T].reshape(n, 1, S, T)
        bias.fill(NEG_INF)
        bias[:, :, :, 0] = 0.0  # padding rows see slot 0: no row is fully masked
        ids, pos = self._id_buf[:n * S].reshape(n, S), self._pos_buf[:n * S].reshape(n, S)
        ids.fill(0)
        pos.fill(0)
        for j in range(n):
            step = by_slot.get(first + j)
            if step is None:  # an idle slot inside the run: one row at its committed length (sees slot 0 only)
                self._seqlens[j], self._qlens[j], pos[j, 0] = idle[first + j], 1, idle[first + j]
            else:
                self._fill_slot(j, step, ids[j], pos[j], bias[j, 0])
        starts = self._pack(n, S)
        if self.takes_hidden:
            self._pack_hidden(n, starts, by_slot, first)
        R = 0
        out, noisy = {}, []
        for j in range(n):
            step = by_slot.get(first + j)
            if step is None:
                continue
            rows = step.wanted
            self._rows[R:R + len(rows)] = starts[j] + rows
            out[step.slot] = (slice(R, R + len(rows)), starts[j] + np.arange(len(step.tokens)))
            if step.noise is not None:
                noisy.append((out[step.slot][0], step.noise))
            R += len(rows)
        self._bind_and_run(first, n, S, T, R, full_logits, self._noise(R, noisy),
                           self._top_ks(R, noisy), int(self._qlens[:n].sum()) if self.packed else n * S)
        return {b: (self.logits[r], self.next_token[r], h) for b, (r, h) in out.items()}

    def _pack(self, n: int, S: int) -> list[int]:
        """Where each slot's rows start among the rows the graph's products run: the real rows alone, packed
        (row_index; layout_index sends a padding position to its slot's last real row, which nothing reads
        there), or the whole [n, S] layout for a graph before version 4. In Python: a pass has a few slots, and
        numpy's per-call cost exceeds the work."""
        if not self.packed:
            return [j * S for j in range(n)]
        starts, rows, layout = [], [], []
        for j, q in enumerate(self._qlens[:n].tolist()):
            start = len(rows)
            starts.append(start)
            rows.extend(range(j * S, j * S + q))
            layout.extend(start + min(i, q - 1) for i in range(S))
        self._row_index[:len(rows)] = rows
        self._layout_index[:n * S] = layout
        return starts

    def _pack_hidden(self, n: int, starts: list[int], by_slot: dict, first: int) -> None:
        """A draft head's hidden_in: each slot's features at its packed rows (an idle slot's row: zeros)."""
        for j in range(n):
            step, q = by_slot.get(first + j), int(self._qlens[j])
            rows = self._hidden_in[starts[j]:starts[j] + q]
            if step is None:
                rows.fill(0.0)
            elif step.hidden_in is None or len(step.hidden_in) != q:
                raise SpeccompileError(f"slot {step.slot}: a draft head's step takes one feature row per token")
            else:
                rows[:] = step.hidden_in

    def _fill_slot(self, j: int, step: SlotStep, ids: np.ndarray, pos: np.ndarray, bias: np.ndarray) -> None:
        """Row j of the pass's inputs from one slot's step: its ids, positions and [S, T] bias rows."""
        k, W = len(step.tokens), step.length
        C = W if step.committed is None else step.committed
        ids[:k] = step.tokens
        pos[:k] = np.arange(W, W + k) if step.positions is None else step.positions
        self._seqlens[j], self._qlens[j] = W + k - 1, k
        if step.parents is None and k <= CHAIN_ROWS_BY_ROW:  # a chain: row i sees every column up to its own
            for i in range(k):
                bias[i, :W + i + 1] = 0.0
            return
        region = W + k - C
        visible = (np.tril(np.ones((region, region), bool)) if step.parents is None
                   else ancestor_mask(np.asarray(step.parents)))[-k:]
        bias[:k, :C] = 0.0
        np.copyto(bias[:k, C:W + k], 0.0, where=visible)

    def _noise(self, R: int, noisy: list) -> np.ndarray | None:
        """The pass's sample_noise: the slots' noise rows at their rows, zeros elsewhere; [1, 1] zeros if none."""
        if not noisy:
            return self._no_noise if self.takes_noise else None
        if not self.takes_noise:
            raise SpeccompileError("this batched graph takes no sample_noise (a bundle built before it)")
        if len(self._noise_rows) < R:
            self._noise_rows = np.zeros((R, self.vocab_size), np.float32)
        noise, start = self._noise_rows[:R], 0
        for rows, rows_noise in noisy:  # slots in row order; the rows between them (others' slots) zero
            noise[start:rows.start] = 0.0
            for i, row in enumerate(rows_noise):
                noise[rows.start + i] = row
            start = rows.stop
        noise[start:] = 0.0
        return noise

    def _top_ks(self, R: int, noisy: list) -> np.ndarray | None:
        """The pass's noise_top_k: each noisy row its request's top_k, 0 elsewhere; [1] zeros without noise."""
        if not self.takes_noise_top_k:
            if any(getattr(rows_noise, "top_k", 0) for _, rows_noise in noisy):
                raise SpeccompileError("this batched graph cannot keep sampling by noise to the top k (built "
                                       "before noise_top_k): rebuild the bundle")
            return None
        if not noisy:
            self._top_k[0] = 0
            return self._top_k[:1]
        top_k = self._top_k[:R]
        top_k.fill(0)
        for rows, rows_noise in noisy:
            top_k[rows] = getattr(rows_noise, "top_k", 0)
        return top_k

    def _bind_and_run(self, first, n, S, T, R, full_logits, noise, top_k, P) -> None:
        """The pass's inputs, filled in the engine's buffers ([n, S] ids and positions, [n, 1, S, T] bias), bound and
        run. P: the rows the products run, whose hidden states come back."""
        io, bound = self._binding(first, n)

        def bind(name, buf, shape, output=False):
            bind_host(io, bound, name, buf, shape, output, self._rebind_inputs)

        if self.takes_hidden:
            bind("hidden_in", self._hidden_in, [1, P, self._hidden_in.shape[1]])
        bind("input_ids", self._id_buf, [n, S])  # the buffers themselves, of which ids, pos and bias are views
        bind("position_ids", self._pos_buf, [n, S])
        bind("seqlens_k", self._seqlens, [n])
        bind("query_seqlens", self._qlens, [n])
        bind("attention_bias", self._bias, [n, 1, S, T])
        bind("logits_index", self._rows, [R])
        if self.packed:
            bind("row_index", self._row_index, [P])
            bind("layout_index", self._layout_index, [n * S])
        bind("logits", self.logits, [R, self.vocab_size], output=True)
        bind("next_token", self.next_token, [R], output=True)
        bind("hidden_states", self.hidden, [P, self.hidden.shape[1]], output=True)
        if self.aux is not None:
            bind("aux_hidden_states", self.aux, [P, self.aux.shape[1]], output=True)
        if self._full_logits is not None:
            self._full_logits[0] = full_logits
            bind("full_logits", self._full_logits, [1])
        if noise is not None:
            bind("sample_noise", noise, list(noise.shape))
        if top_k is not None:
            bind("noise_top_k", self._top_k, [len(top_k)])  # top_k views its first elements
        run_bound(self.session, io, self.entry["graph"])
