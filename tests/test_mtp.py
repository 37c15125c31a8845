"""MTP draft heads: the head graph against a torch reference, lossless decoding with the head (chains and trees),
DeepSeek-V3-format MTP layers, and the pickle refusal."""
import json

import numpy as np
import pytest

from speccompile.compile.driver import build_bundle
from speccompile.format.bundle import read_manifest
from speccompile.errors import CheckpointError, SpeccompileError
from speccompile.compile.presets import tiny_mtp_head
from speccompile.runtime.engine import Engine
from speccompile.runtime.sessions import open_session
from speccompile.compile.sources import load_checkpoint, save_hf_dir

from conftest import assert_lossless, quiet, random_prompts

torch = pytest.importorskip("torch")
safetensors_numpy = pytest.importorskip("safetensors.numpy")


@pytest.fixture(scope="module")
def mtp_bundle(tmp_path_factory):
    d = tmp_path_factory.mktemp("mtp")
    cfg = load_checkpoint("tiny:llama").config
    head = tiny_mtp_head(cfg)
    safetensors_numpy.save_file(head, str(d / "head.safetensors"))
    out = str(d / "bundle")
    build_bundle("tiny:llama", out, drafts=[f"mtp:{d / 'head.safetensors'}"], max_seq_len=256, num_draft=4,
                 progress=quiet)
    safetensors_numpy.save_file(tiny_mtp_head(cfg, repeat_last=True), str(d / "repeat.safetensors"))
    repeat = str(d / "repeat-bundle")
    build_bundle("tiny:llama", repeat, drafts=[f"mtp:{d / 'repeat.safetensors'}"], max_seq_len=256, num_draft=4,
                 progress=quiet)
    exact = str(d / "float32-bundle")
    build_bundle("tiny:llama", exact, drafts=[f"mtp:{d / 'head.safetensors'}"], max_seq_len=256, num_draft=4,
                 draft_precision="float32", progress=quiet)
    return out, head, repeat, exact


def torch_mtp_reference(cfg, target_tensors, head, hidden, tokens, positions):
    """The MTP module in torch, written from its description: RMSNorm(emb) ++ RMSNorm(h) -> eh_proj -> one Llama
    block -> RMSNorm -> the target's output head."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
    t = {k: torch.tensor(v) for k, v in head.items()}
    lc = LlamaConfig(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, num_hidden_layers=1,
                     num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
                     head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
                     vocab_size=cfg.vocab_size)
    lc._attn_implementation = "eager"
    layer = LlamaDecoderLayer(lc, 0).eval()
    layer.load_state_dict({k[len("mtp.layer."):]: v for k, v in t.items() if k.startswith("mtp.layer.")})

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * w

    emb = torch.tensor(target_tensors["model.embed_tokens.weight"])
    e = emb[torch.tensor(tokens)][None]
    h = torch.tensor(hidden)[None]
    z = torch.cat([rms(e, t["mtp.enorm.weight"]), rms(h, t["mtp.hnorm.weight"])], -1) @ t["mtp.eh_proj.weight"].T
    pos = torch.tensor(positions)[None]
    cos, sin = LlamaRotaryEmbedding(lc)(z, pos)
    S = len(tokens)
    mask = torch.full((S, S), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        o = layer(z, attention_mask=mask, position_ids=pos, position_embeddings=(cos, sin))
        o = o[0] if isinstance(o, tuple) else o
        logits = rms(o, t["mtp.norm.weight"]) @ emb.T
    return logits[0].numpy(), o[0].numpy()


@pytest.mark.parametrize("precision", ["float32", "int8"])
def test_mtp_graph_matches_torch(mtp_bundle, precision):
    """float32: to rounding. int8 (the default, speccompile.compile.quantize.int8): int8 weights and activations, so logits within
    a few percent of their range and the same top token for nearly every row."""
    out, head, _, exact = mtp_bundle
    out = exact if precision == "float32" else out
    ck = load_checkpoint("tiny:llama")
    m = read_manifest(out)
    weights = m["weights"]["mtp.bin"]
    assert any(k.endswith(".int8") for k in weights) == (precision == "int8")
    eng = Engine(out, m["models"]["mtp_head"], threads=1, max_rows=16)
    rng = np.random.default_rng(0)
    S = 9
    hidden = rng.standard_normal((S, ck.config.hidden_size)).astype(np.float32)
    tokens = rng.integers(3, 384, S)
    positions = np.arange(1, S + 1)
    logits, _ = eng.forward(tokens, positions=positions, rows=np.arange(S), hidden_in=hidden)
    ref_logits, ref_hidden = torch_mtp_reference(ck.config, ck.tensors, head, hidden, tokens, positions)
    if precision == "float32":
        assert np.abs(logits - ref_logits).max() < 1e-4
        assert np.abs(eng.hidden[:S] - ref_hidden).max() < 1e-4
    else:
        assert np.abs(logits - ref_logits).max() < 0.05 * np.abs(ref_logits).max()
        assert (logits.argmax(-1) == ref_logits.argmax(-1)).sum() >= S - 1
        assert np.abs(eng.hidden[:S] - ref_hidden).max() < 0.05 * np.abs(ref_hidden).max()


@pytest.mark.parametrize("tree", [None, "dynamic:10", "chain:3"])
def test_greedy_with_mtp_equals_autoregressive(mtp_bundle, tree):
    import speccompile
    g = speccompile.load(mtp_bundle[2], threads=1)
    assert max(assert_lossless(g, "mtp", random_prompts(10), 40, tree)) > 1.0


@pytest.mark.parametrize("bundle,tree", [(2, None), (3, None), (3, "chain:1")])
def test_live_drafts_are_the_teacher_forced_ones(mtp_bundle, bundle, tree):
    """Every first draft of greedy decoding is the head's teacher-forced guess for its position
    (bench/head_agreement.py): a drafting path that fed the head other features or positions would still be
    lossless, only slower, and fail here."""
    import speccompile
    from speccompile.bench.head_agreement import answer_agreement, first_drafts
    g = speccompile.load(mtp_bundle[bundle], threads=1)  # a head that repeats the last token; a random one
    head, drafted = g.drafters["mtp"], []

    def spying(propose):
        def spy(context, *args):
            prop = propose(context, *args)
            if len(prop.tokens):
                drafted.append((len(context), int(prop.tokens[0])))
            return prop
        return spy
    head.propose, head.propose_tree = spying(head.propose), spying(head.propose_tree)
    for prompt in random_prompts(6):
        drafted.clear()
        res = g.generate(prompt, 40, drafter="mtp", **({"tree": tree} if tree else {"num_draft": 1}))
        guesses = first_drafts(g, "mtp", np.concatenate([prompt, res.token_ids]))
        assert len(drafted) >= 10
        assert [tok for _, tok in drafted] == [int(guesses[n - 2]) for n, _ in drafted]
    agreement = answer_agreement(g, "mtp", random_prompts(1)[0], 40)
    assert agreement.positions == 39  # every answer token but the prefill's
    if bundle == 2:  # the tiny target repeats itself, and so does this head
        assert agreement.rate > 0.5


def test_sampled_with_mtp_matches_target_distribution(mtp_bundle):
    import speccompile
    from test_decoding import test_sampled_speculative_matches_target_distribution as check
    for bundle in (mtp_bundle[0], mtp_bundle[2]):
        check(speccompile.load(bundle, threads=1), "mtp")


@pytest.mark.parametrize("vocab", ["permuted", "reduced"])
def test_reduced_draft_vocabulary(tmp_path, vocab):
    """A head with a draft-to-target token map (EAGLE-3's reduced vocabulary): greedy and sampled decoding stay
    lossless, and the map is applied (a permuted full map must change nothing)."""
    import speccompile
    cfg = load_checkpoint("tiny:llama").config
    head = tiny_mtp_head(cfg, repeat_last=True)
    rng = np.random.default_rng(0)
    head["mtp.d2t"] = (rng.permutation(cfg.vocab_size) if vocab == "permuted" else
                       np.sort(rng.choice(cfg.vocab_size, 200, replace=False))).astype(np.int64)
    safetensors_numpy.save_file(head, str(tmp_path / "h.safetensors"))
    out = str(tmp_path / "b")
    build_bundle("tiny:llama", out, drafts=[f"mtp:{tmp_path / 'h.safetensors'}"], max_seq_len=256, progress=quiet)
    g = speccompile.load(out, threads=1)
    accepted = assert_lossless(g, "mtp", random_prompts(8), 32)
    accepted += assert_lossless(g, "mtp", random_prompts(4), 32, "dynamic:8")
    assert max(accepted) > 1.0
    from test_decoding import test_sampled_speculative_matches_target_distribution as check
    check(g, "mtp")


def test_deepseek_format_mtp_layer(tmp_path):
    """A checkpoint whose MTP module is layer num_hidden_layers (DeepSeek-V3 names) builds and decodes
    losslessly."""
    ck = load_checkpoint("tiny:llama")
    L = ck.config.num_hidden_layers
    head = tiny_mtp_head(ck.config, seed=3, repeat_last=True)
    names = {"mtp.enorm.weight": "enorm.weight", "mtp.hnorm.weight": "hnorm.weight",
             "mtp.eh_proj.weight": "eh_proj.weight", "mtp.norm.weight": "shared_head.norm.weight"}
    for k, v in head.items():
        ck.tensors[f"model.layers.{L}." + names.get(k, k.replace("mtp.layer.", ""))] = v
    ck.tensors[f"model.layers.{L}.shared_head.head.weight"] = ck.tensors["model.embed_tokens.weight"]
    d = tmp_path / "ds"
    save_hf_dir(ck, str(d))
    out = str(tmp_path / "b")
    build_bundle(str(d), out, drafts=[f"mtp:{d}"], max_seq_len=128, progress=quiet)
    import speccompile
    g = speccompile.load(out, threads=1)
    accepted = []
    for prompt in random_prompts(4):
        res = g.generate(prompt, 24, drafter="mtp")
        assert res.token_ids == g.generate(prompt, 24, speculate=False).token_ids
        accepted.append(res.stats["mean_accepted_tokens"])
    assert max(accepted) > 1.0


def test_head_errors(tmp_path):
    (tmp_path / "head.pt").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="safetensors"):
        build_bundle("tiny:llama", str(tmp_path / "o"), drafts=[f"mtp:{tmp_path / 'head.pt'}"], progress=quiet)
    head = tiny_mtp_head(load_checkpoint("tiny:llama").config)
    del head["mtp.eh_proj.weight"]
    safetensors_numpy.save_file(head, str(tmp_path / "h.safetensors"))
    with pytest.raises(CheckpointError, match="eh_proj"):
        build_bundle("tiny:llama", str(tmp_path / "o"), drafts=[f"mtp:{tmp_path / 'h.safetensors'}"],
                     progress=quiet)
    with pytest.raises(CheckpointError, match="no draft head ships") as refused:
        build_bundle("tiny:llama", str(tmp_path / "o"), drafts=["mtp"], progress=quiet)
    assert "pass drafts='mtp:PATH'" in str(refused.value)  # as each caller spells the drafter: Python's keyword,
    assert "pass --draft mtp:PATH" in refused.value.cli_message()  # build's flag
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("norm", ["mtp.enorm.weight", "mtp.hnorm.weight", "mtp.norm.weight"])
def test_head_norm_of_another_length_refused(tmp_path, norm):
    """A norm weight that is not [hidden] is refused when the head is lowered (once it built, and every generation
    with it failed inside onnxruntime), for a Llama block and for DeepSeek-V3's own MTP layer (MLA)."""
    from speccompile.compile.presets import tiny_deepseek_checkpoint
    from speccompile.compile.sources import load_mtp_head
    from speccompile.compile.weights.decoder import lower_mtp_weights
    head = tiny_mtp_head(load_checkpoint("tiny:llama").config)
    head[norm] = np.ones(32, np.float32)
    safetensors_numpy.save_file(head, str(tmp_path / "h.safetensors"))
    with pytest.raises(CheckpointError, match=rf"{norm} has shape \(32,\), expected \(64,\)"):
        build_bundle("tiny:llama", str(tmp_path / "o"), drafts=[f"mtp:{tmp_path / 'h.safetensors'}"],
                     progress=quiet)
    assert not (tmp_path / "o").exists()
    tiny_deepseek_checkpoint(str(tmp_path / "ds"), with_mtp=True)
    ds = load_checkpoint(str(tmp_path / "ds"))
    mla_head = load_mtp_head(str(tmp_path / "ds"), ds.config)
    lower_mtp_weights(ds.config, mla_head)  # as it is: lowers
    mla_head[norm] = mla_head[norm][:-1]
    with pytest.raises(CheckpointError, match=rf"{norm} has shape"):
        lower_mtp_weights(ds.config, mla_head)


@pytest.mark.parametrize("d2t", [[1, 2, 3], [384] * 384, []])
def test_manifest_draft_vocabulary_map_checked_at_load(mtp_bundle, tmp_path, d2t):
    """A manifest's draft_to_target map that is not one target token id per token the head scores loaded, then
    indexed past an array mid-generation (IndexError: exit 3) or fed the target an id past its vocabulary."""
    import shutil
    import speccompile
    from speccompile.errors import BundleError
    bundle = tmp_path / "b"
    shutil.copytree(mtp_bundle[0], bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["models"]["mtp_head"]["draft_to_target"] = d2t
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="draft_to_target"):
        speccompile.load(str(bundle), threads=1)


def test_empty_draft_vocabulary_refused(tmp_path):
    head = tiny_mtp_head(load_checkpoint("tiny:llama").config)
    head["mtp.d2t"] = np.zeros(0, np.int64)
    safetensors_numpy.save_file(head, str(tmp_path / "h.safetensors"))
    with pytest.raises(CheckpointError, match="mtp.d2t must list target token ids"):
        build_bundle("tiny:llama", str(tmp_path / "o"), drafts=[f"mtp:{tmp_path / 'h.safetensors'}"],
                     progress=quiet)


def medusa_heads(cfg, K=3, layers=1, seed=0, repeat_last=False, prefix=""):
    """Random Medusa heads in the public layout; repeat_last: heads whose blocks add nothing and whose output
    matrix is the target's tied embedding, so every head repeats the target's own next-token guess (often right
    on a tiny model's loops)."""
    rng = np.random.default_rng(seed)
    H, V = cfg.hidden_size, cfg.vocab_size
    emb = load_checkpoint("tiny:llama").tensors["model.embed_tokens.weight"]
    out = {}
    for k in range(K):
        for j in range(layers):
            out[f"{prefix}{k}.{j}.linear.weight"] = (np.zeros((H, H)) if repeat_last else
                                                     rng.standard_normal((H, H)) / np.sqrt(H)).astype(np.float32)
            out[f"{prefix}{k}.{j}.linear.bias"] = np.full(H, -30.0 if repeat_last else 0.0, np.float32)
        out[f"{prefix}{k}.{layers}.weight"] = (emb if repeat_last else rng.standard_normal((V, H))).astype(np.float32)
    return out


STATIC_TREES = {"static": [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]],
                "static-past-vocab": [[0], [1000], [0, 0], [0, 1000], [0, 0, 0]]}  # ranks past the 384 tokens


@pytest.mark.parametrize("tree", [None, "chain:3", "dynamic:8", *STATIC_TREES])
def test_medusa_heads_are_lossless(tmp_path, tree):
    import speccompile
    cfg = load_checkpoint("tiny:llama").config
    safetensors_numpy.save_file(medusa_heads(cfg, repeat_last=True, prefix="medusa_head."),
                                str(tmp_path / "m.safetensors"))
    out = str(tmp_path / "b")
    build_bundle("tiny:llama", out, drafts=[f"medusa:{tmp_path / 'm.safetensors'}"], max_seq_len=256, num_draft=3,
                 progress=quiet)
    if tree in STATIC_TREES:
        (tmp_path / "t.json").write_text(json.dumps(STATIC_TREES[tree]))
        tree = f"static:{tmp_path / 't.json'}"
    g = speccompile.load(out, threads=1)
    assert max(assert_lossless(g, "medusa", random_prompts(8), 32, tree)) > 1.0


def test_medusa_drafts_no_deeper_than_its_heads(tmp_path):
    """Two heads draft two positions: a deeper chain or static tree asked of them is refused (it drafted fewer
    tokens than asked, silently), at build and at generate; a larger build --num-draft is cut to the heads, and
    says so."""
    import speccompile
    cfg = load_checkpoint("tiny:llama").config
    safetensors_numpy.save_file(medusa_heads(cfg, K=2), str(tmp_path / "m.safetensors"))
    (tmp_path / "t.json").write_text(json.dumps(STATIC_TREES["static"]))  # 3 deep
    drafts, out, said = [f"medusa:{tmp_path / 'm.safetensors'}"], str(tmp_path / "b"), []
    for tree in ("chain:3", f"static:{tmp_path / 't.json'}"):
        with pytest.raises(SpeccompileError, match="3 deep.*at most 2 deep"):
            build_bundle("tiny:llama", str(tmp_path / "deep"), drafts=drafts, max_seq_len=64, tree=tree,
                         progress=quiet)
    build_bundle("tiny:llama", out, drafts=drafts, max_seq_len=64, num_draft=4, progress=said.append)
    assert any("--num-draft 4 is cut" in line for line in said)
    g = speccompile.load(out, threads=1)
    for ask in (dict(num_draft=3), dict(tree="chain:3"), dict(tree=f"static:{tmp_path / 't.json'}")):
        with pytest.raises(SpeccompileError, match="at most 2"):
            g.generate("hi", 4, **ask)
    for ask in (dict(num_draft=2), dict(tree="chain:2"), dict(tree="dynamic:6")):
        assert len(g.generate("hi", 4, **ask).token_ids) == 4


def test_medusa_heads_coupled_to_a_requests_noise_rank_their_noisy_logits(tmp_path):
    """Sampled by noise (Drafter.couple), head k ranks its logits plus the noise row of the token k + 1 places
    after the context's last (position len(context) + k): its chain is that argmax, a tree's first children
    the best of it; sampled so, the output is plain sampling's."""
    import speccompile
    from speccompile.runtime.noise import GumbelNoise
    from speccompile.runtime.sampling import SamplingParams
    from speccompile.format.trees import TreeSpec
    cfg = load_checkpoint("tiny:llama").config
    safetensors_numpy.save_file(medusa_heads(cfg, K=3, prefix="medusa_head."), str(tmp_path / "m.safetensors"))
    out = str(tmp_path / "b")
    build_bundle("tiny:llama", out, drafts=[f"medusa:{tmp_path / 'm.safetensors'}"], max_seq_len=64, num_draft=3,
                 progress=quiet)
    g = speccompile.load(out, threads=1)
    medusa, context = g.drafters["medusa"], np.array(random_prompts(1)[0], np.int64)
    medusa.observe(0, np.random.default_rng(0).standard_normal((len(context), cfg.hidden_size)).astype(np.float32))
    logits = medusa.session.run(["logits"], {"hidden_in": medusa.h[len(context) - 2][None]})[0]
    noise = GumbelNoise(3, 30.0, cfg.vocab_size)  # these random heads' logits spread wide: noise as wide
    want = (logits + np.stack(noise.rows(len(context) + np.arange(3)))).argmax(-1)
    assert (want != logits.argmax(-1)).all()  # the noise moves every head's choice here
    medusa.couple(noise)
    try:
        assert medusa.propose(context, 3, SamplingParams(), None).tokens.tolist() == want.tolist()
        tree = medusa.propose_tree(context, TreeSpec.parse("dynamic:6"), SamplingParams(), None)
        assert tree.first_path().tokens.tolist() == want.tolist()
    finally:
        medusa.couple(None)
    for seed, prompt in enumerate(random_prompts(3)):
        plain = g.generate(prompt, 16, speculate=False, temperature=2.0, seed=seed).token_ids
        assert g.generate(prompt, 16, drafter="medusa", temperature=2.0, seed=seed).token_ids == plain


@pytest.mark.parametrize("precision", ["float32", "int8"])
@pytest.mark.parametrize("output", ["own", "target's"])
def test_medusa_graph_matches_numpy(tmp_path, precision, output):
    """Each head: h = final_norm(hidden); h += SiLU(W h + b) per block; logits = W_out h. Heads whose W_out are
    all the target's head share it (no copy in medusa.bin, one product); int8 (the default): within a few
    percent of the logits' range. Three sequences' rows in one pass: head k's row for sequence n at k * 3 + n."""
    import onnxruntime as ort
    from speccompile.format.bundle import read_manifest
    ck = load_checkpoint("tiny:llama")
    cfg = ck.config
    heads = medusa_heads(cfg, K=2, layers=2)
    if output == "target's":  # as `train-head --arch medusa` writes it: the target's head in float16
        for k in range(2):
            heads[f"{k}.2.weight"] = ck.tensors["model.embed_tokens.weight"].astype(np.float16)
    safetensors_numpy.save_file(heads, str(tmp_path / "m.safetensors"))
    out = tmp_path / "b"
    build_bundle("tiny:llama", str(out), drafts=[f"medusa:{tmp_path / 'm.safetensors'}"], draft_precision=precision,
                 progress=quiet)
    stored = read_manifest(str(out))["weights"]["medusa.bin"]
    assert any(".out" in k for k in stored) == (output == "own")
    assert any(k.endswith(".int8") for k in stored) == (precision == "int8")
    x = np.random.default_rng(1).standard_normal((3, cfg.hidden_size)).astype(np.float32)
    session = open_session(str(out / "medusa.onnx"), ort.SessionOptions(), ["CPUExecutionProvider"])
    logits = session.run(["logits"], {"hidden_in": x})[0]
    gamma = ck.tensors["model.norm.weight"]
    h0 = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + cfg.rms_norm_eps) * gamma
    for k in range(2):
        h = h0
        for j in range(2):
            y = h @ heads[f"{k}.{j}.linear.weight"].T + heads[f"{k}.{j}.linear.bias"]
            h = h + y / (1 + np.exp(-y))
        out_w = ck.tensors["model.embed_tokens.weight"] if output == "target's" else heads[f"{k}.2.weight"]
        ref = h @ out_w.T  # shared: the target's own head, of which the file holds the float16 rounding
        tol = 1e-3 if precision == "float32" else 0.05 * np.abs(ref).max()
        assert np.abs(logits[k * 3:(k + 1) * 3] - ref).max() < tol


def test_medusa_pickle_refused(tmp_path):
    with pytest.raises(CheckpointError, match="safetensors"):
        build_bundle("tiny:llama", str(tmp_path / "o"), drafts=[f"medusa:{tmp_path / 'medusa_lm_head.pt'}"],
                     progress=quiet)


def test_an_int8_head_scores_with_the_targets_int8_screen(mtp_bundle):
    """An int8 MTP head without an output matrix of its own scores with the target's int8 head screen, read from
    target.bin (a quarter of the float32 head's bytes a drafting pass); a float32 head with the float32 head."""
    import onnx
    out, _, _, exact = mtp_bundle
    for bundle, screened in ((out, True), (exact, False)):
        entry = read_manifest(bundle)["models"]["mtp_head"]
        graph = onnx.load(f"{bundle}/{entry['graph']}", load_external_data=False).graph
        read = {x for n in graph.node for x in n.input}
        assert ("head_screen.codes" in read) == screened, bundle
