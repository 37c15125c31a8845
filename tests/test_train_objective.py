"""What `speccompile train-head` trains a head on and how it scores it, against figures made another way: the
held-out agreement it records against the compiled head's own drafts in a bundle (the head scored with the output
head the runtime scores it with)."""
import json

import numpy as np
import pytest

from speccompile.compile.driver import build_bundle

from conftest import quiet
from models_util import write_checkpoint
from test_train_head import train_head

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
