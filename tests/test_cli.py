"""The CLI contract that benchmarks and CI gates call."""
import json

from click.testing import CliRunner

from speccompile.cli import main


def run(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r.output


def test_build_inspect_generate(tmp_path):
    out = tmp_path / "b"
    run("build", "tiny:qwen2", "--out", out, "--draft", "lookup", "--draft", "layerskip:2", "--max-seq-len", 128,
        "--num-draft", 3)
    text = run("inspect", out)
    assert "layerskip:2" in text and "lookup" in text and "qwen2" in text and "verified" in text
    spec = json.loads(run("generate", out, "The quick brown fox", "--max-new-tokens", 20, "--json", "--drafter",
                          "layerskip:2"))
    plain = json.loads(run("generate", out, "The quick brown fox", "--max-new-tokens", 20, "--json",
                           "--no-speculate"))
    assert spec["token_ids"] == plain["token_ids"] and len(spec["token_ids"]) > 0
    for key in ("mean_accepted_tokens", "tokens_per_second", "verify_steps"):
        assert key in spec["stats"]
    assert plain["stats"]["mean_accepted_tokens"] == 1.0
    assert spec["stats"]["drafter"] == "layerskip:2" and plain["stats"]["drafter"] is None


def test_generate_streams_and_compares(tiny_bundle):
    out = run("generate", tiny_bundle, "Translate this sentence", "--max-new-tokens", 16, "--compare")
    assert "speedup" in out and "identical" in out


def test_sampling_is_seeded(tiny_bundle):
    a = json.loads(run("generate", tiny_bundle, "hello", "--temperature", 1.0, "--seed", 3, "--json"))
    b = json.loads(run("generate", tiny_bundle, "hello", "--temperature", 1.0, "--seed", 3, "--json"))
    assert a["token_ids"] == b["token_ids"]


def test_stop_string(tiny_bundle):
    full = json.loads(run("generate", tiny_bundle, "hello", "--max-new-tokens", 30, "--json", "--no-speculate"))
    text = full["text"]
    assert len(text) > 4
    stop = text[2:4]
    cut = json.loads(run("generate", tiny_bundle, "hello", "--max-new-tokens", 30, "--json", "--stop", stop))
    assert cut["text"] == text[:text.index(stop)]
