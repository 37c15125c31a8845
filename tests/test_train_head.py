"""The head-training tools end to end on a tiny target: tools/train_head.py (the target's own continuations,
teacher-forced features, training with an epoch checkpoint that --resume continues, export to safetensors with
its record, the exported head in a bundle decoding losslessly) and tools/train_medusa.py on the same features."""
import importlib.util
import json
import os

import pytest

from speccompile.build import build_bundle
from speccompile.sources import load_checkpoint, save_hf_dir

from conftest import assert_lossless, quiet, random_prompts

pytest.importorskip("torch")
pytest.importorskip("transformers")

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(TOOLS, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_train_head_end_to_end(tmp_path, capsys):
    hf, work, out = tmp_path / "hf", tmp_path / "work", tmp_path / "head" / "tiny-mtp.safetensors"
    save_hf_dir(load_checkpoint("tiny:llama"), str(hf))
    prompts = tmp_path / "prompts.jsonl"
    items = [{"prompt": f"tell me about thing number {i}"} for i in range(5)]
    items.append({"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"},
                               {"role": "user", "content": "and then?"}]})  # a second-round chat turn
    prompts.write_text("".join(json.dumps(p) + "\n" for p in items))
    th = _tool("train_head")
    common = ["--target", str(hf), "--work", str(work), "--out", str(out), "--prompts", str(prompts),
              "--num-prompts", "0", "--max-new-tokens", "12", "--gen-batch", "3", "--tokens-per-step", "48",
              "--threads", "1", "--holdout", "0.2", "--log-every", "1", "--eval-chain", "3"]
    th.main(common + ["--stages", "gen,features,train", "--epochs", "1"])
    gen = [json.loads(line) for line in open(work / "gen.jsonl")]
    assert sorted(r["idx"] for r in gen) == list(range(6)) and all(r["response_ids"] for r in gen)
    assert os.path.isfile(work / "features.npz") and os.path.isfile(work / "ckpt" / "epoch1.pt")
    first = json.load(open(work / "info.json"))
    assert first["epochs_done"] == 1 and len(first["history"]) == 1

    th.main(common + ["--stages", "train,export", "--epochs", "2", "--resume"])
    assert "resumed from epoch1.pt" in capsys.readouterr().out
    info = json.load(open(work / "info.json"))
    assert [h["epoch"] for h in info["history"]] == [1, 2]
    assert info["steps"] == 2 * first["steps"]  # the second epoch continued the first, not a restart
    record = json.load(open(str(out)[:-len(".safetensors")] + ".json"))
    assert record["training"]["epochs_done"] == 2 and 0 <= record["metrics_heldout"]["depth1_top1"] <= 1

    from safetensors import safe_open
    with safe_open(str(out), "np") as f:
        assert sorted(f.keys()) == sorted(th.HEAD_TENSORS)
    _tool("draft_vocab").main([str(out), "--data", str(work / "gen.jsonl"), "--size", "64"])  # reduced vocabulary
    with safe_open(str(out), "np") as f:
        d2t = f.get_tensor("mtp.d2t")
    assert 0 < len(d2t) <= 64 and (d2t[1:] > d2t[:-1]).all()
    record = json.load(open(str(out)[:-len(".safetensors")] + ".json"))
    assert record["draft_vocabulary"]["size"] == len(d2t) and record["bytes"] == os.path.getsize(out)
    bundle = str(tmp_path / "bundle")
    build_bundle("tiny:llama", bundle, drafts=[f"mtp:{out}"], max_seq_len=128, num_draft=3, progress=quiet)
    import speccompile
    g = speccompile.load(bundle, threads=1)
    assert_lossless(g, "mtp", random_prompts(2), 16)
    assert_lossless(g, "mtp", random_prompts(2, seed=1), 16, "dynamic:6")

    medusa = tmp_path / "medusa" / "heads.safetensors"
    rec = _tool("train_medusa").main(["--features", str(work / "features.npz"), "--target", str(hf), "--out",
                                      str(medusa), "--heads", "2", "--tokens-per-step", "64", "--epochs", "4",
                                      "--lr", "3e-3", "--threads", "1"])
    assert rec["steps"] > 1 and len(rec["heldout"]["top1_per_head"]) == 2
    first, last = rec["train_loss_first_last"]
    assert last < 0.9 * first  # the heads fit the target's distributions (a tiny model's data is too small to hold out)
    mb = str(tmp_path / "medusa_bundle")
    build_bundle("tiny:llama", mb, drafts=[f"medusa:{medusa}"], max_seq_len=128, num_draft=2, progress=quiet)
    gm = speccompile.load(mb, threads=1)
    assert_lossless(gm, "medusa", random_prompts(2), 16)
    assert_lossless(gm, "medusa", random_prompts(2, seed=1), 16, "dynamic:4")
