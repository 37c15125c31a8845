"""`generate`'s options checked together: those that contradict each other, or that the others would make it
ignore, are refused before the bundle loads; and its --stop strings' escapes."""
from __future__ import annotations

import re

from speccompile.errors import SpeccompileError

CACHE_BYTES = 1 << 30  # the context cache's memory by default
STOP_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
STOP_HELP = ("Stop string (repeatable). \\n, \\t, \\r and \\\\ in it are a newline, a tab, a carriage return "
             "and a backslash, as llama.cpp's CLI reads them: --stop '\\n' stops at the end of a line.")


def unescape_stop(stop: str) -> str:
    """A --stop value with its escapes read: a shell passes "\\n" as a backslash and an n, which output almost never
    holds, so the stop string would never match; what the user means is a newline."""
    return re.sub(r"\\([ntr\\])", lambda m: STOP_ESCAPES[m.group(1)], stop)


def check_generate_options(p: dict) -> None:
    """generate's options (p: by parameter name) that contradict each other, or that the others would make it
    ignore: one error line, before the bundle loads."""
    from speccompile.runtime.sampling import GREEDY_BELOW, SamplingParams, acceptance_option
    for flag in ("logprobs", "prompt_logprobs"):
        if p[flag] is not None and not p["as_json"]:  # streamed text has nowhere to show them
            raise SpeccompileError(f"--{flag.replace('_', '-')} {p[flag]}: they are printed in --json's output: "
                                   f"add --json")
    if p["system"] is not None and p["no_chat"]:
        raise SpeccompileError("--system needs the chat template: drop --no-chat")
    drafting = [o for o, given in (("--compare", p["compare"]), ("--drafter", p["drafter"]),
                                   ("--num-draft", p["num_draft"]), ("--tree", p["tree"]),
                                   ("--acceptance", p["acceptance"] != "exact")) if given]
    if p["no_speculate"] and drafting:
        raise SpeccompileError(f"--no-speculate drafts nothing: drop {', '.join(drafting)}")
    # values out of range, and an --acceptance that names no rule: their own error, not one about sampling below.
    # Greedy: temperature 0, and any below GREEDY_BELOW (1e-8 samples nothing)
    acceptance_option(p["acceptance"])
    greedy = SamplingParams(p["temperature"], p["top_k"], p["top_p"], p["seed"], min_p=p["min_p"]).greedy
    hint = f"give --temperature of at least {GREEDY_BELOW:g} (below it, and at 0, the default, decoding is greedy)"
    sampling = [o for o, given in (("--top-k", p["top_k"]), ("--top-p", p["top_p"] != 1.0),
                                   ("--min-p", p["min_p"] != 0.0)) if given]
    if sampling and greedy:  # greedy decoding takes the likeliest token: they would change nothing
        raise SpeccompileError(f"{' and '.join(sampling)} {'limits' if len(sampling) == 1 else 'limit'} what "
                               f"sampling draws from: {hint}")
    if p["acceptance"] != "exact" and greedy:
        raise SpeccompileError(f"--acceptance {p['acceptance']}: typical acceptance is for sampling, greedy "
                               f"decoding is exact: {hint}")
    check_cache_options(p)


def check_cache_options(p: dict) -> None:
    """--no-context-cache beside the options of the cache it turns off (generate's and serve's): one error line."""
    cache = [o for o, given in (("--cache-bytes", p["cache_bytes"] != CACHE_BYTES), ("--cache-dir", p["cache_dir"]))
             if given]
    if p["no_context_cache"] and cache:
        raise SpeccompileError(f"--no-context-cache keeps no context cache: drop {', '.join(cache)}")
