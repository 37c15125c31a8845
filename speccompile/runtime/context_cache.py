"""The context cache: requests that share a token prefix with earlier ones (the turns of a chat, a common system
prompt, few-shot examples) reuse that prefix's K/V instead of running it through the target again.

A prompt is cut into whole blocks of `block_tokens` tokens. Block i's key hashes the bundle's identity and every
token up to the end of block i (a hash chain, as vLLM's prefix caching keys its blocks), so equal keys mean equal
prefixes. Each cached block holds *parts*: "target" (the target's K/V rows of the block, copied out of the static
cache) and whatever per-position state a drafter keeps (format: `Part`). Every array has the block's positions on
axis 0. The memory tier is bounded by a byte budget with least-recently-used eviction; touching a prefix touches
its blocks last to first, so a chain's early blocks (shared by the most requests) are evicted last. An optional
disk tier (runtime/context_disk.py: one `.npz` per block, read with allow_pickle=False, and a JSON index) survives
restarts: a file that is corrupt, of another bundle or of another layout is ignored with a warning, never trusted.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import numbers
import os
import threading
from typing import Callable

import numpy as np
import onnxruntime as ort

from speccompile.errors import SpeccompileError, given, option
from speccompile.runtime.context_disk import DEFAULT_DISK_BYTES, Arrays, DiskTier
from speccompile.runtime.machine_id import cpu_identity

DEFAULT_BLOCK_TOKENS = 16
DEFAULT_CACHE_BYTES = 1 << 30
# what a block's per-position state means; part of every identity, so blocks kept under another meaning never match
# (2: an MTP/EAGLE head's cache slots shifted one back, runtime/drafters/mtp.py save_state)
STATE_VERSION = 2


@dataclasses.dataclass(frozen=True)
class Part:
    """A kind of per-position state kept for each cached block. layout: array name -> (shape after the position
    axis, dtype name). required: a cached prefix is usable only as far as this part is cached (state that cannot
    be rebuilt); an optional part is restored as far as it reaches and its owner rebuilds the rest."""
    layout: dict[str, tuple[tuple[int, ...], str]]
    required: bool = True

    def fits(self, arrays: Arrays, positions: int) -> bool:
        return set(arrays) == set(self.layout) and all(
            arrays[n].shape == (positions, *shape) and arrays[n].dtype == np.dtype(dtype)
            for n, (shape, dtype) in self.layout.items())


def bundle_identity(manifest: dict, runtime: str = "") -> str:
    """A hash of every file of the bundle (the manifest lists each one's sha256) and of the runtime that computes
    the K/V: another bundle's (or another onnxruntime's) blocks never match."""
    files = json.dumps(manifest.get("files", {}), sort_keys=True)
    return hashlib.sha256(f"{files}\n{runtime}\nstate {STATE_VERSION}".encode()).hexdigest()


def runtime_identity(min_rows: int, device: str) -> str:
    """What computes the K/V besides the bundle: onnxruntime's version, the one-row rule (runtime/row_parity.py),
    the device, and the CPU's model and kernel instruction sets, by which the kernels pick paths whose sums round
    differently: a --cache-dir shared by other machines never restores K/V another kind computed."""
    return f"onnxruntime {ort.__version__}, rows {min_rows}, {device}, {json.dumps(cpu_identity(), sort_keys=True)}"


def kv_part(cache, required: bool = True) -> Part:
    """The layout of a KV cache's rows (kv_cache.KVCache: [layers, slots, kv heads, positions, head dim])."""
    layers, _, heads, _, dim = cache.key.shape
    shape = ((layers, heads, dim), cache.key.dtype.name)
    return Part({"key": shape, "value": shape}, required)


def cache_parts(target_cache, drafters) -> dict[str, Part]:
    """Every part a bundle's blocks may hold: the target's K/V and each drafter's state ("<drafter>#<part>")."""
    parts = {"target": kv_part(target_cache)}
    for d in drafters:
        parts.update({f"{d.name}#{p}": part for p, part in d.state_parts().items()})
    return parts


def kept_on(asked: bool, host_caches: bool, cache_dir: str | None, bundle_dir: str) -> bool:
    """Whether a Generator keeps a context cache: asked for, and its engines' K/V in host memory, through which
    blocks are copied (a device's caches go without). A cache_dir that would keep nothing is refused, not
    ignored, as is one check_cache_dir refuses (here, so that every way of loading is checked: `serve` too)."""
    check_cache_dir(bundle_dir, cache_dir, asked)
    if asked and cache_dir is not None and not host_caches:
        raise SpeccompileError(f"{given('cache_dir', cache_dir)}: the context cache copies K/V through host memory, "
                               f"and this device keeps its caches on the device, so there is none to keep; drop "
                               f"{option('cache_dir')}")
    return asked and host_caches


def read_kv(cache, start: int, stop: int, slot: int = 0) -> Arrays:
    """Copies of a KV cache's rows [start, stop) of one sequence slot, positions first (always copies: with one
    layer and one head the transposed view is already contiguous, and a view would change with the cache)."""
    return {n: getattr(cache, n)[:, slot, :, start:stop].transpose(2, 0, 1, 3).copy() for n in ("key", "value")}


def write_kv(cache, arrays: Arrays, start: int = 0, slot: int = 0) -> None:
    """Put rows read by `read_kv` back at [start, start + positions) of one sequence slot."""
    for n in ("key", "value"):
        rows = arrays[n]
        getattr(cache, n)[:, slot, :, start:start + len(rows)] = rows.transpose(1, 2, 0, 3)


def check_cache_dir(bundle_dir: str, cache_dir, context_cache: bool = True) -> None:
    """Refuse a cache_dir that is no folder's name (an empty one would keep nothing, silently), one beside
    context_cache=False (ignored), and a disk tier inside the bundle: files there that its manifest does not list
    fail its check on every later load."""
    if cache_dir is None:
        return
    if not isinstance(cache_dir, (str, os.PathLike)) or not isinstance(os.fspath(cache_dir), str) \
            or not os.fspath(cache_dir):
        raise SpeccompileError(f"context cache: {option('cache_dir')} must name a folder, not {cache_dir!r}")
    if not context_cache:
        raise SpeccompileError("context_cache=False keeps no context cache: drop cache_dir")
    root, folder = os.path.realpath(bundle_dir), os.path.realpath(cache_dir)
    if os.path.commonpath([root, folder]) == root:
        raise SpeccompileError(f"context cache: {given('cache_dir', cache_dir)} is inside the bundle {bundle_dir!r}, "
                               "whose files must all be listed in its manifest; choose a folder outside it")


class ContextCache:
    def __init__(self, identity: str, parts: dict[str, Part], max_bytes: int = DEFAULT_CACHE_BYTES,
                 block_tokens: int = DEFAULT_BLOCK_TOKENS, cache_dir: str | None = None,
                 disk_bytes: int = DEFAULT_DISK_BYTES):
        """parts: every part a block may hold (the target's and the drafters'); arrays of other layouts are never
        kept. cache_dir: the disk tier's folder (a subfolder per bundle identity; at most disk_bytes of blocks in all),
        None for memory only."""
        if not all(isinstance(n, numbers.Integral) and not isinstance(n, bool) for n in (max_bytes, block_tokens)) \
                or block_tokens < 1 or max_bytes < 0:  # nan or a string would never compare as too many bytes
            raise SpeccompileError(f"context cache: its bytes ({option('cache_bytes')}) must be a whole number "
                                   f"at least 0, not {max_bytes!r}, and its block at least one token, not "
                                   f"{block_tokens!r}")
        self.identity, self.parts = identity, parts
        self.max_bytes, self.block_tokens = max_bytes, block_tokens
        self.blocks: collections.OrderedDict[str, dict[str, Arrays]] = collections.OrderedDict()  # LRU first
        self.nbytes = 0
        self._lock = threading.RLock()  # one cache may serve several sequences' threads
        try:
            self.disk = DiskTier(cache_dir, identity, block_tokens, disk_bytes) if cache_dir else None
        except OSError as e:  # a file there, or a folder it may not write
            raise SpeccompileError(f"context cache: cannot keep blocks in {given('cache_dir', cache_dir)}: {e}") \
                from None

    def keys(self, tokens: np.ndarray, limit: int | None = None) -> list[str]:
        """The hash-chain key of each whole block within tokens[:limit]."""
        n = len(tokens) if limit is None else min(limit, len(tokens))
        h = hashlib.sha256(f"{self.identity}:{self.block_tokens}".encode())
        keys = []
        for start in range(0, n - self.block_tokens + 1, self.block_tokens):
            h.update(np.asarray(tokens[start:start + self.block_tokens], "<i8").tobytes())
            keys.append(h.copy().hexdigest())
        return keys

    def lookup(self, tokens: np.ndarray, limit: int, wanted: list[str]) -> list[dict[str, Arrays]]:
        """The cached blocks of the longest prefix of tokens[:limit] that holds every required part of `wanted`
        (the parts the caller would restore), first block first."""
        required = [p for p in wanted if self.parts[p].required]
        with self._lock:
            return self._lookup(self.keys(tokens, limit), required)

    def _lookup(self, keys: list[str], required: list[str]) -> list[dict[str, Arrays]]:
        found = []
        for key in keys:
            block = self.blocks.get(key)
            if block is None and self.disk:
                block = self._admit(key, self.disk.read(key, self.block_tokens, self.parts))
            if block is None or any(p not in block for p in required):
                break
            found.append((key, block))
        self._touch([k for k, _ in found])
        self._evict()
        return [b for _, b in found]

    def store(self, tokens: np.ndarray, upto: int, read: Callable[[str, int, int], Arrays | None]) -> None:
        """Cache the whole blocks of tokens[:upto]: for each, the parts it lacks that read(part, start, stop)
        can give (None: not held for those positions)."""
        keys = self.keys(tokens, upto)
        with self._lock:
            self._store(keys, read)

    def _store(self, keys: list[str], read: Callable[[str, int, int], Arrays | None]) -> None:
        for i, key in enumerate(keys):
            block = self.blocks.get(key)
            if block is None and self.disk:  # evicted from memory: keep the parts its file holds
                block = self.disk.read(key, self.block_tokens, self.parts)
            block = block or {}
            start, stop = i * self.block_tokens, (i + 1) * self.block_tokens
            new = {}
            for part in self.parts:
                if part not in block:
                    arrays = read(part, start, stop)
                    if arrays is not None and self.parts[part].fits(arrays, self.block_tokens):
                        new[part] = arrays
            if new:
                if key in self.blocks:
                    self._drop(key)
                block = {**block, **new}
                self._admit(key, block)
                if self.disk:
                    self.disk.write(key, block)
        self._touch(keys)
        self._evict()

    def clear(self) -> None:
        """Forget every block held in memory (the disk tier keeps its files)."""
        with self._lock:
            self.blocks.clear()
            self.nbytes = 0

    # ---- a sequence's prefix in and out of a KV cache slot and its drafter -----------------------------------
    def restore(self, tokens: np.ndarray, target_cache, drafter=None, slot: int = 0) -> int:
        """Write the longest cached prefix of tokens into the target's cache slot (rows from 0; the caller sets the
        slot's length) and into `drafter`'s state (just reset), leaving at least the last token to run: its logits
        give the first new token. Returns the prefix length, 0 on a miss."""
        own = [p for p in self.parts if drafter is not None and p.startswith(f"{drafter.name}#")]
        blocks = self.lookup(tokens, len(tokens) - 1, ["target", *own])
        if not blocks:
            return 0
        for i, block in enumerate(blocks):  # block by block: no joined copy of the whole prefix
            write_kv(target_cache, block["target"], i * self.block_tokens, slot)
        for part in own:
            reach = next((i for i, b in enumerate(blocks) if part not in b), len(blocks))
            if reach:
                drafter.load_state(part.rpartition("#")[2], tokens, _joined(blocks[:reach], part))
        return len(blocks) * self.block_tokens

    def save(self, tokens: np.ndarray, upto: int, target_cache, drafter=None, slot: int = 0) -> None:
        """Cache the whole blocks of tokens[:upto], whose K/V the target's cache slot holds, with the drafter's
        state where it holds it."""
        def read(part: str, start: int, stop: int) -> Arrays | None:
            if part == "target":
                return read_kv(target_cache, start, stop, slot)
            if drafter is not None and part.startswith(f"{drafter.name}#"):
                return drafter.save_state(part.rpartition("#")[2], tokens, start, stop)
            return None
        self.store(tokens, upto, read)

    def _admit(self, key: str, block: dict[str, Arrays] | None) -> dict[str, Arrays] | None:
        """Hold a block, over the budget until the caller has touched its chain and evicts: evicting here would
        take the chain's own first blocks (least recently used among those being admitted) and keep its tail,
        which no lookup reaches without them."""
        if block is not None:
            self.blocks[key] = block
            self.nbytes += block_bytes(block)
        return block

    def _drop(self, key: str) -> None:
        self.nbytes -= block_bytes(self.blocks.pop(key))

    def _touch(self, keys: list[str]) -> None:
        for key in reversed(keys):  # the first block ends up the most recently used
            if key in self.blocks:
                self.blocks.move_to_end(key)
        if self.disk:
            self.disk.touch(keys)

    def _evict(self) -> None:
        while self.nbytes > self.max_bytes and self.blocks:
            self._drop(next(iter(self.blocks)))


def _joined(blocks: list[dict[str, Arrays]], part: str) -> Arrays:
    """One part of consecutive blocks, as arrays over all their positions."""
    return {n: np.concatenate([b[part][n] for b in blocks]) for n in blocks[0][part]}


def block_bytes(block: dict[str, Arrays]) -> int:
    return sum(a.nbytes for arrays in block.values() for a in arrays.values())
