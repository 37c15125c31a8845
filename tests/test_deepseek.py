"""DeepSeek-V3 architecture: multi-head latent attention over a latent cache, routed MoE with group-limited
top-k, and its MTP module drafting — against transformers' DeepseekV3ForCausalLM on tiny random checkpoints."""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from speccompile.compile.driver import build_bundle  # noqa: E402
from speccompile.format.bundle import read_manifest  # noqa: E402
from speccompile.graphs import cache_slots  # noqa: E402
from speccompile.errors import CheckpointError  # noqa: E402
from speccompile.compile.presets import tiny_deepseek_checkpoint as make_checkpoint  # noqa: E402
from speccompile.runtime.engine import Engine  # noqa: E402
from speccompile.runtime.sessions import open_session  # noqa: E402

from conftest import assert_lossless, quiet, random_prompts  # noqa: E402

TOL = 1e-4


@pytest.mark.parametrize("q_lora_rank,mla_cache", [(None, "latent"), (24, "latent"), (None, "expanded")])
def test_logits_match_transformers(tmp_path, q_lora_rank, mla_cache):
    ref_model = make_checkpoint(str(tmp_path / "ck"), q_lora_rank)
    out = str(tmp_path / "b")
    build_bundle(str(tmp_path / "ck"), out, drafts=["none"], max_seq_len=64, mla_cache=mla_cache, progress=quiet)
    kv = read_manifest(out)["models"]["target"]["kv_cache"]
    # latent: one [k_rope (16); c_kv (32)] row per token; expanded: 4 heads of [k_nope (16); k_rope (16)]
    assert (kv["num_kv_heads"], kv["head_dim"]) == ((1, 48) if mla_cache == "latent" else (4, 32))
    assert_logits_match(ref_model, out)


def test_config_without_rope_interleave_is_interleaved(tmp_path):
    """DeepSeek-V3's hub config.json has no rope_interleave: transformers' default, true, applies."""
    ref_model = make_checkpoint(str(tmp_path / "ck"), 24)
    config = tmp_path / "ck" / "config.json"
    config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "rope_interleave"}))
    build_bundle(str(tmp_path / "ck"), str(tmp_path / "b"), drafts=["none"], max_seq_len=64, progress=quiet)
    assert_logits_match(ref_model, str(tmp_path / "b"))


@pytest.mark.parametrize("mla_cache", ["latent", "expanded"])
def test_rope_not_interleaved_matches_transformers(tmp_path, mla_cache):
    """rope_interleave: false rotates the rope parts' halves, not their pairs (the tests above all interleave)."""
    ref_model = make_checkpoint(str(tmp_path / "ck"), 24, rope_interleave=False)
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["rope_interleave"] is False
    build_bundle(str(tmp_path / "ck"), str(tmp_path / "b"), drafts=["none"], max_seq_len=64, mla_cache=mla_cache,
                 progress=quiet)
    assert_logits_match(ref_model, str(tmp_path / "b"))


@pytest.mark.parametrize("q_lora_rank,mla_cache", [(24, "latent"), (None, "expanded")])
def test_attention_bias_matches_transformers(tmp_path, q_lora_rank, mla_cache):
    """attention_bias: true biases q_a_proj (where q is low-rank), kv_a_proj_with_mqa and o_proj."""
    ref_model = make_checkpoint(str(tmp_path / "ck"), q_lora_rank, attention_bias=True)
    out = str(tmp_path / "b")
    build_bundle(str(tmp_path / "ck"), out, drafts=["none"], max_seq_len=64, mla_cache=mla_cache, progress=quiet)
    assert_logits_match(ref_model, out)


def assert_logits_match(ref_model, out):
    """Logits at every position of a prompt against transformers', prefilled then one token at a time."""
    eng = Engine(out, read_manifest(out)["models"]["target"], threads=1, max_rows=16)
    ids = np.random.default_rng(1).integers(0, 384, 20)
    with torch.no_grad():
        ref = ref_model(torch.tensor(ids)[None]).logits[0].numpy()
    logits, _ = eng.forward(ids[:12], rows=np.arange(12))
    assert np.abs(logits - ref[:12]).max() < TOL
    eng.cache.truncate(12)
    for t in range(12, 20):
        logits, _ = eng.forward(ids[t:t + 1])
        eng.cache.truncate(t + 1)
        assert np.abs(logits[0] - ref[t]).max() < TOL


def test_experts_chosen_match_reference(tmp_path):
    """The graph's routing (expert indices per token, per MoE layer) equals transformers' router's."""
    import onnx
    import onnxruntime as ort
    ref_model = make_checkpoint(str(tmp_path / "ck"))
    out = str(tmp_path / "b")
    build_bundle(str(tmp_path / "ck"), out, drafts=["none"], max_seq_len=64, progress=quiet)
    model = onnx.load(os.path.join(out, "target.onnx"), load_external_data=False)
    topk_outputs = [o for n in model.graph.node for o in n.output if o.endswith("expert_index")]
    assert len(topk_outputs) == 2  # the two MoE layers
    for name in topk_outputs:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT64, None))
    m = read_manifest(out, verify_hashes=False)  # before the patched graph joins the bundle, unlisted
    patched = os.path.join(out, "routing.onnx")
    onnx.save(model, patched)
    kv = m["models"]["target"]["kv_cache"]
    ids = np.random.default_rng(2).integers(0, 384, 10)
    S, L = len(ids), 64
    feeds = {"input_ids": ids[None], "position_ids": np.arange(S)[None], "seqlens_k": np.array([S - 1], np.int32),
             "attention_bias": np.where(np.tril(np.ones((S, L), bool)), 0, -np.inf)[None, None].astype(np.float32),
             "logits_index": np.array([S - 1])}
    for i in range(3):
        for kind in ("key", "value"):
            feeds[f"past_{kind}.{i}"] = np.zeros((1, kv["num_kv_heads"], cache_slots(kv), kv["head_dim"]), np.float32)
    sess = open_session(patched, ort.SessionOptions(), ["CPUExecutionProvider"])  # with speccompile's kernels
    got = sess.run(topk_outputs, feeds)
    chosen = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda mod, a, o: chosen.append(o[2].numpy()))
             for layer in ref_model.model.layers if hasattr(layer.mlp, "gate")]
    with torch.no_grad():
        ref_model(torch.tensor(ids)[None])
    for h in hooks:
        h.remove()
    for mine, theirs in zip(got, chosen):
        assert [set(r) for r in mine.tolist()] == [set(r) for r in theirs.tolist()]


@pytest.mark.parametrize("tree", [None, "dynamic:8"])
def test_mtp_drafting_is_lossless(tmp_path, tree):
    make_checkpoint(str(tmp_path / "ck"), with_mtp=True)
    out = str(tmp_path / "b")
    build_bundle(str(tmp_path / "ck"), out, drafts=[f"mtp:{tmp_path / 'ck'}"], max_seq_len=128, progress=quiet)
    import speccompile
    g = speccompile.load(out, threads=1)
    assert max(assert_lossless(g, "mtp", random_prompts(6), 32, tree)) > 1.0


def test_mtp_layer_logits_match_reference(tmp_path):
    """The MTP head's logits against transformers' own layer on eh_proj([enorm(embed(x)); hnorm(h)]), then
    shared_head.norm and the target's head. The drafting tests pass with any head that repeats tokens (the preset's
    MTP layer does, its block's outputs zeroed): a random block here, and norms that differ from each other."""
    from safetensors.numpy import load_file, save_file
    ck = str(tmp_path / "ck")
    model = make_checkpoint(ck, with_mtp=True)
    L, H = model.config.num_hidden_layers, model.config.hidden_size
    p = f"model.layers.{L}."
    rng = np.random.default_rng(5)
    last = load_file(os.path.join(ck, "model-00001-of-00002.safetensors"))
    mtp = {k.replace(f"layers.{L - 1}.", f"layers.{L}."): v for k, v in last.items() if f"layers.{L - 1}." in k}
    mtp |= {p + n: (1 + 0.2 * rng.standard_normal(H)).astype(np.float32)
            for n in ("enorm.weight", "hnorm.weight", "shared_head.norm.weight")}
    mtp[p + "eh_proj.weight"] = (rng.standard_normal((H, 2 * H)) / (2 * H) ** 0.5).astype(np.float32)
    mtp[p + "shared_head.head.weight"] = model.lm_head.weight.detach().numpy()
    save_file(mtp, os.path.join(ck, "model-00002-of-00002.safetensors"))
    out = str(tmp_path / "b")
    build_bundle(ck, out, drafts=[f"mtp:{ck}"], max_seq_len=64, progress=quiet)
    eng = Engine(out, read_manifest(out)["models"]["mtp_head"], threads=1, max_rows=16)
    ids, hidden = rng.integers(3, 384, 10), 3 * rng.standard_normal((10, H)).astype(np.float32)
    logits, _ = eng.forward(ids, positions=np.arange(1, 11), hidden_in=hidden, rows=np.arange(10))
    ref_logits, ref_hidden = _reference_mtp(model, mtp, p, ids, hidden)
    assert np.abs(logits - ref_logits).max() < TOL
    # what it reads at the next depth: its output after shared_head.norm, as it reads the target's after its norm
    assert np.abs(eng.hidden[:10] - ref_hidden).max() < TOL
    import speccompile
    gen = speccompile.load(out, threads=1)
    mtp_drafter = gen.drafters[read_manifest(out)["drafters"][0]["name"]]
    gen.target.forward(ids, positions=np.arange(10), rows=np.arange(10))
    with torch.no_grad():
        normed = model.model(torch.tensor(ids)[None]).last_hidden_state[0].numpy()  # after the final norm
    assert np.abs(mtp_drafter.features(gen.target, np.arange(10)) - normed).max() < TOL


def _reference_mtp(model, mtp, p, ids, hidden):
    """transformers' decoder (one layer: the MTP block, its final norm: shared_head.norm) on the MTP input: its
    logits and its output after that norm."""
    cfg = transformers.DeepseekV3Config(**model.config.to_dict() | dict(num_hidden_layers=1, first_k_dense_replace=0))
    block = transformers.DeepseekV3Model(cfg).eval()
    block.layers[0].load_state_dict(model.model.layers[-1].state_dict())  # the MTP block: a copy of the last layer
    block.norm.weight.data = torch.tensor(mtp[p + "shared_head.norm.weight"])

    def rms(x, w):
        return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + cfg.rms_norm_eps) * w
    embedded = model.model.embed_tokens.weight.detach().numpy()[ids]
    z = np.concatenate([rms(embedded, mtp[p + "enorm.weight"]), rms(hidden, mtp[p + "hnorm.weight"])], -1)
    with torch.no_grad():
        out = block(inputs_embeds=torch.tensor(z @ mtp[p + "eh_proj.weight"].T)[None],
                    position_ids=torch.arange(1, len(ids) + 1)[None]).last_hidden_state[0]
        return model.lm_head(out).numpy(), out.numpy()


@pytest.mark.parametrize("mla_cache", ["latent", "expanded"])
def test_quantized_weights_build_and_stay_lossless(tmp_path, mla_cache):
    """--weights int8 packs the attention's output matrix too; MLA once multiplied by the float name it no longer
    had (an internal error at build)."""
    make_checkpoint(str(tmp_path / "ck"))
    out = str(tmp_path / "b")
    build_bundle(str(tmp_path / "ck"), out, drafts=["lookup"], max_seq_len=64, weights="int8", mla_cache=mla_cache,
                 progress=quiet)
    import speccompile
    assert max(assert_lossless(speccompile.load(out, threads=1), "lookup", random_prompts(3), 16)) >= 1.0


def test_missing_or_misshapen_expert(tmp_path):
    make_checkpoint(str(tmp_path / "ck"))
    st = str(tmp_path / "ck" / "model.safetensors")
    from safetensors.numpy import load_file, save_file
    tensors = load_file(st)
    bad = dict(tensors)
    del bad["model.layers.2.mlp.experts.5.up_proj.weight"]
    save_file(bad, st)
    with pytest.raises(CheckpointError, match="experts.5.up_proj"):
        build_bundle(str(tmp_path / "ck"), str(tmp_path / "b"), drafts=["none"], max_seq_len=64, progress=quiet)
    bad = dict(tensors)
    bad["model.layers.1.mlp.experts.3.down_proj.weight"] = np.zeros((64, 31), np.float32)
    save_file(bad, st)
    with pytest.raises(CheckpointError, match="experts.3.down_proj.weight.*shape"):
        build_bundle(str(tmp_path / "ck"), str(tmp_path / "b"), drafts=["none"], max_seq_len=64, progress=quiet)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("q_lora_rank,overrides", [
    (None, dict(norm_topk_prob=False, routed_scaling_factor=1.0, first_k_dense_replace=0, n_shared_experts=2,
                qk_nope_head_dim=24, qk_rope_head_dim=8, v_head_dim=12, tie_word_embeddings=True)),
    (20, dict(n_routed_experts=16, n_group=8, topk_group=3, num_experts_per_tok=3, n_shared_experts=0,
              first_k_dense_replace=2, qk_nope_head_dim=8, qk_rope_head_dim=24, v_head_dim=40)),
    (None, dict(norm_topk_prob=False, routed_scaling_factor=2.5))])
def test_routing_and_head_sizes_match_transformers(tmp_path, q_lora_rank, overrides):
    """Routing without renormalisation or scale, every layer or the last only MoE, no or two shared experts,
    finer groups, and rope / nope / v head sizes all different. Scaled but not renormalised: the scale applied
    once, and not where a renormalisation would cancel it."""
    ref_model = make_checkpoint(str(tmp_path / "ck"), q_lora_rank, **overrides)
    build_bundle(str(tmp_path / "ck"), str(tmp_path / "b"), drafts=["none"], max_seq_len=64, progress=quiet)
    assert_logits_match(ref_model, str(tmp_path / "b"))


def test_expanded_cache_with_a_value_head_wider_than_the_key_is_refused(tmp_path):
    """The expanded cache holds V in K's head size (qk_nope + qk_rope): a wider v_head_dim built a graph whose
    every generation failed inside onnxruntime. Refused at build, naming the latent cache, which serves it."""
    from speccompile.errors import UnsupportedModelError
    sizes = dict(qk_nope_head_dim=8, qk_rope_head_dim=24, v_head_dim=40)
    ref_model = make_checkpoint(str(tmp_path / "ck"), **sizes)
    with pytest.raises(UnsupportedModelError, match=r"v_head_dim 40 exceeds .* = 32; build with the latent cache"):
        build_bundle(str(tmp_path / "ck"), str(tmp_path / "e"), drafts=["none"], max_seq_len=64,
                     mla_cache="expanded", progress=quiet)
    assert not (tmp_path / "e").exists()
    build_bundle(str(tmp_path / "ck"), str(tmp_path / "b"), drafts=["none"], max_seq_len=64, progress=quiet)
    assert_logits_match(ref_model, str(tmp_path / "b"))


def test_misshapen_norm_or_output_head_refused_at_build(tmp_path):
    """Each norm's length and the output head's shape are checked when the weights are lowered: one of another
    size built a bundle that failed inside onnxruntime at every generation (or, of length 1, broadcast and
    generated garbage). The MTP layer's norms too, named as the checkpoint names them."""
    from safetensors.numpy import load_file, save_file
    ck = tmp_path / "ck"
    make_checkpoint(str(ck), 24, with_mtp=True)
    shards = {p: load_file(str(p)) for p in ck.glob("*.safetensors")}
    bad = {"model.layers.1.self_attn.kv_a_layernorm.weight": (31,), "model.layers.0.input_layernorm.weight": (1,),
           "model.layers.2.self_attn.q_a_layernorm.weight": (2,), "lm_head.weight": (383, 64),
           "model.layers.3.post_attention_layernorm.weight": (63,)}
    for name, shape in bad.items():
        path, tensors = next((p, t) for p, t in shards.items() if name in t)
        save_file(tensors | {name: np.ones(shape, np.float32)}, str(path))
        with pytest.raises(CheckpointError, match=rf"{name}' has shape \({shape[0]},"):
            build_bundle(str(ck), str(tmp_path / "b"), drafts=[f"mtp:{ck}"], max_seq_len=64, progress=quiet)
        save_file(tensors, str(path))
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("edit,words", [
    (dict(num_experts_per_tok=5), "num_experts_per_tok = 5 exceeds the 4 experts"),
    (dict(n_group=3), "n_routed_experts = 8 is not a multiple of n_group = 3"),
    (dict(topk_method="greedy"), "topk_method = 'greedy'"),
    (dict(scoring_func="softmax"), "scoring_func = 'softmax'"),
    (dict(moe_layer_freq=2), "moe_layer_freq = 2")])
def test_routing_it_does_not_lower_is_refused_before_the_weights(tmp_path, edit, words):
    """More experts per token than the kept groups hold (the top-k then takes masked experts, in no defined order;
    it built and disagreed with transformers), experts not in whole groups, and DeepSeek's own routing keys set
    to what is not lowered (they were ignored): one error line from config.json, before any weight is read."""
    from test_errors import assert_cli_error, cli
    ck = tmp_path / "ck"
    make_checkpoint(str(ck))
    config = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps(config | edit))
    for weights in ck.glob("*.safetensors"):  # refused from the config alone
        weights.unlink()
    assert_cli_error(cli("build", ck, "--out", tmp_path / "b", "--draft", "none"), words)


@pytest.mark.parametrize("missing", ["mlp.gate.weight", "self_attn.kv_b_proj.weight"])
def test_partial_mtp_layer_names_the_checkpoints_tensor(tmp_path, missing):
    """A DeepSeek MTP layer missing a tensor is one error naming it as the checkpoint does (layer
    num_hidden_layers), not by an internal name; without its router it is still the MoE block it is (it was read as
    a dense MLP, and the error named a gate_proj the layer never had)."""
    from safetensors.numpy import load_file, save_file
    ck = tmp_path / "ck"
    make_checkpoint(str(ck), with_mtp=True)
    shard = ck / "model-00002-of-00002.safetensors"
    tensors = load_file(str(shard))
    del tensors[f"model.layers.3.{missing}"]
    save_file(tensors, str(shard))
    index = json.loads((ck / "model.safetensors.index.json").read_text())
    del index["weight_map"][f"model.layers.3.{missing}"]
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"missing tensor 'model\.layers\.3\.{missing}'"):
        build_bundle(str(ck), str(tmp_path / "b"), drafts=[f"mtp:{ck}"], max_seq_len=64, progress=quiet)
