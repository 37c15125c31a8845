"""Mixtral-style MoE (softmax top-k routing) through the same MoE lowering as DeepSeek-V3."""
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from speccompile.compile.driver import build_bundle  # noqa: E402
from speccompile.format.bundle import read_manifest  # noqa: E402
from speccompile.compile.presets import separate_logits, tiny_tokenizer_files  # noqa: E402
from speccompile.runtime.engine import Engine  # noqa: E402

from conftest import assert_lossless, quiet, random_prompts  # noqa: E402


def write_mixtral(d, **overrides):
    cfg = transformers.MixtralConfig(vocab_size=384, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=6,
                                     num_experts_per_tok=2, max_position_embeddings=1024, bos_token_id=1,
                                     eos_token_id=2, **overrides)
    torch.manual_seed(0)
    model = separate_logits(transformers.MixtralForCausalLM(cfg).eval())
    model.save_pretrained(str(d / "ck"))
    for name, data in tiny_tokenizer_files().items():
        (d / "ck" / name).write_bytes(data)
    out = str(d / "b")
    build_bundle(str(d / "ck"), out, drafts=["lookup"], max_seq_len=128, progress=quiet)
    return model, out


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return write_mixtral(tmp_path_factory.mktemp("mixtral"))


def test_logits_match_transformers(mixtral):
    assert_logits_match(*mixtral)


def test_experts_take_the_configured_activation(tmp_path):
    """hidden_act reaches the experts: GELU (tanh) experts, as transformers' MixtralExperts run them."""
    assert_logits_match(*write_mixtral(tmp_path, hidden_act="gelu_pytorch_tanh"))


def assert_logits_match(model, out):
    m = read_manifest(out)
    eng = Engine(out, m["models"]["target"], threads=1, max_rows=16)
    ids = np.random.default_rng(3).integers(0, 384, 18)
    with torch.no_grad():
        ref = model(torch.tensor(ids)[None]).logits[0].numpy()
    logits, _ = eng.forward(ids[:10], rows=np.arange(10))
    assert np.abs(logits - ref[:10]).max() < 1e-4
    eng.cache.truncate(10)
    for t in range(10, 18):
        logits, _ = eng.forward(ids[t:t + 1])
        eng.cache.truncate(t + 1)
        assert np.abs(logits[0] - ref[t]).max() < 1e-4


def test_greedy_lookup_is_lossless(mixtral):
    import speccompile
    g = speccompile.load(mixtral[1], threads=1)
    assert_lossless(g, "lookup", random_prompts(5), 24)


def test_decode_step_reads_only_the_routed_experts(mixtral):
    """A one-token step gathers the matrices of the k experts it routes to (graph/moe.py): inspect's figure (and
    bench's GB/s, from it) once counted every expert, as if a step read them all."""
    import onnx
    from speccompile.format.summary import describe, pass_weight_bytes
    out = mixtral[1]
    m = read_manifest(out)
    t = m["models"]["target"]
    sizes = {n: r["length"] for n, r in m["weights"]["target.bin"].items() if n in t["initializers"]}
    experts = {n: v for n, v in sizes.items() if ".experts." in n}
    graph = onnx.load(os.path.join(out, t["graph"]), load_external_data=False).graph
    assert experts and {(n.op_type, list(n.input).index(name)) for n in graph.node for name in experts
                        if name in n.input} == {("Gather", 0)}  # only ever read by index
    cfg = t["config"]
    routed = sum(experts.values()) * cfg["num_experts_per_tok"] // cfg["n_routed_experts"]
    dense = pass_weight_bytes(m, {**t, "initializers": [n for n in t["initializers"] if n not in experts]}, 0)
    step = pass_weight_bytes(m, t, 0)
    assert step == {k: v + routed for k, v in dense.items()}
    assert f"decode step reads {step['screened'] / 2**20:.1f} MiB" in "\n".join(describe(out, m, True))
