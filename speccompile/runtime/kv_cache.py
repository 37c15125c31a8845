"""The static KV cache: allocated once, bound to the graph as both past and present, never copied per step.

Roll back is a length change: slots past `length` are stale and the fused attention kernel never reads them
(it reads `seqlens_k + 1` rows), so the next step simply overwrites them.

Two homes, one interface (`length`, `truncate`, `compact`, `nbytes`, `ortvalues`): `KVCache` is host memory
(numpy arrays, compacted with numpy), `DeviceKVCache` lives in an onnxruntime device's memory (OrtValues on
`cuda`, or on `cpu` to test the same code path) and compacts with the bundle's tiny compaction graph on that
device, so an accepted tree path's K/V never leave it.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import onnxruntime as ort

from speccompile.errors import BundleError
from speccompile.format.memory import load_memory
from speccompile.format.requirements import runs_batched_attention
from speccompile.runtime.sessions import bind_host, run_bound

# the bundle's cache dtype -> (numpy storage type, ONNX element type): bfloat16 is stored as its 16 bits
CACHE_TYPES = {"float32": (np.float32, 1), "float16": (np.float16, 10), "bfloat16": (np.uint16, 16)}


def cache_types(dtype: str) -> tuple[type, int]:
    if dtype not in CACHE_TYPES:
        raise BundleError(f"KV cache dtype {dtype!r} unknown to this runtime (it knows {', '.join(CACHE_TYPES)})")
    return CACHE_TYPES[dtype]


class KVCache:
    """K and V per layer, [num_layers, batch, num_kv_heads, max_seq_len + scratch, head_dim]: batch sequence slots (a
    batched graph's cache, runtime/batch_engine.py), each with its own committed length in its `slot` view. A
    sequence holds at most max_seq_len tokens; the scratch slots past them are the graph's (speccompile.graphs
    cache_slots)."""

    def __init__(self, num_layers: int, num_kv_heads: int, max_seq_len: int, head_dim: int, dtype: str = "float32",
                 *, batch: int = 1, scratch: int = 0, arrays: tuple[np.ndarray, np.ndarray] | None = None):
        shape = (num_layers, batch, num_kv_heads, max_seq_len + scratch, head_dim)
        storage, self.onnx_type = cache_types(dtype)
        self.dtype = dtype
        # np.zeros maps zero pages lazily: slots never used cost no memory
        try:
            self.key, self.value = arrays if arrays is not None else (np.zeros(shape, storage),
                                                                      np.zeros(shape, storage))
        except MemoryError:  # a manifest's sizes, before its graph could be checked against them
            gib = 2 * np.prod(shape, dtype=np.float64) * np.dtype(storage).itemsize / (1 << 30)
            raise BundleError(f"a KV cache of {gib:.1f} GiB ({shape}) cannot be allocated; check the bundle's "
                              "manifest or rebuild with a smaller --max-seq-len or --max-batch") from None
        self.max_seq_len = max_seq_len
        self.length = 0  # committed tokens whose K/V are valid (of slot 0 where batch > 1: see `slot`)

    @property
    def batch(self) -> int:
        return self.key.shape[1]

    @property
    def capacity(self) -> int:
        """Slots per sequence, scratch included: how deep a pass may lay a sequence's rows out."""
        return self.key.shape[3]

    def slot(self, b: int) -> "KVCache":
        """Slot b as a one-sequence cache sharing this one's memory, with a length of its own (an engine bound to
        it writes into slot b of the batched cache)."""
        return KVCache(self.key.shape[0], self.key.shape[2], self.max_seq_len, self.key.shape[4], dtype=self.dtype,
                       scratch=self.key.shape[3] - self.max_seq_len,
                       arrays=(self.key[:, b:b + 1], self.value[:, b:b + 1]))

    @property
    def nbytes(self) -> int:
        return self.key.nbytes + self.value.nbytes

    def ortvalues(self) -> list[tuple[str, ort.OrtValue]]:
        """(name, OrtValue) per layer and kind, over this cache's memory (no copy), as the graph binds them."""
        return [(f"{kind}.{i}", ort.OrtValue.ortvalue_from_numpy_with_onnx_type(arr[i], self.onnx_type))
                for i in range(self.key.shape[0]) for kind, arr in (("key", self.key), ("value", self.value))]

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.max_seq_len:
            raise ValueError(f"cache length {length} out of range")
        self.length = length

    def compact(self, src_slots: np.ndarray, dst_start: int) -> None:
        """Move the K/V of slots `src_slots` (an accepted tree path) to `dst_start, dst_start+1, ...`."""
        n = len(src_slots)
        if n and not np.array_equal(src_slots, np.arange(dst_start, dst_start + n)):
            # fancy indexing materialises the gathered rows first, so overlapping moves are safe
            self.key[:, :, :, dst_start:dst_start + n] = self.key[:, :, :, src_slots]
            self.value[:, :, :, dst_start:dst_start + n] = self.value[:, :, :, src_slots]


def available_memory() -> int | None:
    """Bytes this process may still take without swapping: /proc/meminfo's MemAvailable, or less where its memory
    cgroup (a container's limit) leaves less; None where it cannot be read (not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None
    room = cgroup_room()
    return free if room is None else min(free, room)


def cgroup_room(root: str = "/sys/fs/cgroup", self_cgroup: str = "/proc/self/cgroup") -> int | None:
    """What this process's memory cgroup still allows, None without a limit: cgroup v2's memory.max less
    memory.current, in the process's own cgroup folder (a nested one, as Kubernetes makes) or at the root (a
    container's namespace); else cgroup v1's memory.limit_in_bytes less memory.usage_in_bytes."""
    places = [(root, "memory.max", "memory.current"),
              (os.path.join(root, "memory"), "memory.limit_in_bytes", "memory.usage_in_bytes")]
    try:
        with open(self_cgroup) as f:  # v2's line reads "0::/its/path"
            own = next((line.strip()[3:] for line in f if line.startswith("0::")), "/")
        if own not in ("", "/"):
            places.insert(0, (os.path.join(root, own.lstrip("/")), "memory.max", "memory.current"))
    except OSError:
        pass
    for folder, limit_file, used_file in places:
        try:
            with open(os.path.join(folder, limit_file)) as f, open(os.path.join(folder, used_file)) as g:
                limit, used = f.read().strip(), int(g.read())
        except (OSError, ValueError):
            continue
        if not limit.isdigit() or int(limit) >= 1 << 60:  # "max", or v1's way of saying no limit
            return None
        return int(limit) - used
    return None


def check_fits(manifest: dict) -> None:
    """Refuse a bundle one sequence of which at the full context (weights and KV caches: format/memory.py
    load_memory) exceeds the memory available now, and warn where its sequence slots all in use would. np.zeros
    maps the caches' pages lazily, so an allocation larger than memory succeeds, and the process would be killed,
    or swap, only once long sequences fill them."""
    free = available_memory()
    if free is None:
        return
    one, every = load_memory(manifest, slots=1), load_memory(manifest)
    if one["weights"] + one["kv"] > free:
        raise BundleError(f"one sequence of this bundle takes up to {_gib(one)} of memory ({one['kv'] / 2**30:.1f} "
                          f"GiB of KV caches at its full context of {manifest['max_seq_len']} tokens, "
                          f"{one['weights'] / 2**30:.1f} GiB of weights), more than the {free / 2**30:.1f} GiB this "
                          f"machine has available: {_remedy(one, free)}")
    if every["weights"] + every["kv"] > free:
        warnings.warn(f"{every['slots']} sequences sharing passes would take up to {_gib(every)} of memory at this "
                      f"bundle's full context, more than the {free / 2**30:.1f} GiB this machine has available: "
                      "serve fewer at once (a smaller --max-batch or --max-seq-len at build)", stacklevel=3)


def _remedy(one: dict, free: int) -> str:
    """What a rebuild must change: a shorter context only shrinks the KV caches, which cannot help where the
    weights alone take more than the memory available."""
    if one["weights"] < free:
        return "rebuild it with a smaller --max-seq-len"
    return ("its weights alone take more: load it on a machine with more memory, or rebuild it with smaller weights "
            "(--weights int8 or int4) or fewer drafters")


def _gib(need: dict) -> str:
    return f"{(need['weights'] + need['kv']) / 2**30:.1f} GiB"


def host_caches(manifest: dict, device: str, resident: bool) -> tuple[dict | None, KVCache | None]:
    """batch_cache for a load whose caches are host arrays (the CPU), once it is known to fit in memory; (None,
    None) for caches in a device's memory."""
    if device != "cpu" or resident:
        return None, None
    check_fits(manifest)
    entry, cache = batch_cache(manifest)
    if entry and not runs_batched_attention():  # an older onnxruntime: requests run one at a time, not fail
        warnings.warn(f"this onnxruntime {ort.__version__} cannot run the bundle's batched graph (its attention "
                      "needs onnxruntime >= 1.32): concurrent requests will run one after another", stacklevel=3)
        return None, None
    return entry, cache


def batch_cache(manifest: dict) -> tuple[dict | None, KVCache | None]:
    """The batched target graph's manifest entry and the cache of its sequence slots, if the bundle has one."""
    entry = manifest["models"].get("target_batch")
    if not entry or entry.get("kind") != "decoder_batch" or entry.get("max_batch", 1) < 2:
        return None, None
    kv, target = entry["kv_cache"], manifest["models"]["target"]
    if entry["num_layers"] != target["num_layers"] or kv != target["kv_cache"]:
        raise BundleError("the manifest's target_batch and target disagree on the KV cache they share "
                          "(layers, heads, length); rebuild the bundle")
    return entry, KVCache(entry["num_layers"], kv["num_kv_heads"], kv["max_seq_len"], kv["head_dim"],
                          batch=entry["max_batch"], dtype=kv.get("dtype", "float32"),
                          scratch=kv.get("scratch_slots", 0))


class DeviceKVCache:
    """The cache in device memory: one OrtValue per layer and kind, zeroed once (masked stale slots must hold
    numbers, never NaN garbage), compacted by `compact_session` (compile/graph/kv_compact.py) in place."""

    def __init__(self, num_layers: int, num_kv_heads: int, max_seq_len: int, head_dim: int, dtype: str,
                 device: str, compact_session: ort.InferenceSession | None, scratch: int = 0):
        storage, onnx_type = cache_types(dtype)
        zeros = np.zeros((1, num_kv_heads, max_seq_len + scratch, head_dim), storage)
        self._values = [(f"{kind}.{i}", _device_copy(zeros, onnx_type, device))
                        for i in range(num_layers) for kind in ("key", "value")]
        self.max_seq_len = max_seq_len
        self.length = 0
        self._nbytes = 2 * num_layers * zeros.nbytes
        self._session = compact_session
        self._io = None
        self._src = np.zeros(max_seq_len, np.int64)  # the path's slots, bound by address
        self._dst = np.zeros(1, np.int64)
        self._bound: dict[str, tuple] = {}

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def ortvalues(self) -> list[tuple[str, ort.OrtValue]]:
        return list(self._values)

    def layer(self, kind: str, i: int) -> np.ndarray:
        """A host copy of one layer's cache (tests and debugging)."""
        return dict(self._values)[f"{kind}.{i}"].numpy()

    truncate = KVCache.truncate

    def compact(self, src_slots: np.ndarray, dst_start: int) -> None:
        n = len(src_slots)
        if not n or np.array_equal(src_slots, np.arange(dst_start, dst_start + n)):
            return
        if self._session is None:
            raise BundleError("this bundle has no KV compaction graph (built before device caches): rebuild it "
                              "to run on a GPU")
        if self._io is None:  # the caches bound once, in place
            self._io = self._session.io_binding()
            for name, ov in self._values:
                self._io.bind_ortvalue_input(name, ov)
                self._io.bind_ortvalue_output(f"{name}_out", ov)
        self._src[:n], self._dst[0] = src_slots, dst_start
        for name, buf, shape in (("src_slots", self._src, [n]), ("dst_start", self._dst, [1])):
            bind_host(self._io, self._bound, name, buf, shape, rebind_inputs=True)  # a device graph: every move
        run_bound(self._session, self._io, "the KV compaction graph")


def _device_copy(host: np.ndarray, onnx_type: int, device: str) -> ort.OrtValue:
    """A device OrtValue holding a copy of `host` (allocated on the device, filled through onnxruntime)."""
    ov = ort.OrtValue.ortvalue_from_shape_and_type(list(host.shape), onnx_type, device, 0)
    ov.update_inplace(host)
    return ov
