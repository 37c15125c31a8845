"""`speccompile inspect`: a bundle's manifest as readable lines (models, KV cache sizes, drafters, files)."""
from __future__ import annotations


def describe(bundle: str, m: dict, verified: bool) -> list[str]:
    """The lines `inspect` prints for the manifest `m` of `bundle` (read and checked by read_manifest)."""
    out = []
    src = m["source"]
    out.append(f"bundle      {bundle}  (format v{m['format_version']}, {m['created_by']})")
    out.append(f"source      {src['kind']} {src['path']}  sha256 {src['sha256'][:16]}")
    out.append(f"context     {m['max_seq_len']} tokens (static KV cache)")
    for name, e in m["models"].items():
        if e.get("kind") == "medusa":
            out.append(f"model       {name}: {e['graph']} ({e['num_heads']} Medusa heads), weights {e['weights']}")
            continue
        if "kv_cache" not in e:  # e.g. EAGLE-3's fc, fusing the target's layers
            out.append(f"model       {name}: {e['graph']} ({e['kind']}), weights {e['weights']}")
            continue
        c, kv = e["config"], e["kv_cache"]
        kv_mb = 2 * kv["num_layers"] * kv["num_kv_heads"] * kv["max_seq_len"] * kv["head_dim"] * 4 / 2**20
        slots = f" x {e['max_batch']} sequence slots (target's slot 0 shared)" if "max_batch" in e else ""
        out.append(f"model       {name}: {e['graph']} ({c['model_type']}, {e['num_layers']} layers, hidden "
                   f"{c['hidden_size']}, vocab {c['vocab_size']}), weights {e['weights']}, attention "
                   f"{e['attention']}, KV cache {kv_mb:.1f} MiB{slots}")
    for d in m["drafters"]:
        extra = f", model {d['model']}" if "model" in d else ""
        if d.get("tree"):
            extra += f", tree {d['tree']['kind']} of {d['tree']['size']} nodes"
        out.append(f"drafter     {d['name']} ({d['kind']}, {d['num_draft']} tokens per pass{extra})")
    if not m["drafters"]:
        out.append("drafter     none (plain decoding only)")
    total = sum(f["bytes"] for f in m["files"].values())
    out.append(f"files       {len(m['files'])} files, {total / 2**20:.1f} MiB, every file listed, sha256 "
               f"{'verified' if verified else 'not checked'}")
    if "runtime" in m:
        domains = ", ".join(f"{d or 'ai.onnx'} {v}" for d, v in m["runtime"]["op_domains"].items())
        out.append(f"runtime     built with onnxruntime {m['runtime']['onnxruntime']}; graphs import {domains}")
    target = m["models"]["target"]
    out.append("inputs      " + ", ".join(f"{i['name']}{i['shape']}" for i in target["inputs"][:5]) +
               f", past_key/value.0..{target['num_layers'] - 1}")
    out.append("outputs     " + ", ".join(f"{o['name']}{o['shape']}" for o in target["outputs"][:2]) +
               f", present_key/value.0..{target['num_layers'] - 1}")
    return out
