import os

import numpy as np
import pytest

from speccompile.build import build_bundle


def quiet(*_):
    pass


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """Tiny llama target with every drafter kind: lookup, early exit, and a separate draft model."""
    out = str(tmp_path_factory.mktemp("bundles") / "tiny-llama")
    build_bundle("tiny:llama", out, drafts=["lookup", "layerskip:2", "model:tiny:llama-draft"], max_seq_len=256,
                 num_draft=4, progress=quiet)
    return out


@pytest.fixture(scope="session")
def tiny_generator(tiny_bundle):
    import speccompile
    return speccompile.load(tiny_bundle, threads=1)


def random_prompts(n, vocab=384, seed=0):
    rng = np.random.default_rng(seed)
    # repeat a phrase inside some prompts so that prompt lookup finds matches
    out = []
    for i in range(n):
        base = list(rng.integers(3, vocab, 8 + 3 * i))
        out.append(base + base[: 4 + i % 5] if i % 2 else base)
    return out


def assert_lossless(g, drafter, prompts, max_new_tokens, tree=None):
    """Speculative greedy output equals plain greedy output on every prompt; returns the mean accepted tokens
    per prompt (so callers can check the drafter was right at least sometimes)."""
    accepted = []
    for prompt in prompts:
        ref = g.generate(prompt, max_new_tokens, speculate=False)
        res = g.generate(prompt, max_new_tokens, drafter=drafter, tree=tree)
        assert res.token_ids == ref.token_ids, (drafter, tree, prompt)
        accepted.append(res.stats["mean_accepted_tokens"])
    return accepted
