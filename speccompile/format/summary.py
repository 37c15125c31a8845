"""`speccompile inspect`: a bundle's manifest as readable lines (models, KV cache sizes, drafters, weight formats and
the bytes a decode step reads, files)."""
from __future__ import annotations

import re

from speccompile.format.memory import kv_bytes, memory_line


def describe(bundle: str, m: dict, verified: bool) -> list[str]:
    """The lines `inspect` prints for the manifest `m` of `bundle` (read and checked by read_manifest)."""
    out = []
    src = m["source"]
    out.append(f"bundle      {bundle}  (format v{m['format_version']}, {m['created_by']})")
    out.append(f"source      {src['kind']} {src['path']}  sha256 {src['sha256'][:16]}")
    out.append(f"context     {m['max_seq_len']} tokens (static KV cache)")
    single = {d["batch_model"]: d["model"] for d in m["drafters"] if "batch_model" in d} | {"target_batch": "target"}
    for name, e in m["models"].items():
        if e.get("kind") == "medusa":
            out.append(f"model       {name}: {e['graph']} ({e['num_heads']} Medusa heads), weights {e['weights']}")
            continue
        if "kv_cache" not in e:  # e.g. EAGLE-3's fc, fusing the target's layers
            out.append(f"model       {name}: {e['graph']} ({e['kind']}), weights {e['weights']}")
            continue
        c, kv_mb = e["config"], kv_bytes(e["kv_cache"]) / 2**20
        slots = (f" x {e['max_batch']} sequence slots ({single.get(name, 'its')} graph's slot 0 shared)"
                 if "max_batch" in e else "")
        out.append(f"model       {name}: {e['graph']} ({c['model_type']}, {e['num_layers']} layers, hidden "
                   f"{c['hidden_size']}, vocab {c['vocab_size']}), weights {e['weights']}, attention "
                   f"{e.get('attention', 'not recorded')}{window_label(c)}, KV cache {kv_mb:.1f} MiB "
                   f"{e['kv_cache'].get('dtype', 'float32')}{slots}")
    for d in m["drafters"]:
        # a drafter with a tree drafts it: its num_draft is only what --num-draft would replace it with
        drafts = f"tree {tree_label(d['tree'])}" if d.get("tree") else f"{d['num_draft']} tokens per pass"
        extra = f", model {d['model']}" if "model" in d else ""
        extra += f", its slots' catch-ups shared through {d['batch_model']}" if "batch_model" in d else ""
        out.append(f"drafter     {d['name']} ({d['kind']}, {drafts}{extra})")
    if not m["drafters"]:
        out.append("drafter     none (plain decoding only)")
    out.append(f"memory      {memory_line(m)}")
    total = sum(f["bytes"] for f in m["files"].values())
    out.append(f"files       {len(m['files'])} files, {total / 2**20:.1f} MiB, every file listed, sha256 "
               f"{'verified' if verified else 'not checked'}")
    if "runtime" in m:
        domains = ", ".join(f"{d or 'ai.onnx'} {v}" for d, v in m["runtime"]["op_domains"].items())
        out.append(f"runtime     built with onnxruntime {m['runtime']['onnxruntime']}; graphs import {domains}")
    target = m["models"]["target"]
    out += weight_lines(m, target)
    out.append(f"inputs      {_signature(target['inputs'])}, past_key/value.0..{target['num_layers'] - 1}")
    out.append(f"outputs     {_signature(target['outputs'])}, present_key/value.0..{target['num_layers'] - 1}")
    return out


def window_label(config: dict) -> str:
    """A sliding window's width and the layers it applies to, as a model line's clause ("" without one)."""
    window, types = config.get("sliding_window"), config.get("layer_types") or []
    if not window:
        return ""
    if types and any(t != "sliding_attention" for t in types):
        sliding = sum(t == "sliding_attention" for t in types)
        return f", sliding window {window} on {sliding} of {len(types)} layers"
    return f", sliding window {window} on every layer"


KV_TENSOR = re.compile(r"(past|present)_(key|value)\.\d+")  # one per layer: the lines name their range instead


def _signature(tensors: list[dict]) -> str:
    """Every input (or output) of a graph but its KV cache's, with its shape."""
    return ", ".join(f"{t['name']}{t['shape']}" for t in tensors if not KV_TENSOR.fullmatch(t["name"]))


ROPE_TABLE = re.compile(r"(.+\.)?rope(_local)?\.(cos|sin)")  # [max_seq_len + 1, rotary dims / 2] each
EXPERTS = re.compile(r"l\d+\.experts\.(gate_up|down)")  # [routed experts, ...]: a token gathers its k


def pass_weight_bytes(manifest: dict, entry: dict, file_bytes: int) -> dict[str, int]:
    """Weight bytes one decode step of the model `entry` reads: "full" (float32 logits: the float32 head, the screen's
    tensors unread; or, for a head on the screen's int8 grid stored as MatMulQ8 records, MatMulQ8F over those
    records instead: compile/graph/head_screen.py float32_product) and "screened" (a greedy pass through the exact
    greedy head: its int8 screen instead of the float32 head, of which it reads only the rescored rows). A step
    gathers one row of the embedding table and of each cos/sin table, and the k experts it routes to of each
    mixture-of-experts layer; the float32 head (the embedding of a tied model) is read whole. The weight files' size
    for bundles that do not list initializers."""
    names = set(entry.get("initializers", ()))
    sizes = {n: r["length"] for f in entry["weights"] for n, r in manifest.get("weights", {}).get(f, {}).items()
             if n in names}
    if not sizes:
        return {"full": file_bytes, "screened": file_bytes}
    screen = sum(v for n, v in sizes.items() if n.startswith("head_screen."))
    head = sizes.get("lm_head", sizes.get("embed", 0))
    gathered = {n: v for n, v in sizes.items() if n == "embed" or ROPE_TABLE.fullmatch(n) or EXPERTS.fullmatch(n)}
    rows = sum(_rows_read(n, v, entry["config"], manifest["max_seq_len"]) for n, v in gathered.items())
    rest = sum(sizes.values()) - screen - sum(gathered.values()) - (head if "lm_head" in sizes else 0)
    # records (the scales inside them) of a head without grid error: the float32 logits come from them
    records = "head_screen.codes" in sizes and not {"head_screen.scales", "head_screen.err"} & names
    if "head_screen.rows" in sizes:  # the head's int8 rows, gathered from (graph/head_screen.head_rows)
        screen -= sizes["head_screen.rows"]
        if "embed" not in sizes and "lm_head" not in sizes:  # a tied embedding's row
            rows += sizes["head_screen.rows"] // entry["config"]["vocab_size"]
    full = sizes["head_screen.codes"] if records else head
    return {"full": rest + rows + full, "screened": rest + rows + (screen if screen else head)}


def _rows_read(name: str, size: int, cfg: dict, max_seq_len: int) -> int:
    """The bytes one token's step reads of a table it gathers rows from (graph/moe.py gathers the chosen experts'
    matrices by index: the others are never read)."""
    if name == "embed":
        return size // cfg["vocab_size"]
    if EXPERTS.fullmatch(name):  # a hand-edited manifest may name expert tensors in a dense model: read whole
        experts = cfg.get("n_routed_experts") or 1
        return size // experts * min(cfg.get("num_experts_per_tok") or experts, experts)
    return size // (max_seq_len + 1)


def _layer_ranges(layers: list[int]) -> str:
    runs, start = [], None
    for i, n in enumerate(layers):
        start = n if start is None else start
        if i + 1 == len(layers) or layers[i + 1] != n + 1:
            runs.append(f"{start}" if start == n else f"{start}-{n}")
            start = None
    return ",".join(runs)


def weight_lines(m: dict, target: dict) -> list[str]:
    """Each target matrix's format (layers grouped: "qkv q4_1 layers 0-29"), why any stayed float32, and the
    weight bytes one decode step reads."""
    q = m.get("quantization", {"option": "float32 (built before formats were recorded)", "formats": {}})
    kernel = q.get("kernel_matrices", [])
    by_kernel = (f"; {len(kernel)} products by speccompile's own kernels (MatMulQ4, MatMulQ8), which round alike"
                 if kernel else "")
    level = f", MatMulNBits accuracy level {q['accuracy_level']}{by_kernel}" if "accuracy_level" in q else ""
    out = [f"weights     --weights {q['option']}{level}"]
    # the quantize pass names float matrices float32; the precision pass then stores them in the bundle's dtype
    floats = m.get("dtype", "float32")
    groups: dict[tuple[str, str], list[int]] = {}
    for name, fmt in q["formats"].items():
        layer = re.match(r"l(\d+)\.(.+)", name)
        fmt = floats if fmt == "float32" else fmt
        key = (layer.group(2), fmt) if layer else (name, fmt)
        groups.setdefault(key, []).append(int(layer.group(1)) if layer else -1)
    for (name, fmt), layers in groups.items():
        where = f" layers {_layer_ranges(sorted(layers))}" if layers[0] >= 0 else ""
        out.append(f"            {name:<10} {fmt}{where}")
    for name, why in q.get("fallbacks", {}).items():
        out.append(f"            {name} {floats}: {why}")
    return out + [_step_line(m, target, floats)]


def _step_line(m: dict, target: dict, floats: str) -> str:
    """The weight bytes one decode step reads: with the exact greedy head's screen and without it, where the bundle
    has one."""
    files = sum(m["files"].get(f, {}).get("bytes", 0) for f in target["weights"])
    step = pass_weight_bytes(m, target, files)
    if not any(n.startswith("head_screen.") for n in target.get("initializers", ())):
        return f"decode step reads {step['full'] / 2**20:.1f} MiB of weights ({floats} head, no int8 screen)"
    inputs = {i["name"] for i in target.get("inputs", ())}  # sampling screened too (runtime/noise.py)
    screened, full = (("greedy, temperature and top-k sampling", "top-p and min-p sampling, logprobs")
                      if "noise_top_k" in inputs else
                      ("greedy and temperature sampling", "top-k / top-p sampling") if "sample_noise" in inputs
                      else ("greedy", "sampling"))
    return (f"decode step reads {step['screened'] / 2**20:.1f} MiB of weights ({screened}, screened head), "
            f"{step['full'] / 2**20:.1f} MiB with float32 logits ({full})")


def tree_label(tree: dict) -> str:
    """A manifest tree as --tree spells it (adaptive:4+lookup:6), with its node count where it is fixed."""
    kind, lookup = tree["kind"], f"+lookup:{tree['lookup']}" if tree.get("lookup") else ""
    if kind == "adaptive":
        return f"adaptive:{tree['depth']}{lookup} (at most {tree['size']} nodes a pass)"
    if kind in ("chain", "dynamic"):  # chain:K, dynamic:N: the size is the spec's number
        return f"{kind}:{tree['size']}{lookup}"
    return f"{kind}{lookup} of {tree['size']} nodes"  # static: its paths came from a file
