"""The CLI contract that benchmarks and CI gates call."""
import json
import shutil
import signal
import subprocess
import sys

import pytest
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



def test_inspect_names_every_input_and_output_of_the_target_graph(tiny_bundle):
    """inspect's inputs and outputs lines once stopped at the graph's first 5 inputs and 2 outputs, as if it had no
    others (the in-graph sampling and acceptance ones: node_parents, temperature, accept_len, ...)."""
    import os
    import re
    import onnx
    from speccompile.format.bundle import read_manifest
    target = read_manifest(tiny_bundle)["models"]["target"]
    graph = onnx.load(os.path.join(tiny_bundle, target["graph"]), load_external_data=False).graph
    lines = run("inspect", tiny_bundle).splitlines()
    for prefix, tensors, cache in (("inputs", graph.input, "past_"), ("outputs", graph.output, "present_")):
        line = next(line for line in lines if line.startswith(prefix + " "))
        names = [t.name for t in tensors if not t.name.startswith(cache)]
        assert len(names) < len(tensors) and sorted(re.findall(r"(\w+)\[", line)) == sorted(names), line
        assert line.endswith(f", {cache}key/value.0..{target['num_layers'] - 1}")


def test_generate_streams_and_compares(tiny_bundle):
    out = run("generate", tiny_bundle, "Translate this sentence", "--max-new-tokens", 16, "--compare")
    assert "speedup" in out and "identical" in out
    # the plain run beside it drafts nothing: the drafting options are the speculative run's alone
    out = run("generate", tiny_bundle, "Translate this sentence", "--max-new-tokens", 8, "--compare", "--drafter",
              "model", "--tree", "chain:3", "--temperature", 0.7, "--acceptance", "typical")
    assert "speedup" in out and "; seed " in out  # the seed both runs drew from, to run them again


def test_compare_speedup_is_tokens_per_second_over_plain():
    """--compare's speedup was a ratio of total times: two sampled answers of other lengths (typical acceptance
    against plain sampling) read as a speedup or a slowdown that neither decoding had."""
    from speccompile.cli.generate import _speedup
    spec = {"tokens_per_second": 20.0, "total_s": 1.0, "new_tokens": 20}
    plain = {"tokens_per_second": 10.0, "total_s": 1.0, "new_tokens": 10}
    assert _speedup(spec, plain) == 2.0
    assert _speedup(spec, {"tokens_per_second": 0.0, "total_s": 0.0, "new_tokens": 0}) == 0.0


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
    # why each answer ended, as the API's results and the server's choices say it
    assert (cut["finish_reason"], full["finish_reason"]) == ("stop", "length" if len(full["token_ids"]) == 30
                                                                       else "stop")
    kept = json.loads(run("generate", tiny_bundle, "hello", "--max-new-tokens", 30, "--json", "--ignore-eos"))
    assert len(kept["token_ids"]) == 30 and kept["finish_reason"] == "length"
    assert kept["token_ids"][:len(full["token_ids"])] == full["token_ids"]


def test_logprobs_in_the_json_output(tiny_bundle):
    out = json.loads(run("generate", tiny_bundle, "hello", "--max-new-tokens", 6, "--json", "--logprobs", 2))
    assert [e["token"] for e in out["logprobs"]] == out["token_ids"]
    assert all(e["logprob"] <= 0 and len(e["top"]) == 2 and e["top"][0][1] >= e["logprob"] for e in out["logprobs"])
    r = CliRunner().invoke(main, ["generate", str(tiny_bundle), "hello", "--logprobs", "2"])
    assert r.exit_code == 2 and r.output == "error: --logprobs 2: they are printed in --json's output: add --json\n"
    r = CliRunner().invoke(main, ["generate", str(tiny_bundle), "hello", "--json", "--logprobs", "21"])
    assert r.exit_code == 2 and "--logprobs 21" in r.output and len(r.output.splitlines()) == 1, r.output
    out = json.loads(run("generate", tiny_bundle, "hello", "--max-new-tokens", 3, "--json", "--prompt-logprobs", 1,
                         "--no-chat"))
    assert out["prompt_logprobs"][0] is None and all(e["logprob"] <= 0 for e in out["prompt_logprobs"][1:])
    r = CliRunner().invoke(main, ["generate", str(tiny_bundle), "hello", "--prompt-logprobs", "1"])
    assert r.exit_code == 2 and r.output.startswith("error: --prompt-logprobs 1: ") and "add --json" in r.output
    r = CliRunner().invoke(main, ["generate", str(tiny_bundle), "hello", "--json", "--prompt-logprobs", "-1"])
    assert r.exit_code == 2 and "--prompt-logprobs -1" in r.output and len(r.output.splitlines()) == 1, r.output


def test_stop_reads_escapes(tiny_bundle):
    """`--stop "\\n"` on a shell command line is a backslash and an n: read as the newline it means."""
    from speccompile.cli.generate_options import unescape_stop
    assert unescape_stop("a\\nb\\t\\\\n\\x") == "a\nb\t\\n\\x"
    full = json.loads(run("generate", tiny_bundle, "hello", "--max-new-tokens", 30, "--json"))["text"]
    assert "\n" in full, full  # the tiny model's answer has lines to stop at
    cut = json.loads(run("generate", tiny_bundle, "hello", "--max-new-tokens", 30, "--json", "--stop", "\\n"))
    assert cut["text"] == full[:full.index("\n")]


def test_generate_prints_the_answer_as_it_is(tiny_bundle, monkeypatch):
    """The text streamed to stdout is the answer's, escape sequences included: click.echo strips them where stdout
    is no terminal, so `generate ... > answer.txt` saved another text than the answer (and --json's)."""
    import speccompile
    load, text = speccompile.load, "a\x1b[31mred\x1b[0m b"

    def answering(*args, **kwargs):  # the tiny model, its answer this text
        gen = load(*args, **kwargs)
        generate = gen.generate

        def answer(prompt, max_new_tokens, on_text=None, **kw):
            res = generate(prompt, max_new_tokens, **kw)
            res.text = text
            if on_text:
                on_text(text)
            return res
        gen.generate = answer
        return gen
    monkeypatch.setattr(speccompile, "load", answering)
    r = CliRunner().invoke(main, ["generate", tiny_bundle, "hello", "--max-new-tokens", "2"])
    assert r.exit_code == 0 and r.stdout == text + "\n", r.output


def test_a_closed_stdout_ends_quietly(tiny_bundle):
    """`speccompile generate ... | head`: the reader gone, the command ends as Unix tools end on SIGPIPE, with no
    error line (its reader closed here before the first byte is written)."""
    proc = subprocess.Popen([sys.executable, "-m", "speccompile.cli", "generate", tiny_bundle, "hello",
                             "--max-new-tokens", "8", "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(120) == 128 + signal.SIGPIPE, err
    assert "error" not in err.lower() and "Exception" not in err, err


def test_ctrl_c_exits_130(tiny_bundle, monkeypatch):
    import speccompile

    def interrupted(*_, **__):
        raise KeyboardInterrupt
    monkeypatch.setattr(speccompile, "load", interrupted)
    r = CliRunner().invoke(main, ["generate", tiny_bundle, "hello"])
    assert r.exit_code == 128 + signal.SIGINT and "error: aborted" in r.output, r.output


def test_bad_numbers_are_one_error_line(tiny_bundle):
    for args in (["--temperature", "nan"], ["--temperature", "-1"], ["--top-p", "inf"], ["--top-k", "-3"],
                 ["--seed", "-1"], ["--max-new-tokens", "0"], ["--num-draft", "-2"]):
        r = CliRunner().invoke(main, ["generate", str(tiny_bundle), "hello", *args])
        assert r.exit_code == 2, (args, r.output)
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in r.output, (args, r.output)


def test_system_message(tiny_bundle):
    with_system = json.loads(run("generate", tiny_bundle, "hello", "--system", "Be brief.", "--max-new-tokens", 8,
                                 "--json"))
    plain = json.loads(run("generate", tiny_bundle, "hello", "--max-new-tokens", 8, "--json"))
    assert with_system["stats"]["prompt_tokens"] > plain["stats"]["prompt_tokens"]


@pytest.mark.parametrize("blocked, command", [
    (("onnx", "gguf", "safetensors"), ["build", "tiny:llama", "--out", "{tmp}/b", "--max-seq-len", "64"]),
    (("torch", "transformers"), ["bench", "{bundle}", "--limit", "1", "--max-new-tokens", "4", "--threads", "1",
                                 "--compare-transformers"]),
], ids=["build without the build extra", "bench --compare-transformers without torch"])
def test_a_missing_extra_is_named(tmp_path, tiny_bundle, blocked, command):
    """An install without an extra (pip install speccompile: no onnx; or no torch) gets one error line naming
    what to install, not an internal error."""
    import subprocess
    import sys
    args = [a.format(tmp=tmp_path, bundle=tiny_bundle) for a in command]
    script = (f"import sys\nfor m in {blocked!r}: sys.modules[m] = None\n"
              f"from speccompile.cli import main\nsys.argv = ['speccompile'] + {args!r}\nmain()")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.count("error:") == 1, r.stderr
    assert "which is not installed: pip install" in r.stderr and "internal error" not in r.stderr, r.stderr
    assert not (tmp_path / "b").exists()


def test_drafting_options_on_a_bundle_without_drafters_are_refused(tmp_path):
    """A bundle built with --draft none decodes plainly: --drafter, --num-draft, --tree and --compare would be
    ignored there (a plain run compared with itself), so each is one error line; plain decoding still runs."""
    out = str(tmp_path / "plain")
    run("build", "tiny:llama", "--out", out, "--draft", "none", "--max-seq-len", 64)
    for args in (["--drafter", "lookup"], ["--num-draft", "3"], ["--tree", "chain:2"], ["--compare"]):
        r = CliRunner().invoke(main, ["generate", out, "hello", "--max-new-tokens", "4", *args])
        assert r.exit_code == 2 and r.output.startswith("error:") and len(r.output.splitlines()) == 1, (args, r.output)
    plain = json.loads(run("generate", out, "hello", "--max-new-tokens", 4, "--json"))
    assert plain["stats"]["drafter"] is None and 1 <= len(plain["token_ids"]) <= 4


def test_sampling_options_at_a_temperature_that_decodes_greedily_are_refused(tiny_bundle):
    """A temperature below sampling.GREEDY_BELOW decodes greedily, as 0 does: --top-k, --top-p and typical
    acceptance would change nothing there, so they are refused as at 0, not silently ignored."""
    for args in (["--top-k", "5"], ["--top-p", "0.5"], ["--acceptance", "typical"]):
        r = CliRunner().invoke(main, ["generate", str(tiny_bundle), "hello", "--max-new-tokens", "4",
                                      "--temperature", "1e-8", *args])
        assert r.exit_code == 2 and r.output.startswith(f"error: {args[0]}") and len(r.output.splitlines()) == 1, \
            r.output
        assert "at least 1e-05" in r.output, r.output


def test_an_acceptance_that_names_no_rule_is_refused_as_such_when_greedy(tiny_bundle):
    """--acceptance bogus (or "") at the greedy default was refused as typical acceptance ("is for sampling"),
    which it is not: the error names the rules there are."""
    for value in ("bogus", "", "exact:0.1"):
        r = CliRunner().invoke(main, ["generate", str(tiny_bundle), "hello", "--max-new-tokens", "4",
                                      "--acceptance", value])
        assert r.exit_code == 2 and len(r.output.splitlines()) == 1, r.output
        assert "use 'exact' or 'typical[:EPS[,ALPHA]]'" in r.output and "for sampling" not in r.output, r.output


def test_top_k_top_p_and_min_p_without_a_temperature_are_refused(tiny_bundle):
    """Greedy decoding (temperature 0, the default) takes the likeliest token whatever --top-k, --top-p or --min-p
    say: they
    are refused there rather than ignored, and apply once a temperature is given."""
    for args in (["--top-k", "5"], ["--top-p", "0.5"], ["--min-p", "0.1"]):
        r = CliRunner().invoke(main, ["generate", str(tiny_bundle), "hello", "--max-new-tokens", "4", *args])
        assert r.exit_code == 2 and r.output.startswith(f"error: {args[0]} limits what sampling draws from") \
            and len(r.output.splitlines()) == 1, r.output
        sampled = json.loads(run("generate", tiny_bundle, "hello", "--max-new-tokens", 4, "--json", *args,
                                 "--temperature", 0.7, "--seed", 1))
        assert sampled["token_ids"]
    both = CliRunner().invoke(main, ["generate", str(tiny_bundle), "hello", "--top-k", "5", "--top-p", "0.5"])
    assert both.output.startswith("error: --top-k and --top-p limit what sampling draws from"), both.output


def test_compare_samples_both_runs_from_one_seed(tiny_bundle):
    """--compare at a temperature without --seed: the speculative and the plain run draw from one seed, so their
    outputs compare token for token (two unseeded runs would differ at almost every token at this temperature)."""
    out = json.loads(run("generate", tiny_bundle, "hello", "--max-new-tokens", 24, "--temperature", 5.0, "--compare",
                         "--json"))
    assert out["identical_to_autoregressive"], out["token_ids"]


def test_a_cache_dir_inside_the_bundle_is_refused(tiny_bundle, tmp_path):
    """--cache-dir inside the bundle would write files its manifest does not list: every later load of the bundle
    would then fail its integrity check. Refused, and the bundle stays as it was."""
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    for inside in (bundle, bundle / "cache"):
        r = CliRunner().invoke(main, ["generate", str(bundle), "hello", "--max-new-tokens", "3", "--cache-dir",
                                      str(inside)])
        assert r.exit_code == 2 and r.output.startswith("error:") and "inside the bundle" in r.output, r.output
    run("generate", bundle, "hello", "--max-new-tokens", 3, "--cache-dir", tmp_path / "cache")
    run("inspect", bundle)


def test_compare_fits_a_request_that_fits(tiny_bundle, tiny_generator):
    """--compare warms both paths up first: with no more new tokens than were asked for, so a prompt that leaves
    room for fewer than its warm-up's tokens still runs."""
    words = next(n for n in range(1, 1000) if len(tiny_generator.tokenizer.encode(
        " ".join(["a"] * n), add_special_tokens=True)) >= tiny_generator.max_seq_len - 3)
    prompt = " ".join(["a"] * words)
    room = tiny_generator.max_seq_len - len(tiny_generator.tokenizer.encode(prompt, add_special_tokens=True))
    assert 1 <= room <= 3
    out = json.loads(run("generate", tiny_bundle, prompt, "--no-chat", "--max-new-tokens", room, "--compare",
                         "--json"))
    assert out["identical_to_autoregressive"] and 1 <= len(out["token_ids"]) <= room


def test_cache_options_without_a_context_cache_are_refused(tiny_bundle, tmp_path):
    """--no-context-cache keeps no cache: a --cache-dir or --cache-bytes beside it would be ignored."""
    for args in (["--cache-dir", str(tmp_path / "c")], ["--cache-bytes", "1000"]):
        r = CliRunner().invoke(main, ["generate", str(tiny_bundle), "hello", "--max-new-tokens", "4",
                                      "--no-context-cache", *args])
        assert r.exit_code == 2 and r.output.startswith("error: --no-context-cache") and args[0] in r.output, \
            r.output
    assert not (tmp_path / "c").exists()


def test_no_command_shows_the_help():
    """`speccompile` alone shows its help laid out as click lays it out (one command a line), not folded into one
    `error:` line hundreds of characters long."""
    r = CliRunner().invoke(main, [])
    assert not r.output.startswith("error:"), r.output
    assert "Usage:" in r.output and "Commands:" in r.output, r.output
    assert any(line.split()[:1] == ["generate"] for line in r.output.splitlines()), r.output


def test_inspect_names_a_sliding_window_and_the_layers_it_slides(tiny_bundle):
    """A windowed model's attention differs from a full one's past the window: inspect says so, and where."""
    from speccompile.format.bundle import read_manifest
    from speccompile.format.summary import describe
    m = read_manifest(tiny_bundle, verify_hashes=False)
    target = next(x for x in describe(tiny_bundle, m, False) if x.startswith("model       target:"))
    assert "sliding window" not in target
    m["models"]["target"]["config"].update(sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    target = next(x for x in describe(tiny_bundle, m, False) if x.startswith("model       target:"))
    assert "sliding window 8 on 1 of 2 layers" in target
    m["models"]["target"]["config"].update(layer_types=[])
    assert "sliding window 8 on every layer" in next(x for x in describe(tiny_bundle, m, False)
                                                      if x.startswith("model       target:"))
