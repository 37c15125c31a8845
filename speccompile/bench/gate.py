"""`speccompile gate`: compare a `speccompile bench` result with a baseline result; fail on a regression.

Only figures that do not depend on the machine's speed are compared, each for every speculative speccompile method
M of the baseline (all of them higher-is-better):

    speedup M                   overall paired speedup over autoregressive decoding (the geometric mean of the
                                per-prompt speedups), measured within one run, so the machine's speed cancels
                                out (the noisiest row; bench with --repeats)
    accepted M                  overall mean accepted tokens per verify pass (deterministic under greedy decoding
                                for a given bundle and prompts)
    accepted M / CATEGORY       the same per prompt category
    acceptance M depth D        overall acceptance rate at draft depth D (1 = the first draft token)

A row regresses when it falls more than `max_regression` (a fraction) below the baseline; `min_speedup` and
`min_accepted` are absolute floors for every method's overall speedup and mean accepted tokens. Tokens/s, TTFT and
bandwidths are machine figures and are never gated.
"""
from __future__ import annotations

import dataclasses
import json

from speccompile.bench.benchmark import SCHEMA_VERSION
from speccompile.errors import SpeccompileError

# Settings that change what is decoded: results that differ in them are not comparable.
DECODING_SETTINGS = ("max_new_tokens", "tree", "dataset_sha256")
# Settings that change only timings: a difference is worth a note, not a refusal.
TIMING_SETTINGS = ("threads", "repeats")


class GateInputError(SpeccompileError):
    """An unreadable result file, or two results that cannot be compared."""


@dataclasses.dataclass
class Row:
    name: str
    baseline: float
    now: float
    failure: str | None = None  # why the row fails, None if it passes

    @property
    def change(self) -> float | None:
        return self.now / self.baseline - 1 if self.baseline else None


def load_result(path: str) -> dict:
    try:
        with open(path) as f:
            result = json.load(f)
    except OSError as e:
        raise GateInputError(f"cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise GateInputError(f"{path}: not JSON ({e})") from None
    if not isinstance(result, dict) or result.get("schema_version") != SCHEMA_VERSION:
        found = result.get("schema_version") if isinstance(result, dict) else None
        raise GateInputError(f"{path}: not a speccompile bench result of schema_version {SCHEMA_VERSION} "
                             f"(found {found!r})")
    for key in ("bundle", "settings", "prompts", "summary", "methods"):
        if key not in result:
            raise GateInputError(f"{path}: bench result without {key!r}")
    return result


def _drafters(result: dict) -> list:
    return [(d["name"], d["kind"], d["num_draft"]) for d in result["bundle"]["drafters"]]


def check_comparable(baseline: dict, result: dict) -> list[str]:
    """Raise GateInputError where the two runs decoded different things; return notes on timing differences."""
    problems = []
    if baseline["bundle"]["source"].get("sha256") != result["bundle"]["source"].get("sha256"):
        problems.append("the bundles were built from different model sources")
    if _drafters(baseline) != _drafters(result):
        problems.append(f"the bundles' drafters differ ({_drafters(baseline)} vs {_drafters(result)})")
    for key in DECODING_SETTINGS:
        if baseline["settings"].get(key) != result["settings"].get(key):
            problems.append(f"{key} differs ({baseline['settings'].get(key)!r} vs {result['settings'].get(key)!r})")
    if [p["question_id"] for p in baseline["prompts"]] != [p["question_id"] for p in result["prompts"]]:
        problems.append("the prompts differ")
    if problems:
        raise GateInputError("results are not comparable: " + "; ".join(problems))
    return [f"{key} differs ({baseline['settings'].get(key)!r} vs {result['settings'].get(key)!r}); speedups may "
            f"shift" for key in TIMING_SETTINGS if baseline["settings"].get(key) != result["settings"].get(key)]


def gated_figures(result: dict) -> dict[str, float]:
    """Row name -> value for every gated figure of the result (see the module docstring)."""
    figures = {}
    overall, by_category = result["summary"]["overall"], result["summary"]["by_category"]
    for method in result["methods"]:
        if method["engine"] != "speccompile" or not method["drafter"]:
            continue
        name, s = method["name"], overall[method["name"]]
        figures[f"speedup {name}"] = s["paired_speedup"]
        figures[f"accepted {name}"] = s["mean_accepted_tokens"]
        for category, group in by_category.items():
            figures[f"accepted {name} / {category}"] = group[name]["mean_accepted_tokens"]
        for depth, rate in enumerate(s["acceptance_rate_per_depth"] or [], 1):
            figures[f"acceptance {name} depth {depth}"] = rate
    return {k: v for k, v in figures.items() if v is not None}


def compare(baseline: dict, result: dict, max_regression: float = 0.05, min_speedup: float | None = None,
            min_accepted: float | None = None) -> list[Row]:
    before, now = gated_figures(baseline), gated_figures(result)
    missing = [name for name in before if name not in now]
    if missing:
        raise GateInputError(f"the result lacks figures the baseline has: {', '.join(missing[:5])}")
    rows = []
    for name, base in before.items():
        row = Row(name, base, now[name])
        reasons = []
        if row.change is not None and row.change < -max_regression:
            reasons.append(f"{row.change:+.1%}, more than the allowed -{max_regression:.1%}")
        floor = (min_speedup if name.startswith("speedup ") else
                 min_accepted if name.startswith("accepted ") and " / " not in name else None)
        if floor is not None and row.now < floor:
            reasons.append(f"below the floor {floor:g}")
        row.failure = "; ".join(reasons) or None
        rows.append(row)
    return rows


def format_rows(rows: list[Row]) -> str:
    width = max([len(r.name) for r in rows] + [6])
    lines = [f"{'figure':{width}s} {'baseline':>9s} {'now':>9s} {'change':>8s}  status",
             "-" * (width + 40)]
    for r in rows:
        change = "-" if r.change is None else f"{r.change:+.1%}"
        lines.append(f"{r.name:{width}s} {r.baseline:9.3f} {r.now:9.3f} {change:>8s}  "
                     f"{'FAIL: ' + r.failure if r.failure else 'ok'}")
    return "\n".join(lines)


def run_gate(result_path: str, baseline_path: str, max_regression: float = 0.05, min_speedup: float | None = None,
             min_accepted: float | None = None) -> tuple[list[Row], list[str]]:
    """(rows, notes); a row with a `failure` means the gate fails."""
    if max_regression < 0:
        raise GateInputError(f"--max-regression {max_regression}: must not be negative")
    baseline, result = load_result(baseline_path), load_result(result_path)
    notes = check_comparable(baseline, result)
    return compare(baseline, result, max_regression, min_speedup, min_accepted), notes
