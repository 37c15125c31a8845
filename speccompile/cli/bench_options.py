"""`bench`'s options checked together, before anything loads: the files it writes, and the options that its mode
would ignore."""
from __future__ import annotations

from speccompile.errors import SpeccompileError

STREAM_REQUESTS = 8  # requests the concurrency mode serves by default


def check_bench_options(p: dict) -> None:
    """bench's options (p: by parameter name) that would fail after the run or be ignored: one error line."""
    from speccompile.bench.outputs import check_not_overwriting, check_output
    from speccompile.bench.plot import plot_formats
    from speccompile.bench.prompts import default_dataset
    outputs = {o: path for o, path in (("--json", p["json_out"]), ("--plot", p["plot_out"])) if path}
    for option, path in outputs.items():
        check_output(path, option, plot_formats() if option == "--plot" else None)
    check_not_overwriting(outputs, p["bundle"], p["dataset"] or default_dataset())
    serving = [o for o, given in (("--stream-requests", p["stream_requests"] != STREAM_REQUESTS),
                                  ("--stream-repeats", p["stream_repeats"] is not None)) if given]
    if p["multi_turn"] is not None:
        _check_multi_turn(p, serving)
    elif serving and not p["streams"]:
        raise SpeccompileError(f"{', '.join(serving)}: only the concurrency mode serves requests; give --streams")


def _check_multi_turn(p: dict, serving: list[str]) -> None:
    ignored = [o for o, given in (("--plot", p["plot_out"]), ("--streams", p["streams"]), ("--tree", p["tree"]),
                                  ("--temperature", p["temperature"]), ("--top-k", p["top_k"]),
                                  ("--compare-transformers", p["compare_transformers"]),
                                  ("--repeats", p["repeats"] != 1), ("a second --drafter", len(p["drafters"]) > 1))
               if given] + serving
    if ignored or p["multi_turn"] < 1:
        raise SpeccompileError(f"--multi-turn {p['multi_turn']}: " + (f"does not take {', '.join(ignored)}" if ignored
                                                                      else "at least one turn"))
    _check_multi_turn_drafter(p["drafters"][0] if p["drafters"] else None)


def _check_multi_turn_drafter(spec: str | None) -> None:
    """The chats decode greedily through the drafter's own tree: a method's tree or acceptance would be ignored
    (and was reported as a drafter not in the bundle)."""
    from speccompile.bench.methods import split_acceptance, split_method
    if spec is not None and (split_method(spec)[1] or split_acceptance(spec)[1]):
        raise SpeccompileError(f"--multi-turn: --drafter {spec}: takes a drafter's NAME alone (it drafts through "
                               "the bundle's tree, greedily); NAME@TREE and NAME~ACCEPTANCE are for the prompt "
                               "benchmark")
