"""Every compiled graph against transformers (torch) on tiny random-weight models of each architecture.

Tolerance: max |logit difference| <= 1e-4 with logits of magnitude ~30-50 (float32; observed ~2e-5).
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from speccompile.compile.driver import build_bundle  # noqa: E402
from speccompile.format.bundle import read_manifest  # noqa: E402
from speccompile.runtime.engine import Engine  # noqa: E402
from speccompile.compile.sources import load_checkpoint, save_hf_dir  # noqa: E402

from conftest import quiet  # noqa: E402

TOL = 1e-4


def hf_model(preset, tmp_path, num_layers=None):
    ck = load_checkpoint(f"tiny:{preset}")
    d = tmp_path / f"hf-{preset}"
    save_hf_dir(ck, str(d))
    kw = {} if num_layers is None else {"num_hidden_layers": num_layers}
    return transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32, **kw).eval()


@pytest.mark.parametrize("preset", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("attention", ["ort", "reference"])
def test_decoder_logits_match_transformers(preset, attention, tmp_path):
    out = str(tmp_path / "b")
    build_bundle(f"tiny:{preset}", out, drafts=["layerskip:1"], max_seq_len=64, attention=attention,
                 fused=attention == "ort", progress=quiet)
    m = read_manifest(out)
    ids = np.random.default_rng(0).integers(0, 384, 24)
    for name, layers in (("target", None), ("early_exit_1", 1)):
        ref_model = hf_model(preset, tmp_path, layers)
        with torch.no_grad():
            ref = ref_model(torch.tensor(ids)[None]).logits[0].numpy()
        eng = Engine(out, m["models"][name], threads=1, max_rows=16)
        logits, argmax = eng.forward(ids[:16], rows=np.arange(16))  # prefill block, every row
        assert np.abs(logits - ref[:16]).max() < TOL
        assert (argmax == ref[:16].argmax(-1)).all()
        eng.cache.truncate(16)
        for t in range(16, 24):  # then one token at a time over the static cache
            logits, _ = eng.forward(ids[t:t + 1])
            eng.cache.truncate(t + 1)
            assert np.abs(logits[0] - ref[t]).max() < TOL, (name, t)


def random_parents(rng, n):
    return np.array([-1] + [int(rng.integers(0, i)) for i in range(1, n)])


@pytest.mark.parametrize("prompt_len,parents", [(12, np.array([-1, 0, 0, 1, 1, 2, 3, 6])),
                                                (0, random_parents(np.random.default_rng(1), 64))])
def test_tree_step_matches_each_path(tiny_bundle, prompt_len, parents):
    """A tree of tokens verified in one pass gives each node the logits of its own root-to-node path. With no
    prompt, 64 nodes fill the bias the runtime passes (64 wide): the step's rows are all the kernel sees."""
    m = read_manifest(tiny_bundle)
    eng = Engine(tiny_bundle, m["models"]["target"], threads=1, max_rows=len(parents))
    rng = np.random.default_rng(5)
    prompt = rng.integers(3, 384, prompt_len)
    nodes = rng.integers(3, 384, len(parents))
    depth = np.zeros(len(parents), np.int64)
    for i, p in enumerate(parents):
        depth[i] = 0 if p < 0 else depth[p] + 1
    if prompt_len:
        eng.forward(prompt)
    eng.cache.truncate(len(prompt))
    tree_logits, _ = eng.forward(nodes, positions=len(prompt) + depth, parents=parents, rows=np.arange(len(nodes)))
    tree_logits = tree_logits.copy()
    for i in range(len(nodes)):
        path = [i]
        while parents[path[-1]] >= 0:
            path.append(parents[path[-1]])
        path = path[::-1]
        eng.cache.truncate(len(prompt))
        chain_logits, _ = eng.forward(nodes[path])
        assert np.abs(chain_logits[0] - tree_logits[i]).max() < TOL, i
