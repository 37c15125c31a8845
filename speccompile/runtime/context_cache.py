"""The context cache: requests that share a token prefix with earlier ones (the turns of a chat, a common system
prompt, few-shot examples) reuse that prefix's K/V instead of running it through the target again.

A prompt is cut into whole blocks of `block_tokens` tokens. Block i's key hashes the bundle's identity and every
token up to the end of block i (a hash chain, as vLLM's prefix caching keys its blocks), so equal keys mean equal
prefixes. Each cached block holds *parts*: "target" (the target's K/V rows of the block, copied out of the static
cache) and whatever per-position state a drafter keeps (format: `Part`). Every array has the block's positions on
axis 0. The memory tier is bounded by a byte budget with least-recently-used eviction; touching a prefix touches
its blocks last to first, so a chain's early blocks (shared by the most requests) are evicted last. An optional
disk tier (one `.npz` per block, read with allow_pickle=False, and a JSON index) survives restarts: a file that
is corrupt, of another bundle or of another layout is ignored with a warning, never trusted.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import numbers
import os
import threading
import time
import warnings
import zipfile
from typing import Callable

import numpy as np

from speccompile.errors import SpeccompileError
from speccompile.format.atomic import TEMP_PREFIX, write_atomically

DEFAULT_BLOCK_TOKENS = 16
DEFAULT_CACHE_BYTES = 1 << 30
DEFAULT_DISK_BYTES = 8 << 30
INDEX = "index.json"
DISK_FORMAT = "speccompile-context-cache"
DISK_VERSION = 1
# what a block's per-position state means; part of every identity, so blocks kept under another meaning never match
# (2: an MTP/EAGLE head's cache slots shifted one back, runtime/drafters/mtp.py save_state)
STATE_VERSION = 2
STALE_TEMPORARY_S = 3600.0  # a temporary block file this old was left by a killed process
NPY_HEADER_BYTES = 4096  # an .npy member's header, beyond its array's own bytes (a disk block's size check)

Arrays = dict[str, np.ndarray]


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


def kept_on(asked: bool, host_caches: bool, cache_dir: str | None) -> bool:
    """Whether a Generator keeps a context cache: asked for, and its engines' K/V in host memory, through which
    blocks are copied (a device's caches go without). A cache_dir that would keep nothing is refused, not
    ignored."""
    if asked and cache_dir is not None and not host_caches:
        raise SpeccompileError(f"--cache-dir {cache_dir!r}: the context cache copies K/V through host memory, and "
                               "this device keeps its caches on the device, so there is none to keep; drop --cache-dir")
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


def check_cache_dir(bundle_dir: str, cache_dir: str | None) -> None:
    """Refuse a disk tier inside the bundle: files there that its manifest does not list fail its check on every
    later load."""
    if cache_dir is None or not isinstance(cache_dir, (str, os.PathLike)):
        return
    root, folder = os.path.realpath(bundle_dir), os.path.realpath(cache_dir)
    if os.path.commonpath([root, folder]) == root:
        raise SpeccompileError(f"context cache: --cache-dir {cache_dir!r} is inside the bundle {bundle_dir!r}, whose "
                               "files must all be listed in its manifest; choose a folder outside it")


class ContextCache:
    def __init__(self, identity: str, parts: dict[str, Part], max_bytes: int = DEFAULT_CACHE_BYTES,
                 block_tokens: int = DEFAULT_BLOCK_TOKENS, cache_dir: str | None = None,
                 disk_bytes: int = DEFAULT_DISK_BYTES):
        """parts: every part a block may hold (the target's and the drafters'); arrays of other layouts are never
        kept. cache_dir: the disk tier's folder (a subfolder per bundle identity, at most disk_bytes of blocks),
        None for memory only."""
        if not all(isinstance(n, numbers.Integral) and not isinstance(n, bool) for n in (max_bytes, block_tokens)) \
                or block_tokens < 1 or max_bytes < 0:  # nan or a string would never compare as too many bytes
            raise SpeccompileError(f"context cache: its bytes (--cache-bytes, cache_bytes) must be a whole number "
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
            raise SpeccompileError(f"context cache: cannot keep blocks in --cache-dir {cache_dir!r}: {e}") from None

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
        if block is not None:
            self.blocks[key] = block
            self.nbytes += block_bytes(block)
            self._evict()
        return block

    def _drop(self, key: str) -> None:
        self.nbytes -= block_bytes(self.blocks.pop(key))

    def _touch(self, keys: list[str]) -> None:
        for key in reversed(keys):  # the first block ends up the most recently used
            if key in self.blocks:
                self.blocks.move_to_end(key)

    def _evict(self) -> None:
        while self.nbytes > self.max_bytes and self.blocks:
            self._drop(next(iter(self.blocks)))


def _joined(blocks: list[dict[str, Arrays]], part: str) -> Arrays:
    """One part of consecutive blocks, as arrays over all their positions."""
    return {n: np.concatenate([b[part][n] for b in blocks]) for n in blocks[0][part]}


def block_bytes(block: dict[str, Arrays]) -> int:
    return sum(a.nbytes for arrays in block.values() for a in arrays.values())


def _members_fit(members: list[zipfile.ZipInfo], positions: int, parts: dict[str, Part]) -> bool:
    """Every member of a block file is an array the layout names, no larger than that array: checked before any
    is read, so that a small file cannot unpack into gigabytes."""
    limits = {"__key__.npy": 64}  # the block's key: a sha256 in hex
    for p, part in parts.items():
        for n, (shape, dtype) in part.layout.items():
            limits[f"{p}/{n}.npy"] = positions * math.prod(shape) * np.dtype(dtype).itemsize
    return all(i.filename in limits and i.file_size <= limits[i.filename] + NPY_HEADER_BYTES for i in members)


class DiskTier:
    """Blocks as `<key>.npz` files in cache_dir/<identity prefix>/, beside an index naming the identity and block
    size. Files are written to a temporary name and renamed into place, so a crash leaves no half-written block.
    Within max_bytes: the files least recently read or written (their modification times) are deleted first."""

    def __init__(self, cache_dir: str, identity: str, block_tokens: int, max_bytes: int = DEFAULT_DISK_BYTES):
        self.dir, self.max_bytes = os.path.join(cache_dir, identity[:32]), max_bytes
        self.index = {"format": DISK_FORMAT, "version": DISK_VERSION, "identity": identity,
                      "block_tokens": block_tokens}
        os.makedirs(self.dir, exist_ok=True)
        path = os.path.join(self.dir, INDEX)
        self.usable = True
        if os.path.exists(path):
            try:
                with open(path, "rb") as f:
                    found = json.loads(f.read())
            except (OSError, ValueError) as e:
                found = f"unreadable ({e})"
            if found != self.index:
                warnings.warn(f"context cache: {path} is not this bundle's index ({str(found)[:120]}); the disk "
                              "tier is not used", stacklevel=3)
                self.usable = False
        else:
            write_atomically(path, lambda f: f.write(json.dumps(self.index).encode()), private=True)
        if self.usable:
            self._remove_stale_temporaries()
        self.nbytes = sum(size for _, size, _ in self._blocks())

    def _remove_stale_temporaries(self) -> None:
        """Block files a killed process left half-written under their temporary names, once old enough that no
        live writer can still own them (a write takes well under a second)."""
        now = time.time()
        with os.scandir(self.dir) as entries:
            for e in entries:
                try:
                    if e.name.startswith(TEMP_PREFIX) and e.is_file(follow_symlinks=False) and \
                            now - e.stat(follow_symlinks=False).st_mtime > STALE_TEMPORARY_S:
                        os.unlink(e.path)
                except OSError:  # another process got there first
                    pass

    def _blocks(self) -> list[tuple[float, int, str]]:
        """(modification time, size, path) of each block file, least recently used first."""
        with os.scandir(self.dir) as entries:
            found = [(st.st_mtime, st.st_size, e.path) for e in entries
                     if e.name.endswith(".npz") and e.is_file() and (st := e.stat())]
        return sorted(found)

    def _evict(self) -> None:
        for _, size, path in self._blocks():
            if self.nbytes <= self.max_bytes:
                break
            try:
                os.unlink(path)
                self.nbytes -= size
            except OSError:  # another process got there first
                pass

    def read(self, key: str, positions: int, parts: dict[str, Part]) -> dict[str, Arrays] | None:
        path = os.path.join(self.dir, f"{key}.npz")
        if not self.usable or not os.path.exists(path):
            return None
        try:
            os.utime(path)  # recently used: evicted last
        except OSError:
            pass
        try:
            with np.load(path, allow_pickle=False) as z:  # an .npz only: a plain .npy has no `with`, so it fails
                if not _members_fit(z.zip.infolist(), positions, parts):
                    warnings.warn(f"context cache: ignoring {path}: its members are not this bundle's layout",
                                  stacklevel=4)
                    return None
                arrays = {name: z[name] for name in z.files}
        except Exception as e:  # noqa: BLE001 - a corrupt file of any kind costs the cache, never the request
            warnings.warn(f"context cache: ignoring unreadable block {path} ({type(e).__name__})", stacklevel=4)
            return None
        stored_key = arrays.pop("__key__", None)
        if stored_key is None or stored_key.tobytes() != key.encode():
            warnings.warn(f"context cache: ignoring {path}: not the block its name says", stacklevel=4)
            return None
        block: dict[str, Arrays] = {}
        for name, a in arrays.items():
            part, _, field = name.rpartition("/")
            block.setdefault(part, {})[field] = a
        if any(p not in parts or not parts[p].fits(a, positions) for p, a in block.items()) or "target" not in block:
            warnings.warn(f"context cache: ignoring {path}: its arrays do not have this bundle's layout", stacklevel=4)
            return None
        return block

    def write(self, key: str, block: dict[str, Arrays]) -> None:
        if not self.usable:
            return
        flat = {f"{p}/{n}": a for p, arrays in block.items() for n, a in arrays.items()}
        flat["__key__"] = np.frombuffer(key.encode(), np.uint8)
        path = os.path.join(self.dir, f"{key}.npz")
        try:
            old = os.path.getsize(path) if os.path.exists(path) else 0
            write_atomically(path, lambda f: np.savez(f, **flat), private=True)
            self.nbytes += os.path.getsize(path) - old
            if self.nbytes > self.max_bytes:
                self._evict()
        except OSError as e:  # a full disk costs the disk tier, never the request
            warnings.warn(f"context cache: cannot write to {self.dir} ({e.strerror or e}); the disk tier is off",
                          stacklevel=4)
            self.usable = False
