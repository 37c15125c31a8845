"""speccompile's own MatMulQ4, MatMulQ8, MatMulQ8Bound and MatMulQ8F kernels (speccompile.plugins.q4_matmul): their weight layouts,
numpy definitions, and the compiled kernels inside onnxruntime against them; each row the same whatever the rows
beside it (what keeps speculation over it lossless); the GGUF blocks MatMulQ4 takes exactly and the ones it leaves
to MatMulNBits; the int8 matrices MatMulQ8 takes; GatherQ8F's rows."""
import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from speccompile.compile.quantize import kernel_form
from speccompile.compile.quantize.int8 import SUFFIX_CODES, SUFFIX_SCALES, int8_blocks
from speccompile.compile.quantize.nbits import pack_gguf_matrix
from speccompile.errors import SpeccompileError
from speccompile.plugins import q4_matmul
from test_gguf import synthetic_blocks
from test_quantized import run_product

WHY = q4_matmul.unavailable()
needs_kernel = pytest.mark.skipif(WHY is not None, reason=f"speccompile's kernels cannot run here: {WHY}")


def random_weight(n, k, seed=0):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 16, (n, k)).astype(np.uint8)
    scales = (rng.random((n, k // 32)) * 0.02).astype(np.float16).astype(np.float32)
    minimums = (-rng.random((n, k // 32)) * 0.15).astype(np.float16).astype(np.float32)
    return codes, scales, minimums


def test_the_layout_keeps_codes_scales_and_minimums():
    codes, scales, minimums = random_weight(48, 96)
    records = q4_matmul.pack(codes, scales, minimums)
    assert records.shape == (3, 3, q4_matmul.RECORD) and records.dtype == np.uint8
    for got, want in zip(q4_matmul.unpack(records), (codes, scales, minimums)):
        assert np.array_equal(got, want)


def test_the_layout_refuses_what_it_would_change():
    codes, scales, minimums = random_weight(32, 64)
    assert q4_matmul.pack(codes, scales * np.float32(1 + 2 ** -20), minimums) is None  # not a float16
    assert q4_matmul.pack(codes, scales, np.full_like(minimums, np.inf)) is None
    assert q4_matmul.pack(codes[:24], scales[:24], minimums[:24]) is None  # 24 outputs: not whole tiles


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1])
def test_gguf_q4_blocks_keep_their_weight(qtype):
    """A GGUF's Q4_0 / Q4_1 matrix in the kernel's layout is the file's dequantized weight."""
    raw = synthetic_blocks(qtype, 32, 128, seed=3)
    records = kernel_form.records(pack_gguf_matrix(raw, qtype, (32, 128)))
    codes, scales, minimums = q4_matmul.unpack(records)
    w = codes.reshape(32, 4, 32) * scales[..., None] + minimums[..., None]
    want = gguf.quants.dequantize(raw, qtype).astype(np.float32)
    np.testing.assert_allclose(w.reshape(32, 128), want, rtol=0, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q5_0, Q.Q5_1, Q.Q6_K])
def test_other_blocks_stay_with_matmulnbits(qtype):
    raw = synthetic_blocks(qtype, 32, 256, seed=4)
    assert kernel_form.records(pack_gguf_matrix(raw, qtype, (32, 256))) is None


def test_an_unknown_choice_is_refused():
    with pytest.raises(SpeccompileError, match="kernels"):
        kernel_form.use_kernel("fast", None)
    assert kernel_form.use_kernel("onnxruntime", None)[0] is False
    assert kernel_form.use_kernel("auto", "a TensorRT build") == (False, "a TensorRT build")


def test_the_definition_rounds_each_block_of_the_input():
    """reference(): the input rounded to int8 per 32-block (scale max|x|/127), products exact, the minimum times
    the block's float sum; within half a rounding step per element of the float product."""
    codes, scales, minimums = random_weight(32, 128, seed=5)
    x = np.random.default_rng(6).standard_normal((4, 128)).astype(np.float32)
    x[1, :32] = 0  # a zero block: scale 0, nothing divided by it
    y = q4_matmul.reference(x, q4_matmul.pack(codes, scales, minimums))
    w = (codes.reshape(32, 4, 32) * scales[..., None] + minimums[..., None]).reshape(32, 128)
    exact = x.astype(np.float64) @ w.T
    half_step = np.repeat(np.abs(x).reshape(4, 4, 32).max(-1) / 254, 32, axis=1)  # [rows, K]
    assert np.all(np.abs(y - exact) <= half_step @ np.abs(codes * np.repeat(scales, 32, axis=1)).T + 1e-5)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])
def test_the_kernel_computes_the_definition(tmp_path, rows):
    codes, scales, minimums = random_weight(64, 192, seed=rows)
    records = q4_matmul.pack(codes, scales, minimums)
    x = np.random.default_rng(rows).standard_normal((rows, 192)).astype(np.float32)
    y = run_product(tmp_path, {"m" + kernel_form.SUFFIX: records}, "m", x)
    ref = q4_matmul.reference(x, records)
    assert y.shape == ref.shape and np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()


@needs_kernel
def test_a_prefill_chunk_of_many_rows_computes_the_definition(tmp_path):
    """Rows enough that the rounded input outgrows the op's stack buffer (a prefill chunk): the same numbers."""
    codes, scales, minimums = random_weight(32, 1024, seed=11)
    records = q4_matmul.pack(codes, scales, minimums)
    x = np.random.default_rng(12).standard_normal((48, 1024)).astype(np.float32)
    y = run_product(tmp_path, {"m" + kernel_form.SUFFIX: records}, "m", x)
    ref = q4_matmul.reference(x, records)
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()
    assert np.array_equal(run_product(tmp_path, {"m" + kernel_form.SUFFIX: records}, "m", x[:3]), y[:3])


@needs_kernel
def test_each_row_is_computed_alike_whatever_the_rows_beside_it(tmp_path):
    """Bit for bit: one row alone, or among 2 to 11 others (the kernel's groups of eight rows, four on AVX2, and
    their remainders): a verify pass computes exactly what a plain step computes."""
    codes, scales, minimums = random_weight(96, 576, seed=7)
    weights = {"m" + kernel_form.SUFFIX: q4_matmul.pack(codes, scales, minimums)}
    x = np.random.default_rng(8).standard_normal((12, 576)).astype(np.float32)
    alone = np.concatenate([run_product(tmp_path, weights, "m", x[i:i + 1]) for i in range(12)])
    for rows in range(2, 13):
        assert np.array_equal(run_product(tmp_path, weights, "m", x[:rows]), alone[:rows]), rows


@needs_kernel
def test_many_rows_compute_each_row_as_it_is_alone(tmp_path):
    """Bit for bit: a product of 16 rows or more (a prefill chunk's; on AMX the tile unit's, 16 rows at a time, the
    rest by the VNNI kernel) gives each row what it gets alone. K of 34 blocks: past the 32 the AMX path unpacks at
    a time."""
    codes, scales, minimums = random_weight(32, 34 * 32, seed=13)
    weights = {"m" + kernel_form.SUFFIX: q4_matmul.pack(codes, scales, minimums)}
    x = np.random.default_rng(14).standard_normal((40, 34 * 32)).astype(np.float32) * 2
    alone = np.concatenate([run_product(tmp_path, weights, "m", x[i:i + 1]) for i in range(40)])
    for rows in (16, 17, 31, 32, 33, 40):
        assert np.array_equal(run_product(tmp_path, weights, "m", x[:rows]), alone[:rows]), rows


AVX2_RUN = """
import sys, numpy as np, pathlib
sys.path.insert(0, sys.argv[1])
from test_quantized import run_product
data = np.load(sys.argv[2])
np.save(sys.argv[3], run_product(pathlib.Path(sys.argv[4]), {sys.argv[5]: data["w"]}, "m", data["x"],
                                 gated=sys.argv[6] == "gated", floats=sys.argv[6] == "floats",
                                 slack=1.01 if sys.argv[6] == "bound" else None))
"""


@pytest.mark.skipif(q4_matmul.instruction_set() != "AVX-512 VNNI",
                    reason="only a CPU with AVX-512 VNNI runs both of the kernel's variants")
def test_the_avx2_variant_computes_what_the_avx512_one_does(tmp_path):
    """Bit for bit: a bundle's output does not depend on which of the two the CPU runs."""
    import os
    import subprocess
    import sys
    codes, scales, minimums = random_weight(64, 576, seed=9)
    x = np.random.default_rng(10).standard_normal((7, 576)).astype(np.float32) * 3
    for name, weights, form in (("m" + kernel_form.SUFFIX, q4_matmul.pack(codes, scales, minimums), "plain"),
                                ("m" + SUFFIX_CODES, q4_matmul.pack8(*random_int8(64, 576, seed=9)), "plain"),
                                ("m" + kernel_form.SUFFIX, q4_matmul.pack(codes, scales, minimums), "gated"),
                                ("m", q4_matmul.pack8(*random_int8(64, 576, seed=9)), "floats"),
                                ("m", q4_matmul.pack8(*int8_with_extremes(64, 576, seed=9)), "bound")):
        np.savez(tmp_path / "in.npz", w=weights, x=x)
        env = dict(os.environ, SPECCOMPILE_Q4_ISA="avx2")
        subprocess.run([sys.executable, "-c", AVX2_RUN, os.path.dirname(__file__), str(tmp_path / "in.npz"),
                        str(tmp_path / "avx2.npy"), str(tmp_path), name, form], env=env, check=True)
        y = run_product(tmp_path, {name: weights}, "m", x, gated=form == "gated", floats=form == "floats",
                        slack=1.01 if form == "bound" else None)
        assert np.array_equal(np.load(tmp_path / "avx2.npy"), y), (name, form)


def test_the_rows_tool_times_both_kernels(monkeypatch, capsys):
    """tools/kernel_rows.py: a line of times per kernel, for the 4-bit chain and the head's int8 screen (speccompile's
    where they run, else why not)."""
    from tools_util import tool
    monkeypatch.setattr("sys.argv", ["kernel_rows.py", "--rounds", "1", "--threads", "1"])
    tool("kernel_rows").main()
    lines = capsys.readouterr().out.splitlines()
    times = [line.split()[-7:] for line in lines if line.startswith("MatMul")]
    headers = [line.split()[-7:] for line in lines if "rows" in line]
    assert headers == [["1", "2", "4", "8", "16", "32", "64"]] * 2
    assert all(float(t) > 0 for row in times for t in row)
    assert len(times) == (4 if WHY is None else 2) and (WHY is None or WHY in lines[-1])


@needs_kernel
def test_a_weight_too_small_for_its_shape_is_an_error_not_a_read_past_it(tmp_path):
    """A graph is not trusted to size the op's weight (a bundle may be hostile): K and N that need more records
    than the weight holds fail the pass with the op's message."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from speccompile.runtime.sessions import open_session
    codes, scales, minimums = random_weight(16, 64)
    for op, weight in ((q4_matmul.OP_TYPE, q4_matmul.pack(codes, scales, minimums)),
                       (q4_matmul.OP_TYPE_Q8, q4_matmul.pack8(*random_int8(16, 64))),
                       (q4_matmul.OP_TYPE_Q8F, q4_matmul.pack8(*random_int8(16, 64))),
                       (q4_matmul.OP_TYPE_Q8_BOUND, q4_matmul.pack8(*random_int8(16, 64))),
                       (q4_matmul.OP_TYPE_SILU, q4_matmul.pack(codes, scales, minimums))):
        bound = op == q4_matmul.OP_TYPE_Q8_BOUND
        node = helper.make_node(op, ["x", "w"], ["y", "upper"] if bound else ["y"], domain=q4_matmul.DOMAIN, K=64,
                                N=32, **({"slack": 1.01} if bound else {}))
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                                  [helper.make_tensor_value_info(o, TensorProto.FLOAT, [1, 32]) for o in node.output],
                                  [numpy_helper.from_array(weight, "w")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                        helper.make_opsetid(q4_matmul.DOMAIN, 1)])
        onnx.save(model, str(tmp_path / "m.onnx"))
        session = open_session(str(tmp_path / "m.onnx"), ort.SessionOptions(), ["CPUExecutionProvider"])
        with pytest.raises(Exception, match="weight's size does not fit"):
            session.run(None, {"x": np.ones((1, 64), np.float32)})


def random_int8(n, k, seed=0):
    """(codes [N, K] stored + 128, scales [N, K/32]) of a random matrix, as compile/quantize/int8.py makes them."""
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    codes, scales = int8_blocks(w)
    return codes.reshape(n, k), scales.reshape(n, k // 32)


def test_the_int8_layout_keeps_codes_and_scales():
    codes, scales = random_int8(48, 96)
    records = q4_matmul.pack8(codes, scales)
    assert records.shape == (3, 3, q4_matmul.RECORD8) and records.dtype == np.uint8
    for got, want in zip(q4_matmul.unpack8(records), (codes, scales)):
        assert np.array_equal(got, want)
    assert q4_matmul.pack8(codes[:24], scales[:24]) is None  # 24 outputs: not whole tiles


def test_int8_matrices_that_tile_go_to_the_int8_kernel():
    """kernel_form.int8_records: a draft head's int8 matrix and the head screen, each its weight exactly; a matrix
    whose outputs do not tile keeps its codes and scales (MatMulNBits)."""
    big, small = random_int8(32, 64, seed=1), random_int8(24, 64, seed=2)
    weights = {"a" + SUFFIX_CODES: big[0].reshape(32, 2, 32), "a" + SUFFIX_SCALES: big[1].reshape(-1),
               "b" + SUFFIX_CODES: small[0].reshape(24, 2, 32), "b" + SUFFIX_SCALES: small[1].reshape(-1),
               "head_screen.codes": big[0].reshape(32, 2, 32), "head_screen.scales": big[1].reshape(-1)}
    out, done = kernel_form.int8_records(weights)
    assert sorted(done) == ["a" + SUFFIX_CODES, "head_screen.codes"]
    assert "a" + SUFFIX_SCALES not in out and "head_screen.scales" not in out and "b" + SUFFIX_SCALES in out
    for key in done:
        assert all(np.array_equal(g, w) for g, w in zip(q4_matmul.unpack8(out[key]), big))


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])
def test_the_int8_kernel_computes_the_definition_and_matmulnbits_product(tmp_path, rows):
    """MatMulQ8 against its numpy definition, and against onnxruntime's 8-bit MatMulNBits on the same blocks (the
    same rounding of x: they differ by float summation order)."""
    codes, scales = random_int8(64, 192, seed=rows)
    records = q4_matmul.pack8(codes, scales)
    x = np.random.default_rng(rows).standard_normal((rows, 192)).astype(np.float32)
    y = run_product(tmp_path, {"m" + SUFFIX_CODES: records}, "m", x)
    ref = q4_matmul.reference8(x, records)
    assert y.shape == ref.shape and np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()
    nbits = run_product(tmp_path, {"m" + SUFFIX_CODES: codes.reshape(64, 6, 32), "m" + SUFFIX_SCALES: scales}, "m", x)
    assert np.abs(y - nbits).max() <= 1e-5 * np.abs(ref).max()


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])
def test_the_float_input_int8_kernel_computes_the_float32_product(tmp_path, rows):
    """MatMulQ8F: x as it is times the records' dequantized matrix, within float32 rounding of the float64 product
    (no rounding of x to int8), the same as a float32 matmul of the dequantized matrix to that rounding."""
    codes, scales = random_int8(64, 192, seed=rows)
    records = q4_matmul.pack8(codes, scales)
    x = np.random.default_rng(rows).standard_normal((rows, 192)).astype(np.float32)
    y = run_product(tmp_path, {"m": records}, "m", x, floats=True)
    ref = q4_matmul.reference8f(x, records)
    assert y.shape == ref.shape and np.abs(y - ref).max() <= 1e-6 * np.abs(ref).max()
    dense = (codes.reshape(64, -1, 32).astype(np.float32) - 128) * scales[..., None]
    assert np.abs(x @ dense.reshape(64, -1).T - ref).max() <= 1e-6 * np.abs(ref).max()
    assert np.abs(run_product(tmp_path, {"m" + SUFFIX_CODES: records}, "m", x) - ref).max() > 1e-4 * np.abs(ref).max()


def int8_with_extremes(n, k, seed):
    """random_int8's matrix with codes at both ends of int8 (-128 and 127: stored 0 and 255) in some blocks."""
    codes, scales = random_int8(n, k, seed)
    codes[::7, ::5] = 0
    codes[3::11, 1::9] = 255
    return codes, scales


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])
def test_the_bounded_int8_kernel_bounds_the_product_of_x_as_it_is(tmp_path, rows):
    """MatMulQ8Bound: its first output is MatMulQ8's bit for bit; its second is its numpy definition (each output
    plus slack times the sum over blocks of x's rounding step times the block's L1 norm) and above the float64
    product of x as it is, for rows with heavy tails and outliers, codes at -128 and 127 included; not a vacuous
    bound either (within a few steps' worth of the estimate)."""
    codes, scales = int8_with_extremes(64, 192, seed=rows)
    records = q4_matmul.pack8(codes, scales)
    rng = np.random.default_rng(rows)
    x = (rng.standard_normal((rows, 192)) * np.exp(rng.standard_normal((rows, 192)) * 1.5)).astype(np.float32)
    y, upper = run_product(tmp_path, {"m": records}, "m", x, slack=1.01)
    assert np.array_equal(y, run_product(tmp_path, {"m" + SUFFIX_CODES: records}, "m", x))
    ref_y, ref_upper = q4_matmul.reference8_bound(x, records, 1.01)
    assert np.abs(upper - ref_upper).max() <= 1e-6 * np.abs(ref_upper).max()
    dense = (codes.reshape(64, -1, 32).astype(np.float64) - 128) * scales[..., None]
    exact = x.astype(np.float64) @ dense.reshape(64, -1).T
    assert np.all(upper >= exact) and np.all(2 * y - upper <= exact)  # the bound holds both ways
    step = np.abs(x.reshape(rows, -1, 32)).max(-1) / 127
    l1 = np.abs(dense).sum(-1)
    assert np.allclose(upper - y, 1.01 * step @ l1.T, rtol=1e-4, atol=1e-6 * np.abs(upper).max())


@needs_kernel
def test_the_bounded_int8_kernel_refuses_a_slack_below_one(tmp_path):
    """A slack below 1 would not cover the kernel's float rounding: the session refuses it."""
    records = q4_matmul.pack8(*random_int8(16, 64))
    with pytest.raises(Exception, match="slack must be from 1 to 2"):
        run_product(tmp_path, {"m": records}, "m", np.ones((1, 64), np.float32), slack=0.5)


@needs_kernel
def test_each_float_input_row_is_computed_alike_whatever_the_rows_beside_it(tmp_path):
    """Bit for bit, as MatMulQ8's rows: one row alone or among 2 to 11 others (groups of four, two on AVX2)."""
    weights = {"m": q4_matmul.pack8(*random_int8(96, 576, seed=17))}
    x = np.random.default_rng(18).standard_normal((12, 576)).astype(np.float32)
    alone = np.concatenate([run_product(tmp_path, weights, "m", x[i:i + 1], floats=True) for i in range(12)])
    for rows in range(2, 13):
        assert np.array_equal(run_product(tmp_path, weights, "m", x[:rows], floats=True), alone[:rows]), rows


@needs_kernel
def test_each_int8_row_is_computed_alike_whatever_the_rows_beside_it(tmp_path):
    weights = {"m" + SUFFIX_CODES: q4_matmul.pack8(*random_int8(96, 576, seed=7))}
    x = np.random.default_rng(8).standard_normal((12, 576)).astype(np.float32)
    alone = np.concatenate([run_product(tmp_path, weights, "m", x[i:i + 1]) for i in range(12)])
    for rows in range(2, 13):
        assert np.array_equal(run_product(tmp_path, weights, "m", x[:rows]), alone[:rows]), rows
    # and MatMulQ8Bound's bounds (a pass's screen: every row's candidates the same whatever shares the pass)
    weights = {"m": weights["m" + SUFFIX_CODES]}
    alone = np.concatenate([run_product(tmp_path, weights, "m", x[i:i + 1], slack=1.01) for i in range(12)], 1)
    for rows in range(2, 13):
        assert np.array_equal(run_product(tmp_path, weights, "m", x[:rows], slack=1.01), alone[:, :rows]), rows


@needs_kernel
def test_the_gated_product_is_silu_of_one_half_times_the_other(tmp_path):
    """MatMulQ4SiLU against its numpy definition, from one row to a prefill chunk's (AMX, where the CPU has it, from
    16 rows), and each row bit for bit what it is alone; gates far below and above zero stay finite."""
    codes, scales, minimums = random_weight(64, 34 * 32, seed=16)
    records = q4_matmul.pack(codes, scales, minimums)
    weights = {"m" + kernel_form.SUFFIX: records}
    x = np.random.default_rng(17).standard_normal((40, 34 * 32)).astype(np.float32) * 3
    x[0] *= 60  # gates of several hundred, both signs: e^-|z| under- and e^|z| would overflow
    y = run_product(tmp_path, weights, "m", x, gated=True)
    ref = q4_matmul.reference_silu(x, records)
    assert y.shape == (40, 32) and np.isfinite(y).all()
    assert np.abs(y - ref).max() <= 2e-5 * np.abs(ref).max()
    alone = np.concatenate([run_product(tmp_path, weights, "m", x[i:i + 1], gated=True) for i in range(40)])
    for rows in (1, 5, 16, 17, 40):
        assert np.array_equal(run_product(tmp_path, weights, "m", x[:rows], gated=True), alone[:rows]), rows


def top_k_session(domain: str | None):
    """A graph of one TopK (onnxruntime's, or speccompile's with `domain`), X [..., n] float and K [1]."""
    import onnxruntime as ort
    from onnx import TensorProto, helper
    from speccompile.runtime.sessions import session_options
    node = helper.make_node("TopK", ["x", "k"], ["v", "i"], **({"domain": domain} if domain else {"axis": -1}))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None),
                                            helper.make_tensor_value_info("k", TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info("v", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("i", TensorProto.INT64, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid(q4_matmul.DOMAIN, 1)])
    options = session_options(2)
    if domain:
        options.register_custom_ops_library(q4_matmul.library())
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@needs_kernel
def test_top_k_gives_onnxruntimes_outputs():
    """The head screen's candidates by speccompile's TopK: the same values and indices as onnxruntime's, equal values
    (many, rounded to halves) the lower index first, over a vocabulary-sized row, several rows, K from 0 to n."""
    ours, theirs = top_k_session(q4_matmul.DOMAIN), top_k_session(None)
    rng = np.random.default_rng(15)
    for shape, k in (((1, 49152), 65), ((3, 49152), 513), ((2, 100), 100), ((4, 7), 0), ((5, 7), 3),
                     ((2, 3, 50), 9)):
        for ties in (False, True):
            x = rng.standard_normal(shape).astype(np.float32) * 4
            x = np.round(x * 2) / 2 if ties else x
            feed = {"x": x, "k": np.array([k])}
            for got, want in zip(ours.run(None, feed), theirs.run(None, feed)):
                assert np.array_equal(got, want), (shape, k, ties)


@needs_kernel
def test_top_k_ranks_nan_last_and_refuses_a_k_past_the_row():
    import onnxruntime as ort
    ours = top_k_session(q4_matmul.DOMAIN)
    x = np.array([[1.0, np.nan, -np.inf, 3.0, -0.0, 0.0, np.nan, 2.0] * 3], np.float32)
    values, indices = ours.run(None, {"x": x, "k": np.array([24])})
    order = sorted(range(24), key=lambda j: (np.isnan(x[0, j]), -np.nan_to_num(x[0, j], nan=0.0), j))
    assert indices[0].tolist() == order
    assert np.array_equal(values[0], x[0, order], equal_nan=True)
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.Fail, match="K must be between 0"):
        ours.run(None, {"x": x, "k": np.array([25])})


def gather_session(rows: np.ndarray, n: int, k: int):
    """A graph of one GatherQ8F over `rows` (an initializer; attributes N and K) and int64 indices of any shape."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from speccompile.runtime.sessions import session_options
    node = helper.make_node(q4_matmul.OP_TYPE_GATHER_Q8F, ["w", "i"], ["y"], domain=q4_matmul.DOMAIN, K=k, N=n)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("i", TensorProto.INT64, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(rows, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid(q4_matmul.DOMAIN, 1)])
    options = session_options(2)
    options.register_custom_ops_library(q4_matmul.library())
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def test_the_row_layout_keeps_codes_and_scales():
    codes, scales = random_int8(40, 96)  # rows need not tile
    rows = q4_matmul.pack_rows8(codes, scales)
    assert rows.shape == (40, 3, 36) and rows.dtype == np.uint8
    dense = (codes.reshape(40, 3, 32).astype(np.float32) - 128) * scales[..., None]
    assert np.array_equal(q4_matmul.reference_gather8f(rows, np.arange(40)), dense.reshape(40, 96))


@needs_kernel
def test_gathered_rows_are_the_matrix_rows_bit_for_bit():
    """GatherQ8F: rows of a GGUF Q8_0 matrix's int8 blocks equal to the float32 matrix bit for bit, whatever the
    indices' shape, negative indices counting from the end (ONNX Gather's)."""
    w = gguf.quants.dequantize(synthetic_blocks(Q.Q8_0, 48, 128, seed=4), Q.Q8_0).astype(np.float32)
    codes, scales = int8_blocks(w)  # the same grid: the screen's codes of a Q8_0 head
    rows = q4_matmul.pack_rows8(codes.reshape(48, 128), scales.reshape(48, 4))
    session = gather_session(rows, 48, 128)
    for idx in (np.array([0]), np.array([[5, 47, 0], [-1, -48, 3]]), np.arange(48), np.zeros((2, 0), np.int64)):
        y = session.run(None, {"i": idx.astype(np.int64)})[0]
        assert y.shape == (*idx.shape, 128) and y.dtype == np.float32
        assert np.array_equal(y, w[idx]), idx


@needs_kernel
def test_gather_refuses_an_index_past_the_rows_and_rows_too_small_for_their_shape():
    """A graph is not trusted: an index past the matrix, or N and K that need more bytes than the rows hold, fail the
    pass with the op's message instead of reading past the weight."""
    import onnxruntime as ort
    rows = q4_matmul.pack_rows8(*random_int8(16, 64))
    session = gather_session(rows, 16, 64)
    for bad in (16, -17):
        with pytest.raises(ort.capi.onnxruntime_pybind11_state.Fail, match="outside the matrix's rows"):
            session.run(None, {"i": np.array([3, bad], np.int64)})
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.Fail, match="size does not fit"):
        gather_session(rows, 32, 64).run(None, {"i": np.array([0], np.int64)})
