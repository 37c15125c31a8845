"""What `speccompile train-head` trains a head on and how it scores it, against figures made another way: the
held-out agreement it records against the compiled head's own drafts in a bundle (the head scored with the output
head the runtime scores it with)."""
import json

import numpy as np
import pytest

from speccompile.compile.driver import build_bundle

from conftest import quiet
from models_util import write_checkpoint
from test_train_head import train_head, trained  # noqa: F401 (the fixture)

pytest.importorskip("torch")
pytest.importorskip("transformers")

from speccompile.train.data import Data  # noqa: E402

HOLDOUT, SEED = 0.5, 0


def _bundle_agreement(gen, drafter: str, data: Data) -> tuple[int, int]:
    """(hits, positions) of the bundle's teacher-forced first drafts against the target's greedy token, over the
    held-out positions evaluate.py counts as depth 1's (the label predicts a token past the shared header)."""
    from speccompile.bench.head_agreement import first_drafts
    hits = positions = 0
    for j in data.eval_ids:
        tok, _, top_ids, _ = data.seq(j)
        i = np.arange(len(tok) - 1)
        valid = (i + 1 <= len(tok) - 2) & (i + 1 >= data.shared)
        guesses = first_drafts(gen, drafter, tok)
        hits += int((guesses == top_ids[np.minimum(i + 1, len(tok) - 1), 0])[valid].sum())
        positions += int(valid.sum())
    return hits, positions


def test_recorded_agreement_is_the_compiled_heads_on_an_untied_target(tmp_path):
    """A target whose output head is not its embedding (Llama 3): the runtime scores MTP and EAGLE-1 heads with its
    lm_head, so training and the recorded held-out agreement must too. A head trained against the embedding would
    record the agreement of drafts the bundle never makes."""
    import speccompile
    hf, work = tmp_path / "hf", tmp_path / "work"
    write_checkpoint("llama3", str(hf))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"tell me about thing number {i}"}) + "\n" for i in range(6)))
    common = ["--target", str(hf), "--work", str(work), "--prompts", str(prompts), "--num-prompts", "0",
              "--max-new-tokens", "24", "--gen-batch", "3", "--tokens-per-step", "64", "--threads", "1",
              "--holdout", str(HOLDOUT), "--seed", str(SEED), "--epochs", "3", "--eval-chain", "2"]
    heads = {"mtp": tmp_path / "mtp.safetensors", "eagle": tmp_path / "eagle"}
    records = {"mtp": tmp_path / "mtp.json", "eagle": heads["eagle"] / "training.json"}
    train_head(common + ["--out", str(heads["mtp"]), "--stages", "gen,features,train,export"])
    train_head(common + ["--arch", "eagle", "--out", str(heads["eagle"]), "--stages", "train,export"])
    bundle = str(tmp_path / "bundle")
    build_bundle(str(hf), bundle, drafts=[f"{k}:{v}" for k, v in heads.items()], max_seq_len=128, num_draft=2,
                 draft_precision="float32", progress=quiet)
    g = speccompile.load(bundle, threads=1)
    data = Data([str(work / "features.npz")], HOLDOUT, SEED)
    for drafter, record in records.items():
        hits, positions = _bundle_agreement(g, drafter, data)
        recorded = json.loads(record.read_text())["metrics_heldout"]["depth1_top1_all_positions"]
        assert positions > 20 and hits > 0, (drafter, hits, positions)
        # a float32 bundle drafts as the torch module does; one near-tie may fall either way
        assert abs(recorded * positions - hits) <= 1, (drafter, recorded, hits, positions)


# hand-made data: a target that is always right (its greedy next token at p is the sequence's token p + 1), with
# features h[p] = the token's index in the whole data, so that any row tells which position it came from
SEQS = [[5, 6, 7, 8, 9, 10, 11, 12], [5, 6, 30, 31, 32, 33], [5, 6, 40, 41, 42, 43, 44]]
PROMPT_LENS = [3, 4, 3]
VOCAB = 64


def _hand_data(seqs=SEQS, prompt_lens=PROMPT_LENS, width: int = 4, temps=None) -> Data:
    """A Data over `seqs` without files: top-2 labels (the next token, p 0.75; token 0, p 0.25), h rows of `width`
    (all of row p: p); the first len(seqs) - 1 sequences held out."""
    data = Data.__new__(Data)
    data.tokens = np.concatenate([np.asarray(s, np.int64) for s in seqs])
    nxt = np.concatenate([np.asarray(s[1:] + [s[-1]], np.int64) for s in seqs])
    data.topk_ids = np.stack([nxt, np.zeros_like(nxt)], 1)
    data.topk_p = np.tile(np.asarray([0.75, 0.25], np.float32), (len(nxt), 1))
    data.h = np.repeat(np.arange(len(nxt), dtype=np.float32)[:, None], width, 1)
    data.off = np.cumsum([0] + [len(s) for s in seqs])
    data.prompt_len = np.asarray(prompt_lens, np.int64)
    data.temp = np.zeros(len(seqs), np.float32) if temps is None else np.asarray(temps, np.float32)
    data.n_seq, data.shared = len(seqs), 2
    data.eval_ids, data.train_ids = list(range(len(seqs) - 1)), [len(seqs) - 1]
    return data


def test_rows_pair_each_feature_with_the_tokens_its_depths_predict():
    """Row (h_i, x_{i+1}) at position i+1; depth d is fed x_{i+d}, learns the target's distribution that predicts
    x_{i+d+1} and regresses on h_{i+d}; only where x_{i+d+1} is a real token and the label lies past the shared
    header. With a draft vocabulary, labels become its indices and tokens outside it weigh nothing."""
    from speccompile.train.data import make_row
    data = _hand_data()
    vmap = np.full(VOCAB, -1, np.int64)
    vmap[::2] = np.arange(len(vmap[::2]))  # the even tokens
    for m in (None, vmap):
        r = make_row(data, [1, 0], m, depths=3)
        rows = [(j, i) for j in (1, 0) for i in range(len(SEQS[j]) - 1)]
        assert len(r["pos"]) == len(rows)
        for row, (j, i) in enumerate(rows):
            tok, at = SEQS[j], int(data.off[j])
            assert int(r["pos"][row]) == i + 1 and float(r["h"][row, 0]) == at + i
            for d in (1, 2, 3):
                real = i + d + 1 <= len(tok) - 1 and i + d >= data.shared
                assert bool(r[f"m{d}"][row]) == real, (j, i, d)
                if not real:
                    continue
                assert int(r[f"x{d}"][row]) == tok[i + d] and float(r[f"h{d}"][row, 0]) == at + i + d
                want = tok[i + d + 1]
                if m is None:
                    assert int(r[f"l{d}"][row, 0]) == want and float(r[f"p{d}"][row, 0]) == 0.75
                else:
                    assert float(r[f"p{d}"][row, 0]) == (0.75 if m[want] >= 0 else 0.0)
                    assert m[want] < 0 or int(r[f"l{d}"][row, 0]) == m[want]


def test_losses_ignore_masked_positions():
    """The cross-entropy and the feature regression are means over the mask's positions alone."""
    import torch
    from speccompile.train.objective import feat_loss, soft_ce
    g = torch.Generator().manual_seed(0)
    logits, o, h = (torch.randn(6, 8, generator=g) for _ in range(3))
    ids, p = torch.randint(0, 8, (6, 2), generator=g), torch.rand(6, 2, generator=g)
    mask = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    wild = torch.where(mask[:, None], logits, logits * 1e3)  # masked rows changed beyond recognition
    assert torch.allclose(soft_ce(wild, ids, p, mask), soft_ce(logits[mask], ids[mask], p[mask], mask[mask]))
    head = type("MtpHead", (), {"arch": "mtp"})()
    w = torch.ones(8)
    assert torch.allclose(feat_loss(head, torch.where(mask[:, None], o, o * 1e3 + 5), h, mask, w),
                          feat_loss(head, o[mask], h[mask], mask[mask], w))


def _random_head():
    """An MTP head of small random weights for a 32-wide target of VOCAB tokens."""
    import torch
    from speccompile.train.heads import Head
    cfg = {"hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2,
           "head_dim": 8, "rope_theta": 10000.0}
    head = Head(cfg, 1e-6)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (1.0 if p.dim() == 1 else 0.3))
    return head, torch.randn(VOCAB, 32, generator=g)


def _depth2_by_position(head, emb_w, tok, h, x2):
    """Depth 2 of each pair i of one sequence, one at a time as a drafter runs it: depth 1 over the real pairs,
    then (o_i, x2[i]) at position i+2, attending the real keys of pairs 0..i and its own."""
    import torch
    import torch.nn.functional as F
    n = len(tok)
    pos = torch.arange(1, n)
    x, z = head.fuse(F.embedding(torch.as_tensor(tok[1:]), emb_w), head.feature(torch.as_tensor(h[:-1])))
    q, k, v = head.qkv(x, pos)
    o1 = head.block(z, q, [k], [v], pos[None, :] <= pos[:, None])
    outs = []
    for i in range(n - 1):
        xb, zb = head.fuse(F.embedding(torch.as_tensor([int(x2[i])]), emb_w), o1[i:i + 1])
        qb, kb, vb = head.qkv(xb, pos[i:i + 1] + 1)
        outs.append(head.block(zb, qb, [k[:i + 1], kb], [v[:i + 1], vb], torch.ones(1, i + 2, dtype=torch.bool)))
    return o1, torch.cat(outs)


def test_unrolled_depth_is_the_drafters_second_step():
    """Training's depth 2 (fed the real x_{i+2}) and evaluation's (fed the head's own draft) are the head run as a
    drafter runs it, position by position."""
    import torch
    import torch.nn.functional as F
    from speccompile.train.data import make_row
    from speccompile.train.evaluate import _drafts
    from speccompile.train.objective import head_forward
    head, emb_w = _random_head()
    data = _hand_data(width=32)
    data.h = np.random.default_rng(0).standard_normal(data.h.shape).astype(np.float32)
    out_w = emb_w.flip(0)  # another output head than the embedding
    with torch.no_grad():
        for j in range(data.n_seq):
            tok, h, _, _ = data.seq(j)
            r = make_row(data, [j], None, depths=2)
            o1, o2 = head_forward(head, lambda ids: F.embedding(ids, emb_w), r, 2)
            ref1, ref2 = _depth2_by_position(head, emb_w, tok, h, np.append(tok[2:], tok[-1]))
            assert torch.allclose(o1, ref1, atol=1e-5) and torch.allclose(o2[:-1], ref2[:-1], atol=1e-5)
            d1, d2 = _drafts(head, emb_w, out_w, tok, h, 2)
            _, ref2 = _depth2_by_position(head, emb_w, tok, h, d1)
            assert torch.equal(d1, head.draft(ref1, out_w)) and torch.equal(d2, head.draft(ref2, out_w))


class _TableHead:
    """A stand-in head whose drafts come from a table: the draft of depth d after global position p is
    table[d - 1][p] (h's first column carries p through fuse and block; block adds DEPTH per depth)."""
    DEPTH = 1000
    arch = "mtp"

    def __init__(self, table):
        self.table = table

    def feature(self, h):
        return h[:, :1]

    def fuse(self, emb, f):
        return f, f

    def qkv(self, x, pos):
        return x, x, x

    def block(self, z, q, ks, vs, mask):
        return z + self.DEPTH

    def draft(self, o, out_w):
        import torch
        d, p = (o[:, 0].long() // self.DEPTH), (o[:, 0].long() % self.DEPTH)
        return torch.as_tensor(np.asarray([self.table[a - 1][b] for a, b in zip(d.tolist(), p.tolist())]))


def _truth(data: Data, depth: int) -> np.ndarray:
    """Per global position p: the target's greedy token `depth` tokens on (the always-right target's label)."""
    nxt = np.zeros(len(data.tokens), np.int64)
    for j in range(data.n_seq):
        tok, a = data.seq(j)[0], int(data.off[j])
        for i in range(len(tok)):
            nxt[a + i] = tok[min(i + depth, len(tok) - 1)]
    return nxt


def test_evaluation_scores_a_perfect_head_one_and_counts_only_real_positions():
    """A head whose every draft is the target's greedy token scores 1 everywhere and has every chain accepted; one right
    at a random half of the pairs scores that half of the positions evaluate's docstring names (past the shared
    header, with a real next token; response ones: from the prompt's last token on)."""
    import torch
    from speccompile.train.evaluate import evaluate
    data = _hand_data()
    ids = data.eval_ids
    perfect = _TableHead([_truth(data, d) for d in (2, 3, 4)])
    ev = evaluate(perfect, data, torch.zeros(VOCAB, 1), torch.zeros(VOCAB, 1), ids, 3)
    assert ev["d1_all"] == ev["d1_resp"] == ev["d2_resp"] == ev["d2_resp_given_d1"] == 1.0
    # every chain is accepted at every depth: one cut by its sequence's end counts only as deep as it can be checked
    starts = [(len(SEQS[j]), i) for j in ids for i in range(PROMPT_LENS[j] - 1, len(SEQS[j]) - 2)]
    assert ev["chain_p_first_d_accepted"] == [1.0, 1.0, 1.0] and ev["chain_expected_accepted"] == 3.0
    assert ev["chain_positions"] == len(starts) and any(i + 3 > n - 2 for n, i in starts)  # some chains are cut
    right = np.random.default_rng(0).random(len(data.tokens)) < 0.5
    half = _TableHead([np.where(right, _truth(data, 2), VOCAB - 1), _truth(data, 3), _truth(data, 4)])
    ev = evaluate(half, data, torch.zeros(VOCAB, 1), torch.zeros(VOCAB, 1), ids, 3)
    hits = {"all": [0, 0], "resp": [0, 0]}
    for j in ids:
        n, a = len(SEQS[j]), int(data.off[j])
        for i in range(n - 1):
            if i + 1 <= n - 2 and i + 1 >= data.shared:
                for kind in ("all", "resp") if i >= PROMPT_LENS[j] - 1 else ("all",):
                    hits[kind][0] += int(right[a + i])
                    hits[kind][1] += 1
    assert ev["d1_all"] == hits["all"][0] / hits["all"][1] and ev["d1_resp"] == hits["resp"][0] / hits["resp"][1]
    assert ev["n_positions_resp"] == hits["resp"][1] and 0 < ev["d1_resp"] < 1


def test_draft_vocabulary_is_the_most_frequent_tokens():
    from speccompile.train.draft_vocab import frequent_tokens
    tokens = np.asarray([9] * 5 + [3] * 4 + [7] * 4 + [1] * 2 + [12])
    assert frequent_tokens(tokens, 3).tolist() == [3, 7, 9]
    assert frequent_tokens(tokens, 2).tolist() == [3, 9]  # a tie: the lower id
    assert frequent_tokens(tokens, 99).tolist() == [1, 3, 7, 9, 12]  # never a token the data lacks


def test_medusa_head_k_learns_the_token_k_plus_2_on():
    """Head k at t guesses x_{t+k+2}: its label is the target's distribution at t+k+1, where that predicts a real
    token past the shared header."""
    from speccompile.train.medusa import labels
    data = _hand_data()
    for j in range(data.n_seq):
        tok = SEQS[j]
        for k in (0, 1, 2):
            valid, ids, _ = labels(data, j, k)
            for t in range(len(tok)):
                real = t + k + 2 <= len(tok) - 1 and t + k + 1 >= data.shared
                assert bool(valid[t]) == real and (not real or int(ids[t, 0]) == tok[t + k + 2])


def test_medusa_file_holds_each_block_as_its_public_layout_reads_it(tmp_path):
    """{k}.0.linear is a torch Linear (y = x W^T + b) of the residual block x + SiLU(y); {k}.1 the output head:
    the file, read that way, gives the trained module's outputs."""
    import torch
    from safetensors.numpy import load_file
    from speccompile.train.medusa import Medusa
    m = Medusa.__new__(Medusa)
    g = torch.Generator().manual_seed(0)
    m.K, m.eps = 2, 1e-6
    m.emb_w, m.wfinal = torch.randn(VOCAB, 16, generator=g), torch.rand(16, generator=g) + 0.5
    m.w, m.b = torch.randn(2, 16, 16, generator=g) * 0.3, torch.randn(2, 16, generator=g)
    m.save(str(tmp_path / "heads.safetensors"))
    f = {k: v.astype(np.float32) for k, v in load_file(str(tmp_path / "heads.safetensors")).items()}
    h = torch.randn(5, 16, generator=g)
    x = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + m.eps) * m.wfinal).numpy()
    with torch.no_grad():
        want = m.outputs(h).numpy()
    for k in range(2):
        y = x @ f[f"{k}.0.linear.weight"].T + f[f"{k}.0.linear.bias"]
        got = x + y / (1 + np.exp(-y))
        assert np.abs(got - want[k]).max() < 1e-2 and np.array_equal(f[f"{k}.1.weight"], m.emb_w.half().float().numpy())


def test_loss_weighs_depth_one_fully_and_deeper_ones_by_depth2_weight():
    """The loss the record describes: sum over depths d of w_d * (CE_d + reg_weight * SmoothL1_d), w_1 = 1, w_d =
    --depth2-weight."""
    import torch
    from speccompile.train.loop import Setup, step_losses
    from speccompile.train.options import TrainOptions
    head, emb_w = _random_head()
    data = _hand_data(width=32)
    data.h = np.random.default_rng(0).standard_normal(data.h.shape).astype(np.float32)
    a = TrainOptions(depth2_weight=0.25, reg_weight=0.5, unroll=3, out="head.safetensors")
    s = Setup({}, emb_w, emb_w.flip(0), torch.ones(32), data, 1.0, head, None, emb_w.flip(0))
    loss, ces, regs = step_losses(a, s, [0, 1], 3)
    want = sum((1.0 if d == 0 else 0.25) * (ce + 0.5 * reg) for d, (ce, reg) in enumerate(zip(ces, regs)))
    assert len(ces) == len(regs) == 3 and float(regs[0].detach()) > 0
    assert torch.allclose(loss, want)


def test_features_are_the_residual_stream_before_the_final_norm(trained, tmp_path):
    """features.npz's h is what the final norm reads (transformers' own layers, tests/test_eagle.py), its top-1 label
    the target's greedy token there."""
    from speccompile.compile.sources import load_checkpoint
    from test_eagle import target_features
    feats = np.load(trained / "work" / "features.npz")
    n = int(feats["offsets"][1])
    target = load_checkpoint(str(trained / "hf"))
    want = target_features(target, tmp_path, feats["tokens"][:n])
    pre = want[target.config.num_hidden_layers]
    assert np.abs(feats["h"][:n] - pre).max() < 1e-4 * max(1.0, np.abs(pre).max())
    logits = want["norm"] @ target.tensors.get("lm_head.weight", target.tensors["model.embed_tokens.weight"]).T
    assert (feats["topk_ids"][:n, 0] == logits.argmax(-1)).mean() > 0.9


def test_a_kept_vocabulary_is_added_to_the_most_frequent_tokens(tmp_path):
    """--draft-vocab-keep: the earlier vocabulary's ids join the data's most frequent ones, even those the new data
    lacks."""
    from safetensors import safe_open
    from safetensors.numpy import save_file
    from speccompile.train.draft_vocab import add_draft_vocab
    from speccompile.train.heads import HEAD_TENSORS
    head = tmp_path / "head.safetensors"
    save_file({name: np.zeros(2, np.float32) for name in HEAD_TENSORS}, str(head))
    gen = tmp_path / "gen.jsonl"
    gen.write_text("".join(json.dumps({"idx": i, "prompt": "p", "temperature": 0.0, "prompt_ids": [1],
                                       "response_ids": ids}) + "\n" for i, ids in enumerate([[4, 4, 5], [4, 6, 5]])))
    size, _ = add_draft_vocab(str(head), [str(gen)], 2, "test", keep=np.asarray([9, 50]))
    with safe_open(str(head), "np") as f:
        assert f.get_tensor("mtp.d2t").tolist() == [4, 5, 9, 50] and size == 4


def test_resumed_training_ends_where_an_uninterrupted_run_does(trained, tmp_path):
    """One epoch, then --resume for a second: the same head (weights, optimizer moments, the epoch's rows and
    steps) as two epochs in one run."""
    from safetensors.numpy import load_file
    from test_train_head import fresh_work
    finals = []
    for name, resume in (("straight", []), ("resumed", ["--resume"])):  # both copies hold the fixture's epoch 1
        args, work = fresh_work(trained, tmp_path, name)
        train_head(args + ["--stages", "train", "--epochs", "2", *resume])
        finals.append(load_file(str(work / "ckpt" / "final.safetensors")))
    assert finals[0].keys() == finals[1].keys()
    for name in finals[0]:
        assert np.allclose(finals[0][name], finals[1][name], atol=1e-6), name


def test_medusa_epochs_are_each_packed_in_an_order_of_their_own():
    """One packing repeated made every epoch take the same steps in the same order (the MTP/EAGLE loop packs each
    epoch anew); a fraction of an epoch is cut from the next one's rows."""
    from types import SimpleNamespace

    from speccompile.train.data import Data
    from speccompile.train.medusa import epoch_rows
    data = SimpleNamespace(train_ids=list(range(12)), off=np.arange(13))  # twelve one-token sequences
    data.pack = lambda ids, tokens, seed: Data.pack(data, ids, tokens, seed)
    data.epoch_rows = lambda tokens, seed, epoch: Data.epoch_rows(data, tokens, seed, epoch)
    rows = epoch_rows(data, 3, 7, 2.0)
    first, second = rows[:4], rows[4:]
    assert sorted(sum(first, [])) == sorted(sum(second, [])) == list(range(12))  # each epoch every sequence once
    assert first != second
    assert epoch_rows(data, 3, 7, 1.5) == rows[:6]
