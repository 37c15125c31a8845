"""The host memory a CPU load of a bundle may take, from its manifest alone: what `inspect` and the build state, and
what the runtime checks against the memory available before it allocates anything (runtime/kv_cache.py)."""
from __future__ import annotations

from speccompile.graphs import cache_slots

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}  # a KV cache's element, by the manifest's dtype
# drafter kinds whose graph maps the target's weight file instead of holding a copy (runtime/drafters/layerskip.py):
# its instances share those pages
MAPPED_KINDS = ("layerskip",)


def kv_bytes(kv: dict) -> int:
    """One sequence's KV cache (K and V of every layer, scratch slots included), from a model entry's kv_cache."""
    return (2 * kv["num_layers"] * kv["num_kv_heads"] * cache_slots(kv) * kv["head_dim"]
            * DTYPE_BYTES.get(kv.get("dtype"), 4))


def sequence_slots(m: dict) -> int:
    """The sequences a CPU load decodes at once: the batched graph's slots (runtime/kv_cache.py batch_cache), else 1."""
    entry = m["models"].get("target_batch") or {}
    return entry.get("max_batch", 1) if entry.get("kind") == "decoder_batch" else 1


def session_bytes(m: dict, entry: dict) -> int:
    """The weight bytes a session of the model `entry` holds: onnxruntime reads (and pre-packs) its own copy of the
    initializers it lists; the weight files' size for bundles that do not list them."""
    names = set(entry.get("initializers", ()))
    listed = [r["length"] for f in entry.get("weights", ()) for n, r in m.get("weights", {}).get(f, {}).items()
              if n in names]
    return sum(listed) if listed else sum(m["files"].get(f, {}).get("bytes", 0) for f in entry.get("weights", ()))


def load_memory(m: dict, slots: int | None = None) -> dict[str, int]:
    """What a CPU load of manifest `m` may take, in bytes. "weights": the target's session and the batched graph's
    (each its own copy), and each drafter's graphs once per sequence slot (the scheduler gives every slot a drafter
    instance of its own; an early exit's instances share the target file's mapped pages). "kv": every KV cache at
    the full context, the target's per slot (the target's own cache is the batched cache's slot 0) and each
    drafter model's per slot. The caches' pages are taken as sequences fill them and the batched graph and the
    slots' drafters are opened as requests share passes, so a load starts below this and may reach it later.
    slots: as many sequences at once (1: one request at a time, without the batched graph); default all."""
    slots, models = slots or sequence_slots(m), m["models"]
    weights = session_bytes(m, models["target"]) + (session_bytes(m, models["target_batch"]) if slots > 1 else 0)
    kv = kv_bytes(models["target"]["kv_cache"]) * slots
    for d in m["drafters"]:
        for entry in (models[d[key]] for key in ("model", "fuse_model") if d.get(key) in models):
            weights += session_bytes(m, entry) * (1 if d["kind"] in MAPPED_KINDS else slots)
            kv += kv_bytes(entry["kv_cache"]) * slots if "kv_cache" in entry else 0
        if slots > 1 and d.get("batch_model") in models and d["kind"] not in MAPPED_KINDS:
            weights += session_bytes(m, models[d["batch_model"]])  # the slots' shared catch-ups (caches as above)
    return {"weights": weights, "kv": kv, "slots": slots}


def memory_line(m: dict) -> str:
    """What a load may take (load_memory), as `inspect` and the build print it."""
    need = load_memory(m)
    slots = f" x {need['slots']} sequence slots" if need["slots"] > 1 else ""
    return (f"up to {(need['weights'] + need['kv']) / 2**20:.1f} MiB loaded on the CPU: weights "
            f"{need['weights'] / 2**20:.1f} MiB (each graph session's copy), KV caches {need['kv'] / 2**20:.1f} MiB "
            f"at the full context{slots} (both taken as requests come), plus the runtime's own and the context "
            "cache (--cache-bytes)")
