"""`speccompile train-head` on a user's inputs and interrupted runs: a prompt file checked line by line before any
stage, a gen.jsonl cut off by a killed run resumed, features that follow what gen added, a target whose attention
no head block has refused before any work, stage vocab only over an MTP head, and heads of a target with another
vocabulary refused at build."""
import dataclasses
import json
import os

import numpy as np
import pytest

from speccompile.compile.driver import build_bundle
from speccompile.compile.sources import load_checkpoint, save_hf_dir
from speccompile.errors import CheckpointError

from conftest import quiet

pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_train_head import SMALL, fresh_work, refused, train_head, trained  # noqa: E402,F401

BAD_PROMPT_FILES = {  # contents -> what the error line says
    b"": "no prompts",
    b"\n  \n\n": "no prompts",
    b'{"prompt": "fine"}\n{"prompt": "cut\n': "line 2: starts with '{' but is not valid JSON",
    b'{"text": "no prompt key"}\n': "line 1: a JSON line is",
    b'{"prompt": 5}\n': "line 1: a JSON line is",
    b'{"messages": "hello"}\n': "line 1: a JSON line is",
    b'{"messages": [{"role": "user"}]}\n': "line 1: a JSON line is",
    b"caf\xe9 au lait\n": "not UTF-8 text",
}


def test_prompt_file_checked_before_any_work(tmp_path):
    """A bad --prompts file is one error line naming the file (and the line), before the target is even read."""
    for i, (content, words) in enumerate(BAD_PROMPT_FILES.items()):
        path = tmp_path / f"prompts{i}.jsonl"
        path.write_bytes(content)
        work = tmp_path / f"work{i}"
        refused(["--target", "tiny:llama", "--work", str(work), "--prompts", str(path), "--out",
                 str(tmp_path / "h.safetensors")], f"--prompts {path}", words)
        assert not work.exists()


def test_prompt_file_formats(tmp_path):
    from speccompile.train.prompts import read_prompt_file
    path = tmp_path / "p.txt"
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "and?"}]
    path.write_bytes("\ufeffplain text prompt\n\n".encode() + json.dumps({"prompt": "a json one"}).encode() +
                     b"\r\n" + json.dumps({"messages": chat}).encode() + b"\n   indented text  \n")
    assert read_prompt_file(str(path)) == ["plain text prompt", "a json one", chat, "indented text"]


def test_gen_resumes_after_a_run_killed_mid_line(trained, tmp_path):
    """A run killed while writing gen.jsonl leaves a cut-off last line: the next run drops it, generates that
    prompt again, and the features stage sees every prompt once."""
    args, work = fresh_work(trained, tmp_path)
    whole = (work / "gen.jsonl").read_bytes()
    (work / "gen.jsonl").write_bytes(whole[:-40])
    train_head(args + ["--stages", "gen,features", "--redo", "features"])
    records = [json.loads(line) for line in open(work / "gen.jsonl")]
    assert sorted(r["idx"] for r in records) == list(range(5))
    assert sorted(np.load(work / "features.npz")["prompt_idx"].tolist()) == list(range(5))


def test_features_follow_what_gen_added(trained, tmp_path):
    """A second gen run over more prompts adds sequences: the features stage runs again over all of them (not
    skipped because features.npz exists), and a run that generates nothing records no round of data."""
    hf, prompts, work = trained / "hf", trained / "prompts.jsonl", tmp_path / "work"
    common = ["--target", str(hf), "--work", str(work), "--prompts", str(prompts), *SMALL, "--stages",
              "gen,features", "--out", str(tmp_path / "h.safetensors")]
    train_head(common + ["--num-prompts", "2"])
    assert np.load(work / "features.npz")["prompt_idx"].tolist() == [0, 1]
    train_head(common)  # SMALL's --num-prompts 0: all five
    assert np.load(work / "features.npz")["prompt_idx"].tolist() == list(range(5))
    train_head(common)
    assert len(json.load(open(work / "info.json"))["gen_rounds"]) == 2


def test_mla_target_refused_before_any_work(tmp_path):
    """MTP and EAGLE heads are Llama blocks started from the target's last layer, which DeepSeek-V3's latent
    attention is not: refused before gen (never an internal error after hours of data); Medusa heads are not."""
    from speccompile.compile.presets import tiny_deepseek_checkpoint
    ds = tmp_path / "ds"
    tiny_deepseek_checkpoint(str(ds))
    for arch in ("mtp", "eagle", "eagle3"):
        work = tmp_path / f"work-{arch}"
        refused(["--target", str(ds), "--work", str(work), "--arch", arch, "--out", str(tmp_path / f"{arch}-head")],
                f"--arch {arch}", "multi-head latent attention")
        assert not (work / "gen.jsonl").exists()


def test_vocab_stage_rewrites_only_an_mtp_head(trained, tmp_path):
    args, _ = fresh_work(trained, tmp_path)
    from safetensors.numpy import save_file
    other = tmp_path / "medusa.safetensors"
    save_file({"0.0.linear.weight": np.zeros((4, 4), np.float32)}, str(other))
    before = other.read_bytes()
    refused(args + ["--stages", "vocab", "--out", str(other)], "not an MTP head")
    assert other.read_bytes() == before
    refused(args + ["--stages", "vocab", "--out", str(tmp_path / "none.safetensors")], "no MTP head there")


def _target_of_another_vocabulary(path) -> None:
    """tiny:llama with 128 more token rows (another tokenizer's vocabulary), same hidden size."""
    ck = load_checkpoint("tiny:llama")
    tensors = dict(ck.tensors)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in tensors:
            tensors[name] = np.concatenate([tensors[name], tensors[name][:128]])
    save_hf_dir(dataclasses.replace(ck, config=dataclasses.replace(ck.config, vocab_size=ck.config.vocab_size + 128),
                                    tensors=tensors), str(path))


def test_head_of_another_vocabulary_refused_at_build(trained, tmp_path):
    """Heads hold no tensor of the vocabulary's size (MTP, EAGLE-1): what they record of their target's is checked
    at build, one error naming both sizes; the record names the target the head was trained for."""
    args, _ = fresh_work(trained, tmp_path)
    mtp, eagle = tmp_path / "mtp.safetensors", tmp_path / "eagle"
    train_head(args + ["--stages", "export", "--out", str(mtp)])
    train_head(args + ["--arch", "eagle", "--stages", "train,export", "--epochs", "1", "--out", str(eagle)])
    assert json.load(open(tmp_path / "mtp.json"))["target"] == "hf"  # the --target's folder, not SmolLM2's
    other = tmp_path / "other"
    _target_of_another_vocabulary(other)
    for kind, spec in (("mtp", f"mtp:{mtp}"), ("eagle", f"eagle:{eagle}")):
        with pytest.raises(CheckpointError, match="vocabulary of 384 tokens.*has 512"):
            build_bundle(str(other), str(tmp_path / f"other-{kind}"), drafts=[spec], max_seq_len=64, progress=quiet)
        build_bundle(str(trained / "hf"), str(tmp_path / f"own-{kind}"), drafts=[spec], max_seq_len=64,
                     progress=quiet)  # its own target builds


def test_sigterm_stops_a_run_as_ctrl_c_does(trained, tmp_path):
    """A kill (SIGTERM) mid-run exits through the run's cleanup (status 143, not death by the signal): no temporary
    file is left in --work."""
    import signal
    import subprocess
    import sys
    import time
    args, work = fresh_work(trained, tmp_path)
    (work / "gen.jsonl").unlink()
    many = tmp_path / "many.jsonl"
    many.write_text("".join(json.dumps({"prompt": f"question {i}"}) + "\n" for i in range(2000)))
    cmd = [sys.executable, "-m", "speccompile.cli", "train-head", *args, "--prompts", str(many), "--gen-batch", "1",
           "--stages", "gen", "--out", str(tmp_path / "h.safetensors")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (work / "gen.jsonl").is_file():
        time.sleep(0.01)  # until gen writes
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr.read()
    assert not [n for n in os.listdir(work) if n.startswith(".")]


def test_resume_refuses_another_split_of_the_data(trained, tmp_path):
    """--resume with another --seed or --holdout would train on what the first epochs held out (and report held-out
    figures that are not): refused, naming what changed; the same settings continue."""
    args, _ = fresh_work(trained, tmp_path)
    train_head(args + ["--stages", "train", "--epochs", "1"])
    refused(args + ["--stages", "train", "--epochs", "2", "--resume", "--seed", "1"], "--resume", "seed 0 -> 1")
    refused(args + ["--stages", "train", "--epochs", "2", "--resume", "--holdout", "0.4"], "holdout 0.2 -> 0.4")
    assert "resumed from epoch1" in train_head(args + ["--stages", "train", "--epochs", "2", "--resume"])


def test_gen_bundle_of_another_model_refused(trained, tmp_path):
    """--gen-bundle must be a bundle of the target: one of another model would write its own text, in ids of its
    own vocabulary; refused before anything is generated."""
    args, work = fresh_work(trained, tmp_path)
    (work / "gen.jsonl").unlink()
    other = tmp_path / "other"
    _target_of_another_vocabulary(other)
    build_bundle(str(other), str(tmp_path / "b"), drafts=["lookup"], max_seq_len=64, progress=quiet)
    refused(args + ["--stages", "gen", "--gen-bundle", str(tmp_path / "b"), "--out", str(tmp_path / "h")],
            "--gen-bundle", "another model", "vocab_size 512, the target's 384")
    assert not (work / "gen.jsonl").exists()


def test_export_needs_a_trained_head(trained, tmp_path):
    """--stages export without a train stage's head (no final checkpoint, no epoch checkpoint for --resume, no
    --init) is one error line: it exported the head as initialized, recorded as trained."""
    import shutil
    args, work = fresh_work(trained, tmp_path)
    shutil.rmtree(work / "ckpt")
    out = tmp_path / "head" / "h.safetensors"
    refused(args + ["--stages", "export", "--out", str(out)], "holds no trained head")
    refused(args + ["--stages", "export", "--resume", "--out", str(out)], "holds no trained head")
    assert not out.parent.exists()
    train_head(args + ["--stages", "export", "--out", str(out), "--init",
                       str(trained / "work" / "ckpt" / "final.safetensors")])  # named weights: exported
    assert out.is_file()


def test_training_without_a_training_sequence_refused(trained, tmp_path):
    """A --holdout that leaves no sequence to train on is one error line (the run made no step and exported the
    head as initialized), and the earlier run's checkpoints stay."""
    args, work = fresh_work(trained, tmp_path)
    before = sorted(os.listdir(work / "ckpt"))
    refused(args + ["--stages", "train,export", "--holdout", "0.99", "--epochs", "1", "--out",
                    str(tmp_path / "h.safetensors")], "no sequence to train on", "--holdout 0.99")
    assert sorted(os.listdir(work / "ckpt")) == before and not (tmp_path / "h.safetensors").exists()


def test_exported_heads_have_the_mode_of_new_files(trained, tmp_path):
    """An exported head's weights are as readable as its record (the umask's mode): safetensors made them the
    owner's alone, so another user building with the head could not read it."""
    args, work = fresh_work(trained, tmp_path)
    umask = os.umask(0o022)
    try:
        mtp, eagle = tmp_path / "mtp.safetensors", tmp_path / "eagle"
        train_head(args + ["--stages", "export", "--out", str(mtp)])
        train_head(args + ["--arch", "eagle", "--stages", "train,export", "--epochs", "1", "--out", str(eagle)])
    finally:
        os.umask(umask)
    for path in (mtp, tmp_path / "mtp.json", eagle / "model.safetensors", eagle / "config.json"):
        assert os.stat(path).st_mode & 0o777 == 0o644, path


def test_gen_refuses_a_work_of_other_prompts(trained, tmp_path):
    """gen in a --work whose gen.jsonl answers another prompt set is one error line: it took this set's prompts at
    the same places for done and generated none of them."""
    args, work = fresh_work(trained, tmp_path)
    before = (work / "gen.jsonl").read_bytes()
    other = tmp_path / "other.txt"
    other.write_text("what is a cat\nwhat is a dog\n")
    refused(args + ["--stages", "gen", "--prompts", str(other)], "answers to other prompts", "another --work")
    assert (work / "gen.jsonl").read_bytes() == before


def test_eagle3_keeps_the_draft_vocabulary_of_its_weights(trained, tmp_path):
    """An EAGLE-3 head's lm_head rows are its draft vocabulary's tokens: an export from the final checkpoint, or a
    warm start, over other data (--extra-features) keeps that vocabulary; picked again from the new data, the
    rows were exported (or trained on) as other tokens'."""
    from safetensors.numpy import load_file
    args, work = fresh_work(trained, tmp_path)
    _, other = fresh_work(trained, tmp_path, "other")
    features = dict(np.load(other / "features.npz"))
    responses = np.arange(len(features["tokens"])) >= 0
    for j in range(len(features["offsets"]) - 1):
        responses[features["offsets"][j]:features["offsets"][j] + features["prompt_len"][j]] = False
    features["tokens"] = np.where(responses, 300 + np.arange(len(responses)) % 20, features["tokens"])
    np.savez(other / "features.npz", **features)  # the same target's, other answers: another vocabulary
    eagle3 = args + ["--arch", "eagle3", "--aux-layers", "0,1,2", "--draft-vocab", "16"]
    train_head(eagle3 + ["--stages", "aux,train,export", "--epochs", "1", "--out", str(tmp_path / "first")])
    first = load_file(str(tmp_path / "first" / "model.safetensors"))
    extra = ["--extra-features", str(other / "features.npz")]
    train_head(eagle3 + extra + ["--stages", "aux,export", "--out", str(tmp_path / "again")])
    again = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert (again["lm_head.weight"] == first["lm_head.weight"]).all() and (again["d2t"] == first["d2t"]).all()
    train_head(eagle3 + extra + ["--stages", "train,export", "--epochs", "1", "--init", str(tmp_path / "first"),
                                 "--out", str(tmp_path / "warm")])
    assert (load_file(str(tmp_path / "warm" / "model.safetensors"))["d2t"] == first["d2t"]).all()


@pytest.mark.parametrize("option", ["--log-every", "--unroll", "--eval-chain", "--gen-batch", "--tokens-per-step",
                                    "--topk", "--heads", "--draft-vocab"])
def test_zero_counts_refused_before_any_work(tmp_path, option):
    """A count of 0 is one error line before any stage: --log-every, --unroll and --eval-chain 0 failed as an
    internal error after the training they followed, --gen-batch 0 with range()'s message."""
    work = tmp_path / "work"
    refused(["--target", "tiny:llama", "--work", str(work), "--out", str(tmp_path / "h.safetensors"), "--stages",
             "train,export", option, "0"],
            f"{option}: out of range")
    assert not work.exists()


def test_a_target_conversion_stopped_midway_leaves_nothing_later_runs_refuse(tmp_path, monkeypatch):
    """The target's HF folder in --work is made whole or not at all: a run stopped while converting left a folder
    with weights but no record of their source, which every later run refused as '(unrecorded)'."""
    from speccompile.train import target
    work = tmp_path / "work"

    def stopped(ckpt, out):
        save_hf_dir(ckpt, out)
        raise KeyboardInterrupt
    monkeypatch.setattr(target, "save_hf_dir", stopped)
    with pytest.raises(KeyboardInterrupt):
        target.target_hf_dir("tiny:llama", str(work))
    assert os.listdir(work) == []
    monkeypatch.setattr(target, "save_hf_dir", save_hf_dir)
    d = target.target_hf_dir("tiny:llama", str(work))
    assert os.listdir(work) == ["target_hf"] and target.target_hf_dir("tiny:llama", str(work)) == d
