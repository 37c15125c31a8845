"""What a Q4_1 (or Q5_1, Q4_K) target's offset products cost a plain step.

A GGUF block with a minimum (w = d*q + m) goes into MatMulNBits as d*(q - centre) plus a small float32 product of
x's per-32-block sums with (centre*d + m), K/32 rows (speccompile.compile.quantize.nbits): per matrix a block-sum
product, the offset product and an add. This tool times plain steps of the bundle's target graph against a copy of
it without those three nodes (wrong tokens, the same shapes and every other node), on the real answer's tokens at
the same positions, the two interleaved per prompt (the copy lives in a temporary folder beside the bundle,
removed after). The difference is what a kernel that took the minimum inside the 4-bit product (as llama.cpp's
Q4_1 kernel does) could save at most. docs/results.md has the figures.

    python tools/offset_cost.py BUNDLE [--threads 2] [--prompts 6]
"""
import argparse
import os
import shutil
import tempfile
import time

import numpy as np
import onnx

import speccompile
from speccompile.bench.prompts import default_dataset, load_questions, pick_prompts
from speccompile.cli.errors import one_line_errors
from speccompile.runtime.engine import Engine
from speccompile.runtime.row_parity import match_rows

CHUNK = 128  # prefill tokens per pass (the engine's most)


def without_offsets(model: onnx.ModelProto) -> int:
    """Rewire each `Add(MatMulNBits, MatMul(block sums, offsets))` to the MatMulNBits alone and drop the products
    nobody reads any more. Returns how many offset products were dropped."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    dropped = []
    for n in g.node:
        parts = [producer.get(i) for i in n.input]
        if n.op_type == "Add" and len(parts) == 2 and all(parts):
            product, offset = parts
            if product.op_type == "MatMulNBits" and offset.op_type == "MatMul" and "offsets" in offset.input[1]:
                product.output[0] = n.output[0]
                dropped += [n, offset]
    kept = [n for n in g.node if all(n is not d for d in dropped)]
    read = {i for n in kept for i in n.input} | {o.name for o in g.output} | _subgraph_reads(kept)
    kept = [n for n in kept if n.op_type != "MatMul" or any(o in read for o in n.output)]
    del g.node[:]
    g.node.extend(kept)
    return len(dropped) // 2


def _subgraph_reads(nodes) -> set[str]:
    names = set()
    for n in nodes:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                names |= {i for m in a.g.node for i in m.input} | _subgraph_reads(a.g.node)
    return names


def stripped_engine(bundle: str, entry: dict, threads: int, work: str) -> Engine:
    """The target without its offset products, in `work` beside the bundle's weights."""
    model = onnx.load(os.path.join(bundle, entry["graph"]), load_external_data=False)
    print(f"offset products dropped: {without_offsets(model)}")
    onnx.save(model, os.path.join(work, entry["graph"]))
    for name in os.listdir(bundle):
        if name != entry["graph"] and name.endswith((".bin", ".onnx")):
            _link_or_copy(os.path.join(bundle, name), os.path.join(work, name))
    engine = Engine(work, entry, threads)
    match_rows(engine)  # one-token steps as the generator runs them
    return engine


def _link_or_copy(src: str, dst: str) -> None:
    """onnxruntime refuses external data through a symlink out of the model's folder: a hard link, else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def prefill(engine: Engine, ids: np.ndarray) -> None:
    engine.cache.truncate(0)
    for c0 in range(0, len(ids), CHUNK):
        engine.forward(ids[c0:c0 + CHUNK])
        engine.cache.truncate(min(c0 + CHUNK, len(ids)))


@one_line_errors  # bad input (a bundle, a dataset line): one `error:` line, as the CLI gives
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--new-tokens", type=int, default=80)
    a = ap.parse_args()
    g = speccompile.load(a.bundle, threads=a.threads, context_cache=False)
    entry = g.manifest["models"]["target"]
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(a.bundle))) as work:
        engines = {"bundle": g.target, "without offsets": stripped_engine(a.bundle, entry, a.threads, work)}
        prompts, _ = pick_prompts(load_questions(default_dataset()), a.prompts, g.encode_chat, 1500)
        times = {name: [] for name in engines}
        for i, p in enumerate(prompts):
            seq = np.concatenate([p["ids"], g.generate(p["ids"], a.new_tokens, speculate=False, chat=False).token_ids])
            order = list(engines.items())[::1 if i % 2 == 0 else -1]
            for name, engine in order:
                prefill(engine, seq[:len(p["ids"])])
                for j in range(len(p["ids"]), len(seq)):
                    t0 = time.perf_counter()
                    engine.forward(seq[j:j + 1], full_logits=False)
                    times[name].append(time.perf_counter() - t0)
    full, bare = (np.array(t) * 1e3 for t in times.values())
    print(f"plain step, {len(full)} positions: bundle {np.median(full):.2f} ms, without offset products "
          f"{np.median(bare):.2f} ms, paired difference {np.median(full - bare):.2f} ms "
          f"({np.median(full - bare) / np.median(full):.0%} of the step)")


if __name__ == "__main__":
    main()
