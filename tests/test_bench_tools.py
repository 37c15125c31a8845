"""The scripts in tools/ and bench's edges: bad input is one `error:` line, plots keep every ratio in view, and
transformers is compared only where it drafts as we do."""
import pytest

from speccompile.bench.prompts import pick_prompts
from speccompile.errors import SpeccompileError
from tools_util import tool

# each tool's arguments naming a bundle that is not there
MISSING_BUNDLE = {
    "head_agreement": ["/nonexistent-bundle"],
    "bench_tree": ["--bundle", "/nonexistent-bundle"],
    "offset_cost": ["/nonexistent-bundle"],
    "pass_breakdown": ["/nonexistent-bundle"],
    "pearl_overlap": ["/nonexistent-bundle"],
    "gpu_bench": ["/nonexistent-bundle", "--device", "cpu"],
    "bench_solo_scheduler": ["/nonexistent-bundle", "2", "4", "spec"],
    "sampling_speed": ["/nonexistent-bundle"],
    "prefill_time": ["/nonexistent-bundle"],
}


def run_tool(name: str, args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.setattr("sys.argv", [f"{name}.py", *args])
    with pytest.raises(SystemExit) as exited:
        tool(name).main()
    return exited.value.code, capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(MISSING_BUNDLE))
def test_a_tool_given_no_bundle_says_so_in_one_line(name, monkeypatch, capsys):
    """These tools let the error out as a traceback (exit 1)."""
    code, err = run_tool(name, MISSING_BUNDLE[name], monkeypatch, capsys)
    assert code == 2 and err == "error: bundle not found: /nonexistent-bundle\n", err


def test_a_tool_refuses_a_limit_below_one(tiny_bundle, monkeypatch, capsys):
    """--limit 0 picked nothing and was reported as prompts too long for the context."""
    with pytest.raises(SpeccompileError, match="--limit 0: must be at least 1"):
        pick_prompts({"chat": [{"question_id": 1, "text": "hi"}]}, 0, lambda text: [1, 2], 100)
    code, err = run_tool("head_agreement", [tiny_bundle, "--limit", "0"], monkeypatch, capsys)
    assert code == 2 and err == "error: --limit 0: must be at least 1\n", err


def test_prefill_time_times_each_prompt_and_says_which_kernel(tiny_bundle, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["prefill_time.py", tiny_bundle, "--limit", "2", "--repeats", "1"])
    tool("prefill_time").main()
    out = capsys.readouterr().out
    assert out.startswith("2 prompts, ") and "ms a prompt token" in out and ("no AMX" in out or "AMX for" in out)


def test_bench_serve_refuses_unknown_modes_and_an_absent_server(monkeypatch, capsys):
    """A misspelt --modes word was read as 'off'; a server that is not there was a traceback."""
    bench_serve = tool("bench_serve")
    with pytest.raises(SystemExit) as exited:
        bench_serve.main(["http://127.0.0.1:9", "--modes", "on,of"])
    assert exited.value.code == 2 and capsys.readouterr().err == "error: --modes 'on,of': expected on, off or on,off\n"
    assert bench_serve.speculation_modes("on, off") == [True, False]
    monkeypatch.setattr(bench_serve.httpx, "get", lambda *a, **k: (_ for _ in ()).throw(
        bench_serve.httpx.ConnectError("Connection refused")))
    with pytest.raises(SystemExit) as exited:
        bench_serve.main(["http://127.0.0.1:9"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.startswith("error: cannot reach the server at http://127.0.0.1:9") \
        and err.count("\n") == 1, err


def test_plot_keeps_a_margin_around_the_extreme_ratios():
    """A category of one prompt draws a box of no height at its ratio: the box's sticky edges pinned the axis
    there, and the lowest and highest ratios' markers were cut in half by the plot's edges."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from speccompile.bench.plot import _overall_spread, _speedups_by_category
    fig, (by_category, overall) = plt.subplots(1, 2)
    _speedups_by_category(by_category, {"a": {"m": [0.5]}, "b": {"m": [1.5]}, "overall": {"m": [0.5, 1.5]}}, ["m"],
                          {"m": "C0"})
    _overall_spread(overall, {"overall": {"m": [0.7]}}, ["m"], {"m": "C0"})
    fig.canvas.draw()
    low, high = by_category.get_ylim()
    assert low < 0.5 and high > 1.5
    assert overall.get_xlim()[0] < 0.7
    plt.close(fig)


def test_no_transformers_counterpart_for_a_tree_given_by_tree(tiny_generator, tmp_path):
    """--drafter lookup@chain:2 had no transformers counterpart, but the same method given as --drafter lookup
    --tree chain:2 was compared with transformers' chain of the bundle's num_draft, as if it drafted alike."""
    pytest.importorskip("transformers")
    from speccompile.bench.peers import transformers_methods
    methods = transformers_methods(tiny_generator, ["lookup"], 1, str(tmp_path), lambda msg: None)
    assert [m.name for m in methods] == ["transformers:autoregressive", "transformers:lookup"]
    methods = transformers_methods(tiny_generator, ["lookup"], 1, str(tmp_path), lambda msg: None, tree="chain:2")
    assert [m.name for m in methods] == ["transformers:autoregressive"]


def test_an_output_where_no_file_can_be_made_is_refused_before_the_run(tmp_path):
    """os.access says yes to root everywhere, so `--json /proc/x.json` failed only after the whole run; a folder
    that takes files passes, and the check leaves nothing in it."""
    from speccompile.bench.outputs import check_output
    with pytest.raises(SpeccompileError, match="not a folder this user may write in"):
        check_output("/proc/bench.json", "--json")
    check_output(str(tmp_path / "bench.json"), "--json")
    assert list(tmp_path.iterdir()) == []


def test_sampling_speed_checks_each_settings_answers_against_plain_sampling(tiny_bundle, monkeypatch, capsys):
    """tools/sampling_speed.py: a line per setting, every speculative answer plain sampling's with its seed."""
    monkeypatch.setattr("sys.argv", ["sampling_speed.py", tiny_bundle, "--prompts", "2", "--new-tokens", "12",
                                     "--threads", "1", "--choices", "3"])
    tool("sampling_speed").main()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["greedy", "greedy, logprobs 5", "temperature 0.7", "min-p 0.05",
                                                     "top-p 0.9", "3 choices at temperature 0.7"]
    assert lines.pop().endswith("the same answers 2/2")
    assert all(line.endswith("identical to plain sampling 2/2") for line in lines), lines
    monkeypatch.setattr("sys.argv", ["sampling_speed.py", tiny_bundle, "--prompts", "2", "--new-tokens", "12",
                                     "--threads", "1", "--choices", "2", "--choices-only"])
    tool("sampling_speed").main()
    assert [line.split(":")[0] for line in capsys.readouterr().out.splitlines()] == ["2 choices at temperature 0.7"]
