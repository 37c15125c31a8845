"""Head training end to end on a tiny target, through `speccompile train-head` (speccompile.train): the target's
own continuations, teacher-forced features, training with an epoch checkpoint that --resume continues, export to
safetensors with its record, stage vocab's reduced draft vocabulary, the exported head in a bundle decoding
losslessly; EAGLE-1 and EAGLE-3 heads (the trained module is the public architecture) and Medusa heads on the same
features. Also: the command's help and defaults, its one-line error without torch, the prompt set's output."""
import dataclasses
import hashlib
import json
import os
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from speccompile.cli import main as cli
from speccompile.compile.driver import build_bundle
from speccompile.compile.sources import load_checkpoint, save_hf_dir
from speccompile.errors import CheckpointError

from conftest import assert_lossless, quiet, random_prompts

pytest.importorskip("torch")
pytest.importorskip("transformers")

from speccompile.train.heads import EAGLE3_NAMES, EAGLE_NAMES, HEAD_TENSORS, Head  # noqa: E402
from speccompile.train.options import ARCH_DEFAULTS, TrainOptions  # noqa: E402
from speccompile.train.prompts import READING_WEIGHTS, make_prompts, reading_prompts  # noqa: E402


def train_head(args: list[str]) -> str:
    """Run `speccompile train-head ARGS`; its output (the progress lines)."""
    result = CliRunner().invoke(cli, ["train-head", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_train_head_end_to_end(tmp_path):
    hf, work, out = tmp_path / "hf", tmp_path / "work", tmp_path / "head" / "tiny-mtp.safetensors"
    save_hf_dir(load_checkpoint("tiny:llama"), str(hf))
    prompts = tmp_path / "prompts.jsonl"
    items = [{"prompt": f"tell me about thing number {i}"} for i in range(5)]
    items.append({"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"},
                               {"role": "user", "content": "and then?"}]})  # a second-round chat turn
    prompts.write_text("".join(json.dumps(p) + "\n" for p in items))
    common = ["--target", str(hf), "--work", str(work), "--out", str(out), "--prompts", str(prompts),
              "--num-prompts", "0", "--max-new-tokens", "12", "--gen-batch", "3", "--tokens-per-step", "48",
              "--threads", "1", "--holdout", "0.2", "--log-every", "1", "--eval-chain", "3"]
    train_head(common + ["--stages", "gen,features,train", "--epochs", "1"])
    gen = [json.loads(line) for line in open(work / "gen.jsonl")]
    assert sorted(r["idx"] for r in gen) == list(range(6)) and all(r["response_ids"] for r in gen)
    assert os.path.isfile(work / "features.npz") and os.path.isfile(work / "ckpt" / "epoch1.safetensors")
    first = json.load(open(work / "info.json"))
    assert first["epochs_done"] == 1 and len(first["history"]) == 1

    resumed = train_head(common + ["--stages", "train,export", "--epochs", "2", "--resume"])
    assert "resumed from epoch1.safetensors" in resumed
    info = json.load(open(work / "info.json"))
    assert [h["epoch"] for h in info["history"]] == [1, 2]
    assert info["steps"] == 2 * first["steps"]  # the second epoch continued the first, not a restart
    record = json.load(open(str(out)[:-len(".safetensors")] + ".json"))
    assert record["training"]["epochs_done"] == 2 and 0 <= record["metrics_heldout"]["depth1_top1"] <= 1

    from safetensors import safe_open
    with safe_open(str(out), "np") as f:
        assert sorted(f.keys()) == sorted(HEAD_TENSORS)
    train_head(common + ["--stages", "vocab", "--draft-vocab", "64"])  # reduced vocabulary
    with safe_open(str(out), "np") as f:
        d2t = f.get_tensor("mtp.d2t")
    assert 0 < len(d2t) <= 64 and (d2t[1:] > d2t[:-1]).all()
    record = json.load(open(str(out)[:-len(".safetensors")] + ".json"))
    assert record["draft_vocabulary"]["size"] == len(d2t) and record["bytes"] == os.path.getsize(out)
    assert record["draft_vocabulary"]["made_by"].startswith("speccompile train-head --arch mtp --stages vocab")
    _warm_start_reads_the_exported_head(hf, out)
    earlier = tmp_path / "earlier.safetensors"  # a warm start's head: its vocabulary kept beside the new data's
    earlier.write_bytes(out.read_bytes())
    train_head(common + ["--stages", "vocab", "--draft-vocab", "8", "--draft-vocab-keep", str(earlier)])
    with safe_open(str(out), "np") as f:
        kept = f.get_tensor("mtp.d2t")
    assert set(d2t) <= set(kept) and (kept[1:] > kept[:-1]).all()
    assert json.load(open(str(out)[:-len(".safetensors")] + ".json"))["draft_vocabulary"]["made_by"].endswith(
        "--draft-vocab-keep earlier.safetensors")
    bundle = str(tmp_path / "bundle")
    build_bundle("tiny:llama", bundle, drafts=[f"mtp:{out}"], max_seq_len=128, num_draft=3, progress=quiet)
    import speccompile
    g = speccompile.load(bundle, threads=1)
    assert_lossless(g, "mtp", random_prompts(2), 16)
    assert_lossless(g, "mtp", random_prompts(2, seed=1), 16, "dynamic:6")

    medusa = tmp_path / "medusa" / "heads.safetensors"
    rec = _train_medusa(hf, work, medusa, "--epochs", "4", "--lr", "3e-3")
    assert rec["steps"] > 1 and len(rec["heldout"]["top1_per_head"]) == 2
    first, last = rec["train_loss_first_last"]
    assert last < 0.9 * first  # the heads fit the target's distributions (a tiny model's data is too small to hold out)
    again = _train_medusa(hf, work, tmp_path / "medusa2" / "heads.safetensors", "--epochs", "1", "--lr", "1e-3",
                          "--init", str(medusa))
    assert again["train_loss_first_last"][0] < 0.9 * first  # --init: it starts where the first run ended
    mb = str(tmp_path / "medusa_bundle")
    build_bundle("tiny:llama", mb, drafts=[f"medusa:{medusa}"], max_seq_len=128, num_draft=2, progress=quiet)
    gm = speccompile.load(mb, threads=1)
    assert_lossless(gm, "medusa", random_prompts(2), 16)
    assert_lossless(gm, "medusa", random_prompts(2, seed=1), 16, "dynamic:4")


    # an EAGLE-1 head from the same features: its public layout, the training module equal to the reference
    # architecture written from SafeAILab's cnets1.py (tests/test_eagle.py), and lossless in a bundle
    exported, _ = _train_eagle(common, tmp_path, "eagle")
    assert sorted(exported) == sorted(EAGLE_NAMES.values())
    _check_eagle_module(hf, {k: v.astype(np.float32) for k, v in exported.items()})
    _decodes_losslessly(tmp_path, "eagle")

    # an EAGLE-3 head: the target's layer features (stage aux; tap 4 = the last layer's output before the norm)
    # equal those the compiled target graph is defined by, the module equals the cnets.py reference, the draft
    # vocabulary comes as d2t offsets, and the head decodes losslessly
    exported, output = _train_eagle(common, tmp_path, "eagle3", "--aux-layers", "4,1,2", "--draft-vocab", "200",
                                    "--unroll", "3", stages="aux,train,export")
    assert " ce3 " in output  # a third depth trained (EAGLE-3's training-time test)
    _check_aux_features(work, hf)
    assert sorted(exported) == sorted([*EAGLE3_NAMES.values(), "d2t", "t2d"])
    draft_ids = exported["d2t"] + np.arange(len(exported["d2t"]))
    assert 0 < len(draft_ids) <= 200 and (np.diff(draft_ids) > 0).all() and exported["t2d"].sum() == len(draft_ids)
    config = json.load(open(tmp_path / "eagle3" / "config.json"))
    assert config["eagle_aux_hidden_state_layer_ids"] == [1, 2, 4] and config["draft_vocab_size"] == len(draft_ids)
    _check_eagle_module(hf, {k: v.astype(np.float32) for k, v in exported.items() if k not in ("d2t", "t2d")},
                        "eagle3", draft_ids)
    _decodes_losslessly(tmp_path, "eagle3")


def _warm_start_reads_the_exported_head(hf, out) -> None:
    """--init from an exported MTP head file (draft vocabulary included): its tensors, not a fresh start; a file of
    another layout is refused by name."""
    import torch
    from safetensors import safe_open
    from speccompile.train.init import init_head, load_weights
    from speccompile.train.target import target_config, target_tensors
    cfg = target_config(str(hf))
    fresh, warm = Head(cfg, 1e-5), Head(cfg, 1e-5)
    init_head(fresh, target_tensors(str(hf)), cfg["num_hidden_layers"], 1.0)
    load_weights(warm, str(out))
    with safe_open(str(out), "pt") as f:
        for k, name in warm.names.items():
            assert torch.equal(getattr(warm, k), f.get_tensor(name).float()), name
    assert not torch.equal(warm.eh_proj, fresh.eh_proj)
    with pytest.raises(CheckpointError, match="not a eagle head of this layout"):
        load_weights(Head(cfg, 1e-5, "eagle", wfinal=np.ones(cfg["hidden_size"])), str(out))


def _train_medusa(hf, work, out, *args) -> dict:
    """Train two Medusa heads on work's features into OUT; their record."""
    train_head(["--arch", "medusa", "--target", str(hf), "--work", str(work), "--out", str(out), "--stages",
                "train,export", "--heads", "2", "--tokens-per-step", "64", "--threads", "1", *args])
    return json.load(open(str(out)[:-len(".safetensors")] + ".json"))


def _train_eagle(common, tmp_path, version, *args, stages="train,export"):
    """Train one epoch of an EAGLE head into tmp_path/VERSION (the public layout's three files); (its tensors, the
    command's output)."""
    from safetensors import safe_open
    out = tmp_path / version
    output = train_head(common + ["--arch", version, "--out", str(out), "--stages", stages, "--epochs", "1", *args])
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "training.json"]
    with safe_open(str(out / "model.safetensors"), "np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, output


def _decodes_losslessly(tmp_path, version):
    """The head in tmp_path/VERSION, built into a bundle, decodes as the target does, as a chain and a tree."""
    import speccompile
    bundle = str(tmp_path / f"{version}_bundle")
    build_bundle("tiny:llama", bundle, drafts=[f"{version}:{tmp_path / version}"], max_seq_len=128, num_draft=3,
                 progress=quiet)
    g = speccompile.load(bundle, threads=1)
    assert_lossless(g, version, random_prompts(2), 16)
    assert_lossless(g, version, random_prompts(2, seed=1), 16, "dynamic:6")


def _check_aux_features(work, hf):
    """stage aux's features of one sequence == test_eagle.target_features (transformers' layer inputs; tap L the
    pre-norm output), float16-rounded."""
    from test_eagle import target_features
    feats, aux = np.load(work / "features.npz"), np.load(work / "aux.npz")
    n = int(feats["offsets"][1])
    want = target_features(load_checkpoint(str(hf)), work / "ref", feats["tokens"][:n])
    ref = np.concatenate([want[i] for i in (1, 2, 4)], -1)
    got = aux["aux"][:n].astype(np.float32)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < 2e-3 * max(1.0, np.abs(ref).max())


def _check_eagle_module(hf, exported, version="eagle", draft_ids=None):
    """The training module, loaded with the exported weights, against tests/test_eagle.py's reference (written
    from SafeAILab's cnets1.py / cnets.py): the head's feature, its output and its logits over one pass of
    (target feature, next token) pairs; EAGLE-3's greedy drafts mapped to target ids through its vocabulary."""
    import torch
    from test_eagle import torch_eagle_reference
    target = load_checkpoint(str(hf))
    cfg = json.load(open(hf / "config.json"))
    emb = torch.as_tensor(target.tensors["model.embed_tokens.weight"])
    head = Head(cfg, float(cfg["rms_norm_eps"]), version, torch.as_tensor(target.tensors["model.norm.weight"]),
                draft_ids)
    head.load_state_dict({k: torch.as_tensor(exported[n]) for k, n in head.names.items()})
    rng = np.random.default_rng(0)
    S, H = 7, cfg["hidden_size"]
    # EAGLE-1 reads the pre-norm residual stream, EAGLE-3 three layers of it
    h = rng.standard_normal((S, 3 * H if version == "eagle3" else H)).astype(np.float32) * 3
    tokens = rng.integers(0, cfg["vocab_size"], S)
    with torch.no_grad():
        f = head.feature(torch.as_tensor(h))
        pos = torch.arange(S)
        x, z = head.fuse(emb[torch.as_tensor(tokens)], f)
        q, k, v = head.qkv(x, pos)
        o = head.block(z, q, [k], [v], pos[None, :] <= pos[:, None])
        logits, drafted = head.logits(o, emb), head.draft(o, emb)
    if version == "eagle3":
        assert np.allclose(f.numpy(), h @ exported["fc.weight"].T, atol=1e-4)
    ref_logits, ref_out = torch_eagle_reference(version, target.config, target.tensors, exported, f.numpy(), tokens,
                                                np.arange(S))
    assert np.abs(o.numpy() - ref_out).max() < 1e-4 * max(1.0, np.abs(ref_out).max())
    assert np.abs(logits.numpy() - ref_logits).max() < 1e-4 * max(1.0, np.abs(ref_logits).max())
    ids = np.arange(cfg["vocab_size"]) if draft_ids is None else draft_ids
    assert (drafted.numpy() == ids[ref_logits.argmax(-1)]).all()


def test_help_explains_every_stage():
    result = CliRunner().invoke(cli, ["train-head", "--help"])
    assert result.exit_code == 0
    for stage in ("gen", "features", "aux", "train", "export", "vocab"):
        assert f"\n    {stage} " in result.output
    assert "--resume" in result.output and "--init" in result.output and 'pip install "speccompile[train]"' in \
        result.output


def test_command_defaults_are_the_options_defaults(monkeypatch):
    """What `train-head` passes when given nothing equals TrainOptions' own defaults, for every arch."""
    seen = []
    monkeypatch.setattr("speccompile.train.pipeline.run", seen.append)
    for arch in ("mtp", "eagle", "eagle3", "medusa"):
        out = [] if arch == "mtp" else ["--out", "head.safetensors"]  # the shipped head is an MTP head
        result = CliRunner().invoke(cli, ["train-head", "--arch", arch, *out])
        assert result.exit_code == 0, result.output
        assert seen[-1] == TrainOptions(arch=arch, **({"out": out[1]} if out else {}))
    defaults = {f.name: f.default for f in dataclasses.fields(TrainOptions)}
    assert {k for k, v in defaults.items() if v is None} >= set(ARCH_DEFAULTS["medusa"])
    assert seen[-1].lr == ARCH_DEFAULTS["medusa"]["lr"] and seen[0].epochs == 4


def test_without_torch_one_error_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    for name in [m for m in sys.modules if m.startswith("speccompile.train.") and m != "speccompile.train.options"]:
        monkeypatch.delitem(sys.modules, name)
    result = CliRunner().invoke(cli, ["train-head", "--stages", "gen"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        'error: training needs torch, which is not installed: pip install "speccompile[train]"']


def test_bad_options_one_error_line():
    result = CliRunner().invoke(cli, ["train-head", "--stages", "gen,fetaures"])
    assert result.exit_code == 2 and result.output.startswith("error: --stages: unknown fetaures")
    result = CliRunner().invoke(cli, ["train-head", "--epochs", "1.5"])
    assert result.exit_code == 2 and "--epochs: a whole number" in result.output
    for option in ("--init", "--gen-bundle", "--draft-vocab-keep"):  # refused before any stage's work
        result = CliRunner().invoke(cli, ["train-head", option, "/nonexistent/x"])
        assert result.exit_code == 2 and result.output == f"error: {option} /nonexistent/x: no such file or directory\n"
    result = CliRunner().invoke(cli, ["train-head", "--arch", "medusa", "--resume", "--out", "h.safetensors"])
    assert result.exit_code == 2 and result.output.startswith("error: --resume: Medusa training keeps no checkpoints")
    for args in (["--arch", "medusa"], ["--target", "tiny:llama"]):  # never into the shipped SmolLM2 MTP head
        result = CliRunner().invoke(cli, ["train-head", *args])
        assert result.exit_code == 2 and result.output.startswith("error: --out is required")


SMALL = ["--num-prompts", "0", "--max-new-tokens", "12", "--gen-batch", "3", "--tokens-per-step", "48", "--threads",
         "1", "--holdout", "0.2"]


def refused(args: list[str], *words: str) -> str:
    """`speccompile train-head ARGS` fails with one `error:` line holding `words` (exit 2, never an internal error);
    that line."""
    result = CliRunner().invoke(cli, ["train-head", *args])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "internal error" not in errors[0], result.output
    assert all(w in errors[0] for w in words), errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny target (hf), prompts, and a --work after gen, features and one epoch of an MTP head; tests copy the
    work dir (fresh_work)."""
    root = tmp_path_factory.mktemp("trained")
    save_hf_dir(load_checkpoint("tiny:llama"), str(root / "hf"))
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"tell me about thing number {i}"}) + "\n"
                                                for i in range(5)))
    train_head(["--target", str(root / "hf"), "--work", str(root / "work"), "--prompts", str(root / "prompts.jsonl"),
                *SMALL, "--stages", "gen,features,train", "--epochs", "1"])
    return root


def fresh_work(trained, tmp_path, name="work") -> tuple[list[str], "os.PathLike"]:
    """A copy of the trained work dir: (the options naming the target, it and the prompts; its path)."""
    import shutil
    shutil.copytree(trained / "work", tmp_path / name)
    return ["--target", str(trained / "hf"), "--work", str(tmp_path / name), "--prompts",
            str(trained / "prompts.jsonl"), *SMALL], tmp_path / name


def _files(folder) -> dict:
    """What a folder holds: its files' bytes, its subfolders' contents."""
    return {n: _files(folder / n) if (folder / n).is_dir() else (folder / n).read_bytes()
            for n in sorted(os.listdir(folder))}


def test_out_refused_before_any_work(tmp_path):
    """--out is never the target, the work dir, a folder other than an earlier EAGLE export, a folder for a head
    file, or FILE.json (the record would overwrite the weights): refused before any stage, nothing written."""
    hf, work = tmp_path / "hf", tmp_path / "work"
    save_hf_dir(load_checkpoint("tiny:llama"), str(hf))
    model = _files(hf)
    base = ["--target", str(hf), "--work", str(work), "--stages", "gen,features,train,export"]
    for arch in ("eagle", "eagle3", "mtp"):
        refused(base + ["--arch", arch, "--out", str(hf)], "is the target")
    refused(base + ["--arch", "mtp", "--out", str(hf / "model.safetensors")], "inside its folder")  # its weights
    refused(base + ["--arch", "eagle", "--out", str(work)], "--work")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.json").write_text("{}")
    refused(base + ["--arch", "eagle3", "--out", str(tmp_path / "mine")], "not an earlier export")
    refused(base + ["--arch", "mtp", "--out", str(tmp_path / "mine")], "is a folder")
    for arch in ("mtp", "medusa"):
        refused(base + ["--arch", arch, "--out", str(tmp_path / "head.json")], "FILE.json")
    assert _files(hf) == model and _files(tmp_path / "mine") == {"config.json": b"{}"} and not work.exists()


def test_export_replaces_only_an_earlier_export_and_whole(trained, tmp_path, monkeypatch):
    """An EAGLE head's folder is replaced by the next export into it; an export that fails while writing (a full
    disk) leaves the earlier head as it was and no temporary files, with one error line."""
    import errno
    common, work = fresh_work(trained, tmp_path)
    out, mtp = tmp_path / "eagle", tmp_path / "heads" / "mtp.safetensors"
    train_head(common + ["--arch", "mtp", "--out", str(mtp), "--stages", "export"])
    train_head(common + ["--arch", "eagle", "--out", str(out), "--stages", "train,export", "--epochs", "1"])
    train_head(common + ["--arch", "eagle", "--out", str(out), "--stages", "export"])
    earlier, earlier_mtp = _files(out), _files(mtp.parent)
    assert sorted(earlier) == ["config.json", "model.safetensors", "training.json"]

    def disk_full(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr("speccompile.train.export.save_file", disk_full)
    refused(common + ["--arch", "eagle", "--out", str(out), "--stages", "export"], "cannot write", "No space left")
    train_head(common + ["--arch", "mtp", "--stages", "train", "--epochs", "1"])
    refused(common + ["--arch", "mtp", "--out", str(mtp), "--stages", "export"], "cannot write", "No space left")
    assert _files(out) == earlier and _files(mtp.parent) == earlier_mtp  # no temporary file left either
    assert sorted(os.listdir(tmp_path)) == ["eagle", "heads", "work"]


def test_checkpoints_are_safetensors_and_another_heads_are_refused(trained, tmp_path):
    """Checkpoints are safetensors; --init takes safetensors only (a pickle is refused by name, never loaded);
    --init / --resume from another arch, target or head count is one error line naming what differs."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    common, work = fresh_work(trained, tmp_path)
    ck = work / "ckpt"
    assert sorted(os.listdir(ck)) == ["epoch1.safetensors", "final.safetensors"]
    mtp = common + ["--arch", "mtp", "--stages", "train", "--epochs", "2"]
    (tmp_path / "head.pt").write_bytes(b"\x80\x04")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    for name in ("head.pt", "pytorch_model.bin"):
        refused(mtp + ["--init", str(tmp_path / name)], "pickled checkpoints are refused")
    refused(mtp + ["--init", str(work / "features.npz")], "a .safetensors file only")
    eagle = common + ["--arch", "eagle", "--stages", "train", "--epochs", "2"]
    refused(eagle + ["--resume"], "epoch1.safetensors", "a checkpoint of an mtp head, not eagle")
    refused(eagle + ["--init", str(ck / "final.safetensors")], "a checkpoint of an mtp head, not eagle")
    save_file({name: torch.zeros(3) for name in HEAD_TENSORS}, str(tmp_path / "other.safetensors"))
    refused(mtp + ["--init", str(tmp_path / "other.safetensors")], "mtp.enorm.weight has shape (3,)", "needs (64,)")
    with safe_open(str(ck / "epoch1.safetensors"), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    save_file(tensors, str(ck / "epoch1.safetensors"),
              metadata={**meta, "head": json.dumps({**json.loads(meta["head"]), "hidden_size": 32})})
    refused(mtp + ["--resume"], "trained for hidden_size 32, this run's is 64")
    (ck / "epoch1.safetensors").write_bytes((ck / "epoch1.safetensors").read_bytes()[:5000])  # truncated
    refused(mtp + ["--resume"], "epoch1.safetensors: not a readable safetensors file")
    H = 64
    two = {f"{k}.0.linear.{p}": torch.zeros((H, H) if p == "weight" else (H,)) for k in range(2)
           for p in ("weight", "bias")}
    save_file(two, str(tmp_path / "medusa2.safetensors"))
    medusa = common + ["--arch", "medusa", "--stages", "train", "--out", str(tmp_path / "m.safetensors")]
    refused(medusa + ["--heads", "3", "--init", str(tmp_path / "medusa2.safetensors")],
            "holds 2 Medusa heads, not the 3 of --heads")
    refused(medusa + ["--init", str(ck / "final.safetensors")], "not a Medusa heads file")
    refused(medusa + ["--init", str(tmp_path / "head.pt")], "pickled checkpoints are refused")
    assert not (tmp_path / "m.safetensors").exists()


def test_nothing_in_the_package_unpickles():
    """docs/guarantees.md: nothing is unpickled (no torch.load, pickle or numpy allow_pickle anywhere)."""
    import pathlib
    root = pathlib.Path(__file__).resolve().parents[1] / "speccompile"
    found = [f"{p}: {w}" for p in root.rglob("*.py") for w in ("torch.load(", "pickle.load", "allow_pickle=True")
             if w in p.read_text()]
    assert not found


def test_a_fresh_run_starts_over(trained, tmp_path):
    """A run without --resume removes an earlier run's epoch checkpoints: a later --resume continues this run,
    not the earlier one's later epochs."""
    common, work = fresh_work(trained, tmp_path)
    mtp = common + ["--arch", "mtp", "--stages", "train"]
    train_head(mtp + ["--epochs", "2"])
    assert sorted(os.listdir(work / "ckpt")) == ["epoch1.safetensors", "epoch2.safetensors", "final.safetensors"]
    train_head(mtp + ["--epochs", "1", "--lr", "5e-4"])
    assert sorted(os.listdir(work / "ckpt")) == ["epoch1.safetensors", "final.safetensors"]
    assert "resumed from epoch1.safetensors (epoch 1," in train_head(mtp + ["--epochs", "3", "--resume"])


def test_failed_writes_leave_no_half_file(trained, tmp_path, monkeypatch):
    """A features or checkpoint write that fails (a full disk) is one error line and leaves no truncated file that
    a later run would skip its stage for or resume from; the next run does the work."""
    import errno
    from safetensors import SafetensorError
    common, work = fresh_work(trained, tmp_path)
    os.remove(work / "features.npz")

    def half_npz(f, **arrays):
        f.write(b"PK\x03\x04" + b"\0" * 100)
        raise OSError(errno.EFBIG, "File too large")
    with monkeypatch.context() as m:
        m.setattr(np, "savez", half_npz)
        refused(common + ["--stages", "features"], "cannot write", "features.npz", "File too large")
    assert sorted(os.listdir(work)) == ["ckpt", "gen.jsonl", "info.json"]
    train_head(common + ["--stages", "features,train", "--epochs", "1"])
    assert np.load(work / "features.npz")["tokens"].size

    def failed_checkpoint(tensors, metadata=None):
        raise SafetensorError("Error while serializing: I/O error: File too large (os error 27)")
    with monkeypatch.context() as m:
        m.setattr("speccompile.train.checkpoints.safetensors_bytes", failed_checkpoint)
        refused(common + ["--stages", "train", "--epochs", "2", "--resume"], "cannot write", "epoch2.safetensors")
    assert sorted(os.listdir(work / "ckpt")) == ["epoch1.safetensors", "final.safetensors"]
    assert "resumed from epoch1.safetensors" in train_head(common + ["--stages", "train", "--epochs", "2", "--resume"])


def test_extra_features_of_another_target_refused(trained, tmp_path):
    """--extra-features of another target (or untagged, from an older version) and a --work whose features are
    another target's are refused before training; EAGLE-3's layer features of an extra file go into this
    --work, never into the other one."""
    common, work = fresh_work(trained, tmp_path)
    _, other = fresh_work(trained, tmp_path, "other")
    features = dict(np.load(other / "features.npz"))
    mtp = common + ["--arch", "mtp", "--stages", "train", "--epochs", "1"]
    np.savez(other / "features.npz", **{**features, "target": np.asarray("0" * 64)})
    refused(mtp + ["--extra-features", str(other / "features.npz")], "features of another target")
    np.savez(other / "features.npz", **{k: v for k, v in features.items() if k != "target"})
    refused(mtp + ["--extra-features", str(other / "features.npz")], "record no target")
    np.savez(work / "features.npz", **{**features, "target": np.asarray("0" * 64)})
    refused(mtp, "another target", "--redo features")
    np.savez(work / "features.npz", **features)
    _, same = fresh_work(trained, tmp_path, "same")
    before = _files(same)
    train_head(common + ["--arch", "eagle3", "--aux-layers", "0,1,2", "--out", str(tmp_path / "e3"), "--stages",
                         "aux,train,export", "--epochs", "1", "--extra-features", str(same / "features.npz")])
    assert _files(same) == before
    assert len([n for n in os.listdir(work) if n.startswith("aux")]) == 2


def test_prompt_set_unchanged():
    """The default prompt set (data/prompt_pools.json) is the one the shipped head's data was drawn by: the same
    600 prompts for seed 0 as the former tools/head_prompts.py made them, distinct."""
    prompts = make_prompts(600, 0)
    assert len(set(prompts)) == 600
    assert hashlib.sha256(json.dumps(prompts).encode()).hexdigest() == \
        "3f21c4ffeb96047c74535edbba981a7980a6723601680a79cf795de1572c3c76"


def test_reading_prompts_mix_every_kind_distinct_and_repeatable():
    """The reading mix: distinct prompts, the same for a seed, its translation, reading, RAG and essay kinds all
    present, and the first mix's share drawn from make_prompts."""
    prompts = reading_prompts(400, 5)
    assert prompts == reading_prompts(400, 5) and len(set(prompts)) == len(prompts) >= 390
    assert prompts != reading_prompts(400, 6)
    first = set(make_prompts(400, 6))
    assert abs(sum(p in first for p in prompts) - 400 * READING_WEIGHTS["mix"]) <= 2
    assert sum(p.startswith("Translate") or "English" in p for p in prompts) >= 400 * READING_WEIGHTS["translate"] - 2
    assert sum("Document 1:" in p or "[1] " in p for p in prompts) >= 30  # RAG over several documents


def test_gen_with_a_bundle_writes_the_same_greedy_answers_as_transformers(tmp_path):
    """--gen-bundle: the runtime's speculative, batched decoding writes the continuations transformers' greedy
    generate writes, in the same records; a prompt leaving the bundle no room is skipped."""
    hf, bundle = tmp_path / "hf", str(tmp_path / "bundle")
    save_hf_dir(load_checkpoint("tiny:llama"), str(hf))
    build_bundle("tiny:llama", bundle, drafts=["lookup"], max_seq_len=64, num_draft=3, progress=quiet)
    prompts = tmp_path / "prompts.jsonl"
    items = [f"tell me about thing number {i}" for i in range(5)] + ["word " * 80]  # the last: over 64 tokens
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in items))
    records = {}
    for name, extra in (("hf", []), ("bundle", ["--gen-bundle", bundle])):
        work = tmp_path / name
        train_head(["--target", str(hf), "--work", str(work), "--prompts", str(prompts), "--num-prompts", "0",
                    "--max-new-tokens", "12", "--gen-batch", "3", "--sample-frac", "0", "--threads", "1",
                    "--stages", "gen", *extra])
        records[name] = {r["idx"]: r for r in map(json.loads, open(work / "gen.jsonl"))}
    assert sorted(records["hf"]) == list(range(6)) and sorted(records["bundle"]) == list(range(5))
    for i, r in records["bundle"].items():
        assert r["prompt_ids"] == records["hf"][i]["prompt_ids"]
        assert r["response_ids"] == records["hf"][i]["response_ids"], i
    info = json.load(open(tmp_path / "bundle" / "info.json"))
    assert info["gen_rounds"][0]["generator"].startswith("speccompile runtime on bundle bundle")


def test_magpie_by_a_bundle_keeps_whole_user_turns(tmp_path, monkeypatch):
    """Magpie sampling through a compiled bundle: a kept user turn is the text before the end-of-turn token, rows
    that never ended are dropped, and a target that seldom ends a turn makes the run give up rather than loop."""
    from transformers import AutoTokenizer

    from speccompile.train import prompts as magpie_prompts
    hf, bundle = tmp_path / "hf", str(tmp_path / "bundle")
    save_hf_dir(load_checkpoint("tiny:llama"), str(hf))
    build_bundle("tiny:llama", bundle, drafts=["lookup"], max_seq_len=256, num_draft=3, progress=quiet)
    tok = AutoTokenizer.from_pretrained(str(hf))
    bundle_sample, sampled = magpie_prompts._bundle_sampler(bundle, 1), []

    def sample(*args):
        sampled.extend(bundle_sample(*args))
        return sampled[-args[1]:]
    magpie_prompts._user_turns(tok, sample, None, 8, 24, seed=3)
    rows = list(sampled)
    # the tiny random target never writes its end-of-turn token: one of its sampled tokens stands in for it
    end = next(t for row in rows[::-1] for t in row if sum(t in r for r in rows) < len(rows))
    monkeypatch.setattr(magpie_prompts, "_turn_end", lambda _tok: end)
    turns = magpie_prompts._user_turns(tok, sample, None, 8, 24, seed=3)
    assert sampled[-8:] == rows  # the same seed, the same rows
    assert 0 < sum(t is not None for t in turns) < 8
    for turn, row in zip(turns, rows):
        assert turn == (tok.decode(row[:row.index(end)], skip_special_tokens=True).strip() if end in row else None)
    monkeypatch.undo()
    out = tmp_path / "magpie.jsonl"
    kept = magpie_prompts.magpie(str(hf), 3, str(out), batch=4, max_tokens=3, log=lambda _: None, bundle=bundle,
                                 threads=1)
    assert kept == 0 and not out.read_text()  # it never ends a turn: given up after its tries


def test_deepseek_target_refused_but_for_medusa(tmp_path):
    """An MTP or EAGLE head's layer starts as the target's last one, a grouped-query layer: a DeepSeek-V3 target
    (multi-head latent attention) is refused before any work, with its own MTP module named (it was an internal
    error once gen and features had run)."""
    from speccompile.compile.presets import tiny_deepseek_checkpoint
    hf, work = tmp_path / "hf", tmp_path / "work"
    tiny_deepseek_checkpoint(str(hf), 24)
    base = ["--target", str(hf), "--work", str(work), "--out", str(tmp_path / "head"), *SMALL]
    for arch in ("mtp", "eagle", "eagle3"):
        refused(base + ["--arch", arch], "multi-head latent attention", "mtp:CHECKPOINT_DIR", "--arch medusa")
    assert not work.exists()
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "tell me about a thing"}) + "\n")
    train_head(base + ["--arch", "medusa", "--out", str(tmp_path / "medusa.safetensors"), "--prompts",
                       str(tmp_path / "prompts.jsonl"), "--heads", "2", "--epochs", "1"])
    assert (tmp_path / "medusa.safetensors").is_file()
