"""The Gumbel noise rows of sampling by the argmax from speccompile's kernel library (plugins/q4_matmul/gumbel.c):
its numpy transcription bit for bit, Gumbel distributed, independent across positions and keys, and what
runtime/noise.py hands the target where the kernel runs."""
import numpy as np
import pytest

from speccompile.plugins import q4_matmul
from speccompile.runtime.noise import GumbelNoise
from speccompile.runtime.sampling import NOISE_STREAM, seed_key

RUNS = q4_matmul.unavailable() is None and q4_matmul.instruction_set() == "AVX-512 VNNI"
pytestmark = pytest.mark.skipif(not RUNS, reason="the noise kernel runs where speccompile's kernels run with AVX-512")


def kernel_row(key, position, temperature, n):
    out = np.full(n, np.nan, np.float32)
    assert q4_matmul.gumbel_row(key, position, temperature, out)
    return out


@pytest.mark.parametrize("n", [1, 15, 17, 1000, 49152])
def test_the_kernel_computes_its_numpy_transcription(n):
    for seed, position, temperature in ((0, 0, 1.0), (7, 123, 0.7), (2**40, 2**31 - 1, 1.3)):
        key = seed_key(seed, NOISE_STREAM)
        assert np.array_equal(kernel_row(key, position, temperature, n),
                              q4_matmul.reference_gumbel_row(key, position, temperature, n)), (n, seed, position)


def test_the_rows_are_gumbel_and_independent():
    """Over 60 positions of a 49152-token row: the Gumbel distribution's CDF within a Kolmogorov-Smirnov bound at
    1% (its tail included: values near the largest of the draws, which decide the argmax), no correlation between
    positions or keys, and a row that does not change when drawn again."""
    key = seed_key(11, NOISE_STREAM)
    rows = np.stack([kernel_row(key, p, 1.0, 49152) for p in range(60)]).astype(np.float64)
    x = np.sort(rows.ravel()[::5])
    n = len(x)
    cdf = np.exp(-np.exp(-x))
    assert max((np.arange(1, n + 1) / n - cdf).max(), (cdf - np.arange(n) / n).max()) < 1.63 / np.sqrt(n)
    assert abs(x.mean() - np.euler_gamma) < 0.01 and abs(x.var() - np.pi ** 2 / 6) < 0.02
    tail = (rows > 12.0).mean()  # P(G > 12) = 1 - exp(-exp(-12))
    assert abs(tail / -np.expm1(-np.exp(-12.0)) - 1) < 0.6
    corr = np.corrcoef(rows[:20])
    assert np.abs(corr[~np.eye(20, dtype=bool)]).max() < 0.03
    other = kernel_row(seed_key(12, NOISE_STREAM), 0, 1.0, 49152)
    assert abs(np.corrcoef(other, rows[0])[0, 1]) < 0.03
    assert np.array_equal(kernel_row(key, 3, 1.0, 49152), rows[3].astype(np.float32))


def test_a_requests_noise_comes_from_the_kernel_where_it_runs():
    noise = GumbelNoise(5, 0.7, 1000)
    rows = noise.rows([4, 5])
    assert np.array_equal(rows[0], q4_matmul.reference_gumbel_row(noise.key, 4, 0.7, 1000))
    assert np.array_equal(rows[1], q4_matmul.reference_gumbel_row(noise.key, 5, 0.7, 1000))
