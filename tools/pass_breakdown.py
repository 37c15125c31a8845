"""Where a verify pass's time goes, by rows: the whole pass on real tokens (plain step against 2- and 3-row chains at
the same positions, paired), then the attention alone (the target's GroupQueryAttention nodes over a committed
length, by query rows) and the 4-bit products alone (MatMulNBits at accuracy level 4 in the target's shapes,
random codes: their cost does not depend on the values), and the exact greedy head's int8 screen alone. Medians
of interleaved runs; docs/results.md ("Where a pass's time goes", "A plain 4-bit step taken apart") has the
figures.

    python tools/pass_breakdown.py BUNDLE [--threads 2] [--prompts 10] [--lengths 121,250,400,700]
"""
import argparse

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import speccompile
from speccompile.bench.prompts import default_dataset, load_questions, pick_prompts
from speccompile.cli.errors import one_line_errors
from speccompile.runtime.sessions import session_options

ROUNDS = 40


def median_ms(runs: list[float]) -> str:
    return f"{np.median(runs) * 1e3:.2f}"


def timed(f) -> float:
    import time
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def whole_pass(g, n_prompts: int) -> None:
    """Plain step, 2-row and 3-row chains of the answer's own tokens at the same positions, paired."""
    t = g.target
    prompts, _ = pick_prompts(load_questions(default_dataset()), n_prompts, g.encode_chat, 1500)
    rows = {1: [], 2: [], 3: []}
    for p in prompts:
        seq = np.concatenate([p["ids"], g.generate(p["ids"], 80, speculate=False, chat=False).token_ids])
        n = len(p["ids"]) - 1
        t.cache.truncate(0)
        for c0 in range(0, n, 128):
            t.forward(seq[c0:min(c0 + 128, n)])
            t.cache.truncate(min(c0 + 128, n))
        for base in range(n, len(seq) - 4, 3):
            for k in rows:
                block = seq[base:base + k]
                rows[k].append(timed(lambda: t.forward(block, full_logits=False) if k == 1
                                     else t.verify(block, None, np.arange(k) - 1)))
                t.cache.truncate(base)
            t.forward(seq[base:base + 3], rows=np.arange(3), full_logits=False)
            t.cache.truncate(base + 3)
    one = np.array(rows[1])
    print(f"whole pass, {len(one)} positions: 1 row {median_ms(one)} ms; second row "
          f"+{median_ms(np.array(rows[2]) - one)}; second and third +{median_ms(np.array(rows[3]) - one)}")


def _session(nodes, inputs, outputs, inits, threads):
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits), opset_imports=[
        helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(model.SerializeToString(), session_options(threads), providers=["CPUExecutionProvider"])


def attention(cfg: dict, layers: int, lmax: int, lengths: list[int], threads: int) -> None:
    """The target's attention nodes alone (fused rotary, tree bias, caches bound in place), by query rows."""
    hq, hkv, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    f = TensorProto.FLOAT
    ang = np.outer(np.arange(lmax), 1.0 / (10000 ** (np.arange(0, d, 2) / d)))
    inits = [numpy_helper.from_array(np.cos(ang).astype(np.float32), "cos"),
             numpy_helper.from_array(np.sin(ang).astype(np.float32), "sin")]
    inputs = [helper.make_tensor_value_info("qkv", f, [1, "S", (hq + 2 * hkv) * d]),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
              helper.make_tensor_value_info("total", TensorProto.INT32, []),
              helper.make_tensor_value_info("pos", TensorProto.INT64, [1, "S"]),
              helper.make_tensor_value_info("bias", f, [1, 1, "S", "T"])]
    nodes, outputs = [], []
    for i in range(layers):
        inputs += [helper.make_tensor_value_info(f"{kv}{i}", f, [1, hkv, lmax, d]) for kv in "kv"]
        nodes.append(helper.make_node("GroupQueryAttention", ["qkv", "", "", f"k{i}", f"v{i}", "seqlens_k", "total",
                                                              "cos", "sin", "pos", "bias"],
                                      [f"o{i}", f"pk{i}", f"pv{i}"], domain="com.microsoft", num_heads=hq,
                                      kv_num_heads=hkv, do_rotary=1))
        outputs += [helper.make_tensor_value_info(f"o{i}", f, [1, "S", hq * d])]
        outputs += [helper.make_tensor_value_info(f"p{kv}{i}", f, [1, hkv, lmax, d]) for kv in "kv"]
    s = _session(nodes, inputs, outputs, inits, threads)
    caches = [np.random.rand(1, hkv, lmax, d).astype(np.float32) for _ in range(2 * layers)]
    for n in lengths:
        runs = {S: [] for S in (1, 2, 3, 4)}
        for _ in range(ROUNDS):
            for S, out in runs.items():
                T = -(-(n + S) // 64) * 64
                io = s.io_binding()
                io.bind_cpu_input("qkv", np.random.rand(1, S, (hq + 2 * hkv) * d).astype(np.float32))
                io.bind_cpu_input("seqlens_k", np.array([n + S - 1], np.int32))
                io.bind_cpu_input("total", np.array(T, np.int32))
                io.bind_cpu_input("pos", (n + np.arange(S))[None].astype(np.int64))
                io.bind_cpu_input("bias", np.zeros((1, 1, S, T), np.float32))
                for i in range(layers):
                    for j, kv in enumerate("kv"):
                        ov = ort.OrtValue.ortvalue_from_numpy(caches[2 * i + j])
                        io.bind_ortvalue_input(f"{kv}{i}", ov)
                        io.bind_ortvalue_output(f"p{kv}{i}", ov)
                    io.bind_output(f"o{i}")
                out.append(timed(lambda: s.run_with_iobinding(io)))
        print(f"attention, {layers} layers at {n} tokens, ms by query rows: "
              + ", ".join(f"{S}: {median_ms(v)}" for S, v in runs.items()))


def products(cfg: dict, layers: int, threads: int) -> None:
    """The 4-bit products of every layer (q/k/v joined, o, gate and up joined, down), random codes."""
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    qkv = (cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * cfg["head_dim"]
    shapes = [(h, qkv), (h, h), (h, 2 * inter), (inter, h)] * layers
    rng = np.random.default_rng(0)
    nodes, inits, outputs = [], [], []
    for i, (k, n) in enumerate(shapes):
        inits += [numpy_helper.from_array(rng.integers(0, 256, (n, k // 32, 16), dtype=np.uint8), f"c{i}"),
                  numpy_helper.from_array(rng.random(n * k // 32).astype(np.float32) * 0.01, f"s{i}")]
        nodes.append(helper.make_node("MatMulNBits", [f"x{k}", f"c{i}", f"s{i}"], [f"y{i}"], domain="com.microsoft",
                                      K=k, N=n, bits=4, block_size=32, accuracy_level=4))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["M", n]))
    widths = sorted({k for k, _ in shapes})
    s = _session(nodes, [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, ["M", k]) for k in widths],
                 outputs, inits, threads)
    runs = {M: [] for M in (1, 2, 3, 4)}
    for _ in range(ROUNDS):
        for M, out in runs.items():
            feed = {f"x{k}": np.random.rand(M, k).astype(np.float32) for k in widths}
            out.append(timed(lambda: s.run(None, feed)))
    print(f"4-bit products, {len(shapes)} of them, ms by rows: " + ", ".join(f"{M}: {median_ms(v)}"
                                                                          for M, v in runs.items()))


def head_screen(cfg: dict, threads: int, candidates: int = 64) -> None:
    """The exact greedy head's screen alone (graph/head_screen.py): the int8 product over the vocabulary (random
    codes), then its error bound (x's block maxima times the codes' per-block l1 norms) and the top candidates."""
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    rng, f = np.random.default_rng(0), TensorProto.FLOAT
    inits = [numpy_helper.from_array(rng.integers(0, 256, (v, h // 32, 32), dtype=np.uint8), "codes"),
             numpy_helper.from_array(rng.random(v * h // 32).astype(np.float32) * 0.01, "scales"),
             numpy_helper.from_array(rng.random((h // 32, v)).astype(np.float32), "l1"),
             numpy_helper.from_array(np.array([-1, h // 32, 32], np.int64), "blocks"),
             numpy_helper.from_array(np.array([candidates], np.int64), "k"),
             numpy_helper.from_array(np.array([2], np.int64), "last")]
    nodes = [helper.make_node("MatMulNBits", ["x", "codes", "scales"], ["screen"], domain="com.microsoft", K=h, N=v,
                              bits=8, block_size=32, accuracy_level=4),
             helper.make_node("Reshape", ["x", "blocks"], ["xb"]), helper.make_node("Abs", ["xb"], ["xa"]),
             helper.make_node("ReduceMax", ["xa", "last"], ["xm"], keepdims=0),
             helper.make_node("MatMul", ["xm", "l1"], ["bound"]), helper.make_node("Add", ["screen", "bound"], ["up"]),
             helper.make_node("TopK", ["up", "k"], ["top", "ids"])]
    x = [helper.make_tensor_value_info("x", f, ["M", h])]
    screen = _session(nodes[:1], x, [helper.make_tensor_value_info("screen", f, ["M", v])], inits[:2], threads)
    whole = _session(nodes, x, [helper.make_tensor_value_info("top", f, ["M", candidates])], inits, threads)
    for name, s in (("screen", screen), ("screen, bound and top candidates", whole)):
        runs = {M: [] for M in (1, 2, 4)}
        for _ in range(ROUNDS):
            for M, out in runs.items():
                feed = {"x": np.random.rand(M, h).astype(np.float32)}
                out.append(timed(lambda: s.run(None, feed)))
        print(f"head {name} ({v} tokens), ms by rows: " + ", ".join(f"{M}: {median_ms(r)}" for M, r in runs.items()))


@one_line_errors  # bad input (a bundle, a dataset line): one `error:` line, as the CLI gives
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--lengths", default="121,250,400,700")
    a = ap.parse_args()
    g = speccompile.load(a.bundle, threads=a.threads, context_cache=False)
    entry = g.manifest["models"]["target"]
    cfg, layers = entry["config"], entry["num_layers"]
    whole_pass(g, a.prompts)
    attention(cfg, layers, g.target.max_seq_len + 1, [int(n) for n in a.lengths.split(",")], a.threads)
    products(cfg, layers, a.threads)
    head_screen(cfg, a.threads)


if __name__ == "__main__":
    main()
