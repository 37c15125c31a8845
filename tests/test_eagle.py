"""EAGLE-1 and EAGLE-3 draft heads in their public safetensors layouts (SafeAILab/EAGLE cnets1.py / cnets.py,
vLLM llama_eagle.py / llama_eagle3.py): the compiled pipeline (target features -> [EAGLE-3 fc] -> head graph)
against a torch reference written here from the public architecture, lossless greedy decoding with each head
(chains and dynamic trees), and load errors."""
import json

import numpy as np
import pytest

from speccompile.compile.driver import build_bundle
from speccompile.format.bundle import read_manifest
from speccompile.format.drafter_kinds import DraftSpec
from speccompile.errors import CheckpointError, ConfigError, SpeccompileError, UnsupportedModelError
from speccompile.compile.sources import load_checkpoint, save_hf_dir

from conftest import assert_lossless, quiet, random_prompts

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

TAPS = [1, 2, 4]  # EAGLE-3's target layers for the 4-layer tiny target; 4 = after the last layer, before the norm
DRAFT_VOCAB = 256  # EAGLE-3's reduced draft vocabulary (of the target's 384)


def _block(cfg, rng, in_width, prefix="layers.0."):
    """One Llama block's tensors, public names; q/k/v read `in_width` features."""
    H, I, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
    mat = lambda o, i: (rng.standard_normal((o, i)) / np.sqrt(i)).astype(np.float32)  # noqa: E731
    return {prefix + "self_attn.q_proj.weight": mat(q, in_width), prefix + "self_attn.k_proj.weight": mat(kv, in_width),
            prefix + "self_attn.v_proj.weight": mat(kv, in_width), prefix + "self_attn.o_proj.weight": mat(H, q),
            prefix + "mlp.gate_proj.weight": mat(I, H), prefix + "mlp.up_proj.weight": mat(I, H),
            prefix + "mlp.down_proj.weight": mat(H, I),
            prefix + "post_attention_layernorm.weight": (1 + 0.1 * rng.standard_normal(H)).astype(np.float32)}


def eagle1_head(target, seed=0, repeat=False):
    """EAGLE-1 (cnets1.py): fc [H, 2H] + bias over [embedding; feature], one block without input_layernorm.
    repeat: fc passes the embedding through and the block adds nothing, so the target's tied head scores the
    input token highest -- a head that repeats its token, often right on a tiny random model's loops."""
    cfg, rng = target.config, np.random.default_rng(seed)
    H = cfg.hidden_size
    t = _block(cfg, rng, H)
    t["fc.weight"] = (rng.standard_normal((H, 2 * H)) / np.sqrt(2 * H)).astype(np.float32)
    t["fc.bias"] = (0.1 * rng.standard_normal(H)).astype(np.float32)
    if repeat:
        t["fc.weight"] = np.concatenate([np.eye(H), np.zeros((H, H))], 1).astype(np.float32)
        t["fc.bias"][:] = 0
        t["layers.0.self_attn.o_proj.weight"][:] = 0
        t["layers.0.mlp.down_proj.weight"][:] = 0
    return t


def eagle3_head(target, seed=1, repeat=False):
    """EAGLE-3 (cnets.py), SafeAILab names: fc [H, 3H], midlayer with input_layernorm + hidden_norm and q/k/v over
    2H, its own norm and lm_head over DRAFT_VOCAB tokens, d2t offsets (and t2d, which loaders ignore).
    repeat: fc picks the target's last layer (tap 4), the block adds nothing and norm/lm_head are the target's
    own, so the head predicts the target's next token again."""
    cfg, rng = target.config, np.random.default_rng(seed)
    H, V = cfg.hidden_size, cfg.vocab_size
    t = _block(cfg, rng, 2 * H, "midlayer.")
    ids = np.sort(rng.choice(V, DRAFT_VOCAB, replace=False))
    t |= {"fc.weight": (rng.standard_normal((H, 3 * H)) / np.sqrt(3 * H)).astype(np.float32),
          "midlayer.input_layernorm.weight": (1 + 0.1 * rng.standard_normal(H)).astype(np.float32),
          "midlayer.hidden_norm.weight": (1 + 0.1 * rng.standard_normal(H)).astype(np.float32),
          "norm.weight": (1 + 0.1 * rng.standard_normal(H)).astype(np.float32),
          "lm_head.weight": rng.standard_normal((DRAFT_VOCAB, H)).astype(np.float32),
          "d2t": (ids - np.arange(DRAFT_VOCAB)).astype(np.int64), "t2d": np.isin(np.arange(V), ids)}
    if repeat:
        t["fc.weight"] = np.concatenate([np.zeros((H, 2 * H)), np.eye(H)], 1).astype(np.float32)
        t["midlayer.self_attn.o_proj.weight"][:] = 0
        t["midlayer.mlp.down_proj.weight"][:] = 0
        t["norm.weight"] = target.tensors["model.norm.weight"]
        t["lm_head.weight"] = target.tensors["model.embed_tokens.weight"][ids]
    return t


def write_head(d, tensors, config=None):
    d.mkdir(parents=True, exist_ok=True)
    safetensors_numpy.save_file(tensors, str(d / "model.safetensors"))
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))
    return d


def eagle3_config(target):
    c = target.config
    return {"architectures": ["LlamaForCausalLMEagle3"], "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size, "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim, "rms_norm_eps": c.rms_norm_eps,
            "rope_theta": c.rope_theta, "num_hidden_layers": 1, "vocab_size": c.vocab_size,
            "draft_vocab_size": DRAFT_VOCAB, "eagle_aux_hidden_state_layer_ids": TAPS}


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    """Bundles of the tiny llama target, each with an EAGLE-1 and an EAGLE-3 head: random heads (int8, the default,
    and float32), and heads that repeat their token."""
    d = tmp_path_factory.mktemp("eagle")
    target = load_checkpoint("tiny:llama")
    out = {}
    for kind, precision in (("random", "int8"), ("random-float32", "float32"), ("repeat", "int8")):
        rep = kind == "repeat"
        e1 = write_head(d / f"{kind}-e1", eagle1_head(target, repeat=rep))
        e3 = write_head(d / f"{kind}-e3", eagle3_head(target, repeat=rep), eagle3_config(target))
        build_bundle("tiny:llama", str(d / kind), drafts=[f"eagle:{e1}", f"eagle3:{e3}"], max_seq_len=256,
                     num_draft=4, draft_precision=precision, progress=quiet)
        out[kind] = str(d / kind)
    out["target"] = target
    out["random_heads"] = (eagle1_head(target), eagle3_head(target))
    out["dir"] = d
    return out


# ---- the torch reference, written from the public architecture ---------------------------------------------------
def _llama_parts(cfg):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRotaryEmbedding
    lc = LlamaConfig(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, num_hidden_layers=1,
                     num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
                     head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
                     vocab_size=cfg.vocab_size)
    lc._attn_implementation = "eager"
    return lc, LlamaAttention(lc, 0).eval(), LlamaMLP(lc).eval(), LlamaRotaryEmbedding(lc)


def torch_eagle_reference(version, cfg, target_tensors, head, features, tokens, positions):
    """(logits, output features) of an EAGLE head over pairs (features[i], tokens[i]); features are already in
    the head's space (EAGLE-1: the target's normed output or the head's own; EAGLE-3: after fc)."""
    lc, attn, mlp, rope = _llama_parts(cfg)
    t = {k: torch.tensor(v) for k, v in head.items() if k not in ("d2t", "t2d")}
    p = "layers.0." if version == "eagle" else "midlayer."
    if version == "eagle3":  # q/k/v read [input_layernorm(embedding); hidden_norm(feature)]
        for x in "qkv":
            rows = t[p + f"self_attn.{x}_proj.weight"].shape[0]
            setattr(attn, f"{x}_proj", torch.nn.Linear(2 * cfg.hidden_size, rows, bias=False))
    attn.load_state_dict({k[len(p + "self_attn."):]: v for k, v in t.items() if k.startswith(p + "self_attn.")})
    mlp.load_state_dict({k[len(p + "mlp."):]: v for k, v in t.items() if k.startswith(p + "mlp.")})

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * w

    emb = torch.tensor(target_tensors["model.embed_tokens.weight"])
    e = emb[torch.tensor(tokens)][None]
    f = torch.tensor(features)[None]
    pos = torch.tensor(positions)[None]
    S = len(tokens)
    mask = torch.full((S, S), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        if version == "eagle":
            z = torch.cat([e, f], -1) @ t["fc.weight"].T + t["fc.bias"]
            residual, x = z, z  # no input_layernorm on EAGLE-1's first layer
        else:
            residual = f
            x = torch.cat([rms(e, t[p + "input_layernorm.weight"]), rms(f, t[p + "hidden_norm.weight"])], -1)
        a = attn(x, position_embeddings=rope(f, pos), attention_mask=mask)[0]
        h = residual + a
        h = h + mlp(rms(h, t[p + "post_attention_layernorm.weight"]))
        logits = h @ emb.T if version == "eagle" else rms(h, t["norm.weight"]) @ t["lm_head.weight"].T
    return logits[0].numpy(), h[0].numpy()


def target_features(target, tmp_path, tokens):
    """The target's features from transformers: every layer's input, the pre-norm output and the normed output."""
    save_hf_dir(target, str(tmp_path / "hf"))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    seen = {}
    model.model.norm.register_forward_hook(lambda mod, inp, out: seen.update(prenorm=inp[0]))  # returns None
    with torch.no_grad():
        out = model(torch.tensor(tokens)[None], output_hidden_states=True)
    hs = [h[0].numpy() for h in out.hidden_states]  # hs[i]: input of layer i; hs[L]: after the final norm
    L = target.config.num_hidden_layers
    return {**{i: hs[i] for i in range(L)}, L: seen["prenorm"][0].numpy(), "norm": hs[L]}


@pytest.mark.parametrize("precision", ["float32", "int8"])
@pytest.mark.parametrize("version", ["eagle", "eagle3"])
def test_eagle_pipeline_matches_torch(heads, version, precision, tmp_path):
    """Target features -> drafter (EAGLE-3: fc graph) -> head graph, against the reference: a prefill of pairs,
    then one drafted step on the head's own output feature over its KV cache. float32: to rounding; int8 (the
    default): int8 weights and activations, logits within a few percent of their range, nearly the same winners."""
    import speccompile
    target = heads["target"]
    head = heads["random_heads"][version == "eagle3"]
    bundle = heads["random-float32" if precision == "float32" else "random"]
    weights = read_manifest(bundle)["weights"][f"{version}.bin"]
    assert any(k.endswith(".int8") for k in weights) == (precision == "int8")
    g = speccompile.load(bundle, threads=1)
    dr = g.drafters[version]
    S = 12
    tokens = np.random.default_rng(3).integers(3, 384, S)
    ref_f = target_features(target, tmp_path, tokens)
    feat = ref_f["norm"] if version == "eagle" else np.concatenate([ref_f[i] for i in TAPS], -1) @ head["fc.weight"].T
    # our features: the target graph's aux_hidden_states, through the drafter
    g.target.cache.truncate(0)
    g.target.forward(tokens, rows=np.arange(S))
    dr.reset()
    dr.observe(0, dr.features(g.target, slice(0, S)))
    assert np.abs(dr.h[:S] - feat).max() < 1e-4
    # the head over the pairs (f_t, x_{t+1}), then one more token on its own last output
    eng = dr.engine
    eng.cache.truncate(0)
    pos = np.arange(S - 1)
    logits, nxt = eng.forward(tokens[1:], positions=pos, rows=np.arange(S - 1), hidden_in=dr.h[:S - 1])
    logits, nxt = logits.copy(), nxt.copy()
    out = eng.hidden[:S - 1].copy()
    eng.cache.truncate(S - 1)
    y = 77
    last, last_nxt = eng.forward(np.array([y]), positions=np.array([S - 1]), hidden_in=out[-1:])
    ref_logits, ref_out = torch_eagle_reference(version, target.config, target.tensors, head,
                                                np.concatenate([feat[:S - 1], out[-1:]]),
                                                np.concatenate([tokens[1:], [y]]), np.arange(S))
    d2t = (np.arange(DRAFT_VOCAB) + head["d2t"]) if version == "eagle3" else np.arange(384)
    if precision == "float32":
        assert np.abs(logits - ref_logits[:-1]).max() < 1e-4
        assert np.abs(out - ref_out[:-1]).max() < 1e-4
        assert np.abs(last[0] - ref_logits[-1]).max() < 1e-4
        assert (nxt == d2t[ref_logits[:-1].argmax(-1)]).all() and last_nxt[0] == d2t[ref_logits[-1].argmax()]
    else:
        assert np.abs(logits - ref_logits[:-1]).max() < 0.05 * np.abs(ref_logits).max()
        assert np.abs(out - ref_out[:-1]).max() < 0.05 * np.abs(ref_out).max()
        # where the winners differ, ours is a near-tie in the reference's logits (a random head has many)
        picked = ref_logits[np.arange(S - 1), np.searchsorted(d2t, nxt)]
        assert (ref_logits[:-1].max(-1) - picked).max() < 0.05 * np.abs(ref_logits).max()


@pytest.mark.parametrize("version,tree", [("eagle", None), ("eagle", "dynamic:10"), ("eagle3", None),
                                          ("eagle3", "dynamic:10"), ("eagle3", "chain:3")])
def test_greedy_with_eagle_equals_autoregressive(heads, version, tree):
    import speccompile
    g = speccompile.load(heads["repeat"], threads=1)
    assert max(assert_lossless(g, version, random_prompts(8), 32, tree)) > 1.0
    g = speccompile.load(heads["random"], threads=1)  # a head that is (nearly) always wrong: still lossless
    assert_lossless(g, version, random_prompts(2), 16, tree)


@pytest.mark.parametrize("setting,value", [("head_dim", "x"), ("rms_norm_eps", "abc"), ("num_attention_heads", [4]),
                                           ("transformer_layer_config", "x"), ("eagle_config", "x")])
def test_head_config_values_of_the_wrong_type(heads, tmp_path, setting, value):
    """A head config.json value of the wrong type is a ConfigError naming it (was: ValueError, TypeError,
    AttributeError out of the build)."""
    target = heads["target"]
    for version, tensors in (("eagle", eagle1_head(target)), ("eagle3", eagle3_head(target))):
        config = {**eagle3_config(target), setting: value}
        with pytest.raises(ConfigError, match=setting):
            build_bundle("tiny:llama", str(tmp_path / "o"), progress=quiet,
                         drafts=[f"{version}:{write_head(tmp_path / version, tensors, config)}"])


def test_eagle_head_errors(heads, tmp_path):
    target = heads["target"]
    build = lambda spec: build_bundle("tiny:llama", str(tmp_path / "o"), drafts=[spec], progress=quiet)  # noqa: E731
    (tmp_path / "head.pt").write_bytes(b"\x80\x04")
    for kind in ("eagle", "eagle3"):
        with pytest.raises(CheckpointError, match="pickle.*safetensors"):
            build(f"{kind}:{tmp_path / 'head.pt'}")
    (tmp_path / "pt").mkdir()
    (tmp_path / "pt" / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="pickle"):
        build(f"eagle3:{tmp_path / 'pt'}")
    e1 = eagle1_head(target)
    del e1["layers.0.self_attn.k_proj.weight"]
    with pytest.raises(CheckpointError, match="missing tensor 'layers.0.self_attn.k_proj.weight'"):
        build(f"eagle:{write_head(tmp_path / 'e1', e1)}")
    breakages = [(lambda h: h.update({"fc.weight": h["fc.weight"][:, :128]}),
                  r"'fc.weight' has shape \(64, 128\), expected \(64, 192\)"),
                 (lambda h: h.pop("d2t"), "d2t"),
                 (lambda h: h.pop("midlayer.hidden_norm.weight"), "hidden_norm")]
    for i, (break_head, message) in enumerate(breakages):
        e3 = eagle3_head(target)
        break_head(e3)
        with pytest.raises(CheckpointError, match=message):
            build(f"eagle3:{write_head(tmp_path / f'e3{i}', e3, eagle3_config(target))}")
    # the default layers (2, L//2, L-3) are not three distinct layers of a 4-layer target
    with pytest.raises(UnsupportedModelError, match="eagle_aux_hidden_state_layer_ids"):
        build(f"eagle3:{write_head(tmp_path / 'e3d', eagle3_head(target))}")
    with pytest.raises(CheckpointError, match="not found"):
        build(f"eagle:{tmp_path / 'nothing'}")
    e3 = eagle3_head(target)  # a draft vocabulary of no tokens
    e3 |= {"lm_head.weight": e3["lm_head.weight"][:0], "d2t": e3["d2t"][:0]}
    with pytest.raises(CheckpointError, match="'lm_head.weight' has no rows"):
        build(f"eagle3:{write_head(tmp_path / 'e3v', e3, eagle3_config(target))}")
    with pytest.raises(SpeccompileError, match="eagle3 needs"):
        DraftSpec.parse("eagle3")
    assert not (tmp_path / "o").exists()


def test_eagle3_reads_the_conventional_layers_where_its_config_names_none():
    """SafeAILab's and vLLM's default: target layers 2, L // 2 and L - 3 (the tiny targets of the tests above are
    too shallow for it, so they name their layers)."""
    from types import SimpleNamespace

    from speccompile.compile.drafters.eagle import aux_layers
    target = SimpleNamespace(num_hidden_layers=32)
    assert aux_layers("eagle3", {}, target) == [2, 16, 29]
    assert aux_layers("eagle3", {"eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 5, 9]}}, target) == [1, 5, 9]
    assert aux_layers("eagle", {}, target) == ["norm"]
