"""Whether this machine computes a one-token step as it computes the same token inside a longer step.

Speculation is exact only if a verify pass gives each row the numbers a plain step gives that token. The graphs
see to it for attention (plugins/tree_attention: onnxruntime's runs every step over two rows or more; speccompile's
own kernel computes every row alike), but a product kernel may
also take another path for a single row: onnxruntime's 4-bit MatMulNBits does on some CPUs (a one-row kernel
whose sums round differently from the many-row one's), and where the product rounds its input to int8 such a
last-bit difference can turn into another token. Which CPUs do is the kernel library's business, so it is measured
here, on the loaded graph: a one-token step against the same token as the first row of a two-token step. Where
they differ, the engine runs every one-token step with a pad row (Engine.min_rows = 2), which costs a plain step
about what a two-row pass costs and makes it the same computation as a verify row.
"""
from __future__ import annotations

import numpy as np

PROBE_TOKEN = 1  # any id: a kernel's path depends on the shapes, not on the values


def one_row_matches(engine) -> bool:
    """Run the probe at the start of `engine`'s cache (which it leaves empty): True when a one-token step's logits
    and hidden state equal, bit for bit, those of the same token as the first of two."""
    cache, saved = engine.cache, engine.min_rows
    try:
        engine.min_rows = 1
        cache.truncate(0)
        logits, _ = engine.forward(np.array([PROBE_TOKEN], np.int64))
        one = (logits[0].copy(), engine.hidden[0].copy())
        cache.truncate(0)
        logits, _ = engine.forward(np.array([PROBE_TOKEN, PROBE_TOKEN], np.int64), rows=np.array([0]))
        return np.array_equal(one[0], logits[0]) and np.array_equal(one[1], engine.hidden[0])
    finally:
        engine.min_rows = saved
        cache.truncate(0)
        engine.passes = engine.tokens_run = 0


def match_rows(engine) -> int:
    """Set and return the engine's min_rows: 2 where one row takes another kernel than several, else 1."""
    engine.min_rows = 1 if one_row_matches(engine) else 2
    return engine.min_rows
