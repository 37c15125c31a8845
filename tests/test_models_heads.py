"""Drafters on every architecture: `speccompile train-head` runs on each family's tiny checkpoint (the target's own
answers, features, one epoch, export), and the heads it makes (MTP, EAGLE-1, EAGLE-3, Medusa) build into a bundle of that
target and decode exactly as plain decoding does. Lookup and layer-skip on every family: tests/test_models.py."""
import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from speccompile.compile.driver import build_bundle  # noqa: E402

from conftest import assert_lossless, quiet, random_prompts  # noqa: E402
from models_util import write_checkpoint  # noqa: E402
from test_train_head import train_head  # noqa: E402


@pytest.mark.parametrize("case", ["llama3", "qwen3", "phi3", "gemma3", "mistral-window", "mixtral-window"])
def test_trained_heads_on_every_architecture(tmp_path, case):
    import speccompile
    hf, work = tmp_path / "hf", tmp_path / "work"
    write_checkpoint(case, str(hf))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"tell me about thing number {i}"}) + "\n" for i in range(4)))
    common = ["--target", str(hf), "--work", str(work), "--prompts", str(prompts), "--num-prompts", "0",
              "--max-new-tokens", "12", "--gen-batch", "2", "--tokens-per-step", "48", "--threads", "1",
              "--holdout", "0.25", "--epochs", "1"]
    heads = {"mtp": tmp_path / "mtp.safetensors", "eagle": tmp_path / "eagle", "eagle3": tmp_path / "eagle3",
             "medusa": tmp_path / "medusa.safetensors"}
    train_head(common + ["--arch", "mtp", "--out", str(heads["mtp"]), "--stages", "gen,features,train,export"])
    train_head(common + ["--arch", "eagle", "--out", str(heads["eagle"]), "--stages", "train,export"])
    train_head(common + ["--arch", "eagle3", "--out", str(heads["eagle3"]), "--stages", "aux,train,export",
                         "--aux-layers", "0,1,2"])
    train_head(common + ["--arch", "medusa", "--out", str(heads["medusa"]), "--stages", "train,export",
                         "--heads", "2"])
    bundle = str(tmp_path / "b")
    build_bundle(str(hf), bundle, drafts=[f"{k}:{v}" for k, v in heads.items()], max_seq_len=128, num_draft=3,
                 progress=quiet)
    g = speccompile.load(bundle, threads=1)
    for drafter in heads:
        assert_lossless(g, drafter, random_prompts(2), 24)
        assert_lossless(g, drafter, random_prompts(2, seed=1), 24, "dynamic:4")
