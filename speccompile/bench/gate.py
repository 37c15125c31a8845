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

    A method that drafts adaptively (its summary has a plain_pass_share) verifies what its measured pass times
    make worth it, so its accepted tokens are not deterministic: it has the speedup row and `accepted M per
    drafting pass` (the tokens committed by the passes that verified drafts: its plain steps, which commit one
    token each, left out), held by the floor only.

    identical M                 (greedy results, M with exact acceptance) the share of prompts whose output
                                equals autoregressive decoding's; below 1.0 always fails

    concurrency N streams       (results with a concurrency section, bench --streams) aggregate tokens/s of N
                                concurrent streams over serving the same requests one after another, in one run
    concurrency identical       the smallest share of requests whose tokens equal their sequential run's, over
                                the stream counts; below MIN_IDENTICAL_SHARE always fails

A row regresses when it falls more than `max_regression` (a fraction) below the baseline, speedups only where both
ran on the same kind of CPU (machine.cpu: model and instruction sets; another CPU runs other kernels, whose
relative costs differ, and then the speedups are held by their floors, with a note); `min_speedup` and
`min_accepted` are absolute floors for every method's overall speedup and mean accepted tokens, `min_concurrency`
for `concurrency 4 streams` (a result without it is refused when that floor is given). A concurrency row the
baseline lacks (a baseline from before the concurrency mode) is still checked; concurrency rows are held by their
floors only (their baseline is shown): the ratio of two wall-clock runs moves with the machine's load. Tokens/s,
TTFT and bandwidths are machine figures and are never gated.

Results of runs that decoded different things are refused (GateInputError): other model sources, drafters,
decoding settings or prompts, or another build of the same source (the target's weight format, build --weights,
and its dtype: a float32 build decodes otherwise than the 4-bit blocks it was dequantized from). A result from
before bench recorded the build's weights and dtype is taken as the default build's (--weights source, float32),
with a note.

Every gated figure, in the result and in the baseline, must be a finite number >= 0, and so must every threshold;
a baseline must have at least one gated figure. Anything else is refused (GateInputError), never passed.
"""
from __future__ import annotations

import dataclasses
import json
import math

from speccompile.bench.methods import split_acceptance
from speccompile.bench.settings import SCHEMA_VERSION
from speccompile.errors import SpeccompileError
from speccompile.runtime.sampling import GREEDY_BELOW

# Settings that change what is decoded: results that differ in them are not comparable.
# Each with the value an older result that lacks the key decoded with.
DECODING_SETTINGS = {"max_new_tokens": None, "tree": None, "dataset_sha256": None, "temperature": 0.0, "top_k": 0}
# The build's target weights (build --weights) and dtype, as bench records them (bench.machine.bundle_summary), each
# with what a result from before they were recorded is taken for: the default build's (the CI baseline's build).
BUILD_DEFAULTS = {"weights": "source", "dtype": "float32"}
# Settings that change only timings: a difference is worth a note, not a refusal.
TIMING_SETTINGS = ("threads", "repeats")


JSON_TYPES = {dict: "object", list: "list"}
# Concurrent greedy streams give their solo tokens up to float near-ties (docs/guarantees.md, "Threads"): a rare
# request may differ; more than a quarter of them differing is a bug, not a tie.
MIN_IDENTICAL_SHARE = 0.75
ADAPTIVE = " per drafting pass"  # the suffix of an adaptive method's accepted-tokens row


class GateInputError(SpeccompileError):
    """An unreadable result file, or two results that cannot be compared."""


@dataclasses.dataclass
class Row:
    name: str
    baseline: float | None  # None: the baseline lacks the row (floors only)
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
    for key, kind in (("bundle", dict), ("settings", dict), ("prompts", list), ("summary", dict),
                      ("methods", list)):
        if not isinstance(result.get(key), kind):
            raise GateInputError(f"{path}: bench result without {key!r} (a JSON {JSON_TYPES[kind]})")
    _check_structure(path, result)
    return result


def _check_structure(path: str, result: dict) -> None:
    """The parts the gate reads, present and of the right JSON types (their values are checked as figures)."""
    summary, bundle = result["summary"], result["bundle"]
    if not isinstance(summary.get("overall"), dict) or not isinstance(summary.get("by_category"), dict) \
            or not all(isinstance(g, dict) for g in summary["by_category"].values()):
        raise GateInputError(f"{path}: summary needs objects 'overall' and 'by_category'")
    if not isinstance(bundle.get("source"), dict) or not isinstance(bundle.get("drafters"), list) \
            or not all(isinstance(d, dict) for d in bundle["drafters"]):
        raise GateInputError(f"{path}: bundle needs an object 'source' and a list 'drafters'")
    if not all(isinstance(m, dict) and isinstance(m.get("name"), str) for m in result["methods"]):
        raise GateInputError(f"{path}: every method needs a name")
    if not all(isinstance(p, dict) for p in result["prompts"]):
        raise GateInputError(f"{path}: every prompt must be an object")
    if not isinstance(bundle.get("target", {}), dict):
        raise GateInputError(f"{path}: the bundle's 'target' must be an object")
    if not isinstance(result.get("machine", {}), dict):
        raise GateInputError(f"{path}: 'machine' must be an object")


def _drafters(result: dict) -> list:
    """The bundle's drafters, in name order: their order picks the default drafter (and the concurrency mode's),
    which the gate holds by floors only, not what each method measured."""
    return sorted(((d.get("name"), d.get("kind"), d.get("num_draft")) for d in result["bundle"]["drafters"]),
                  key=repr)


def _tree_problems(baseline: dict, result: dict) -> list[str]:
    """A drafter built with --tree drafts that tree (its num_draft then unused), which accepts otherwise than
    another; compared where both results record it (the committed CI baseline is from before bench did)."""
    pairs = zip(baseline["bundle"]["drafters"], result["bundle"]["drafters"])
    return [f"drafter {now.get('name')!r} drafts another tree ({before['tree']!r} vs {now['tree']!r})"
            for before, now in pairs if None not in (before.get("tree"), now.get("tree"))
            and before["tree"] != now["tree"]]


def _build(result: dict) -> dict:
    target = result["bundle"].get("target", {})
    build = {key: target.get(key, default) for key, default in BUILD_DEFAULTS.items()}
    build["kv_dtype"] = target.get("kv_dtype", build["dtype"])  # before --kv-dtype: the caches in the build's dtype
    return build


def _unrecorded_builds(baseline: dict, result: dict) -> str | None:
    """What is assumed of the runs whose result predates the build's weights and dtype (None if none does)."""
    sides = [which for which, doc in (("the baseline", baseline), ("the result", result))
             if not all(key in doc["bundle"].get("target", {}) for key in BUILD_DEFAULTS)]
    if not sides:
        return None
    default = " ".join(f"--{key} {value}" for key, value in BUILD_DEFAULTS.items())
    return (f"{' and '.join(sides)} record{'s' if len(sides) == 1 else ''} no build --weights/--dtype (from before "
            f"bench recorded them): taken as the default build's, {default}")


def _build_problems(baseline: dict, result: dict) -> list[str]:
    before, now = _build(baseline), _build(result)
    problems = [f"the bundles were built with different --{key.replace('_', '-')} ({before[key]!r} vs {now[key]!r})"
                for key in before if before[key] != now[key]]
    assumed = _unrecorded_builds(baseline, result)
    if problems and assumed:  # the refusal then rests on the assumption: say so, and how to record the truth
        problems.append(f"{assumed}; bench that build again to record them")
    return problems


def check_comparable(baseline: dict, result: dict) -> list[str]:
    """Raise GateInputError where the two runs decoded different things; return notes on timing differences and
    on an assumed build."""
    problems = _build_problems(baseline, result)
    if baseline["bundle"]["source"].get("sha256") != result["bundle"]["source"].get("sha256"):
        problems.append("the bundles were built from different model sources")
    if _drafters(baseline) != _drafters(result):
        problems.append(f"the bundles' drafters differ ({_drafters(baseline)} vs {_drafters(result)})")
    problems += _tree_problems(baseline, result)
    for key, default in DECODING_SETTINGS.items():
        before, now = baseline["settings"].get(key, default), result["settings"].get(key, default)
        if before != now:
            problems.append(f"{key} differs ({before!r} vs {now!r})")
    if [p.get("question_id") for p in baseline["prompts"]] != [p.get("question_id") for p in result["prompts"]]:
        problems.append("the prompts differ")
    if problems:
        raise GateInputError("results are not comparable: " + "; ".join(problems))
    assumed = _unrecorded_builds(baseline, result)
    timing = [f"{key} differs ({baseline['settings'].get(key)!r} vs {result['settings'].get(key)!r}); speedups may "
              f"shift" for key in TIMING_SETTINGS if baseline["settings"].get(key) != result["settings"].get(key)]
    return ([assumed] if assumed else []) + timing


def check_figure(name: str, value, where: str) -> float:
    """A gated figure or threshold as a float: a finite number >= 0 (bools, strings, null, NaN and inf refused)."""
    if value is None:
        raise GateInputError(f"{where}: {name} is missing")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise GateInputError(f"{where}: {name} is not a number ({value!r})")
    if not math.isfinite(value) or value < 0:
        raise GateInputError(f"{where}: {name} is {value!r}, not a finite number >= 0")
    return float(value)


def _method_figures(name: str, overall: dict, by_category: dict) -> dict:
    s = overall.get(name)
    if not isinstance(s, dict):
        raise GateInputError(f"no summary of method {name!r}")
    if s.get("plain_pass_share") is not None:  # adaptive drafting: what it verifies follows the pass times
        return {f"speedup {name}": s.get("paired_speedup"), f"accepted {name}{ADAPTIVE}": per_drafting_pass(s)}
    figures = {f"speedup {name}": s.get("paired_speedup"), f"accepted {name}": s.get("mean_accepted_tokens")}
    for category, group in by_category.items():
        summary = group.get(name) or {}
        if not isinstance(summary, dict):
            raise GateInputError(f"the summary of method {name!r} in category {category!r} is not an object")
        figures[f"accepted {name} / {category}"] = summary.get("mean_accepted_tokens")
    # null: no per-depth rows (a row the baseline has and the result lacks is refused in compare)
    rates = s.get("acceptance_rate_per_depth") or []
    if not isinstance(rates, list):
        raise GateInputError(f"acceptance_rate_per_depth of {name!r} is not a list ({rates!r})")
    for depth, rate in enumerate(rates, 1):
        figures[f"acceptance {name} depth {depth}"] = rate
    return figures


def per_drafting_pass(summary: dict):
    """Mean accepted tokens over the passes that verified drafts: pooled over the passes by the bench; from a
    result that predates that figure, estimated from the pooled mean and the mean plain-pass share (every pass
    commits mean_accepted_tokens on average, a plain step exactly one)."""
    if summary.get("mean_accepted_per_drafting_pass") is not None:
        return summary["mean_accepted_per_drafting_pass"]
    mean, plain = summary.get("mean_accepted_tokens"), summary.get("plain_pass_share")
    for value in (mean, plain):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return value  # refused by check_figure, as any unreadable figure
    return 1.0 if plain >= 1 else (mean - plain) / (1 - plain)


def gated_figures(result: dict, where: str = "bench result") -> dict[str, float]:
    """Row name -> value for every gated figure of the result (see the module docstring); each must be there, a
    finite number: a figure the gate cannot read is refused, never skipped."""
    figures = {}
    overall, by_category = result["summary"]["overall"], result["summary"]["by_category"]
    temperature = result["settings"].get("temperature") or 0.0
    greedy = isinstance(temperature, (int, float)) and temperature < GREEDY_BELOW  # as the decoder reads it
    for method in result["methods"]:
        if method.get("engine") == "speccompile" and method.get("drafter"):
            name = method["name"]
            try:
                figures.update(_method_figures(name, overall, by_category))
            except GateInputError as e:
                raise GateInputError(f"{where}: {e}") from None
            # exact acceptance (no lossy "~ACCEPTANCE", bench.methods): a verifier that took a wrong draft would
            # look faster, so its identity with plain decoding is held to 1.0
            if greedy and split_acceptance(name)[1] in (None, "exact"):
                figures[f"identical {name}"] = overall[name].get("identical_to_autoregressive")
    figures |= concurrency_figures(result)
    return {k: check_figure(k, v, where) for k, v in figures.items()}


def concurrency_figures(result: dict) -> dict:
    """The concurrency section's gated figures (none without one)."""
    section = result.get("concurrency")
    if section is None:
        return {}
    runs = section.get("streams") if isinstance(section, dict) else None
    if not isinstance(runs, dict) or not all(isinstance(r, dict) for r in runs.values()):
        raise GateInputError("the concurrency section needs an object 'streams' of objects")
    figures = {f"concurrency {n} streams": r.get("speedup_vs_sequential") for n, r in runs.items() if n != "1"}
    shares = [r.get("identical_share", float(r.get("identical") is True)) for r in runs.values()]
    figures["concurrency identical"] = min(shares, default=1.0)
    return figures


def compare(baseline: dict, result: dict, max_regression: float = 0.05, min_speedup: float | None = None,
            min_accepted: float | None = None, min_concurrency: float | None = None) -> list[Row]:
    before, now = gated_figures(baseline, "the baseline"), gated_figures(result, "the result")
    if min_concurrency is not None and "concurrency 4 streams" not in now:
        raise GateInputError("--min-concurrency: the result has no 'concurrency 4 streams' (bench --streams 4)")
    if not before:
        raise GateInputError("the baseline has no gated figures (no speculative speccompile method with figures)")
    missing = [name for name in before if name not in now]
    if missing:
        raise GateInputError(f"the result lacks figures the baseline has: {', '.join(missing[:5])}")
    rows = []
    same_cpu = baseline.get("machine", {}).get("cpu") == result.get("machine", {}).get("cpu")
    new = {name: None for name in now if name.startswith(("concurrency", "identical ")) and name not in before}
    for name, base in (before | new).items():
        row = Row(name, base, now[name])
        reasons = []
        # the concurrency ratio swings with the machine's load more than the paired speedups, and adaptive
        # drafting's accepted tokens with the pass times it measures: floors hold them
        floor_only = (name.startswith(("concurrency", "identical ")) or name.endswith(ADAPTIVE) or
                      name.startswith("speedup ") and not same_cpu)
        if row.change is not None and row.change < -max_regression and not floor_only:
            reasons.append(f"{row.change:+.1%}, more than the allowed -{max_regression:.1%}")
        floor = (min_speedup if name.startswith("speedup ") else
                 min_accepted if name.startswith("accepted ") and " / " not in name else
                 min_concurrency if name == "concurrency 4 streams" else
                 MIN_IDENTICAL_SHARE if name == "concurrency identical" else
                 1.0 if name.startswith("identical ") else None)
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
        base = "-" if r.baseline is None else f"{r.baseline:.3f}"
        lines.append(f"{r.name:{width}s} {base:>9s} {r.now:9.3f} {change:>8s}  "
                     f"{'FAIL: ' + r.failure if r.failure else 'ok'}")
    return "\n".join(lines)


def parse_threshold(option: str, value) -> float | None:
    """A threshold as a float, from a number or the text given on the command line; None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise GateInputError(f"{option} {value!r}: not a number") from None
    try:
        return check_figure(option, value, "threshold")
    except GateInputError:
        raise GateInputError(f"{option} {value!r}: must be a finite number >= 0") from None


def check_thresholds(max_regression, min_speedup, min_accepted, min_concurrency=None) -> tuple:
    if max_regression is None:
        raise GateInputError("--max-regression: a number is needed")
    return (parse_threshold("--max-regression", max_regression), parse_threshold("--min-speedup", min_speedup),
            parse_threshold("--min-accepted", min_accepted), parse_threshold("--min-concurrency", min_concurrency))


def run_gate(result_path: str, baseline_path: str, max_regression: float = 0.05, min_speedup: float | None = None,
             min_accepted: float | None = None, min_concurrency: float | None = None) -> tuple[list[Row], list[str]]:
    """(rows, notes); a row with a `failure` means the gate fails. Thresholds may be given as text (the CLI's)."""
    thresholds = check_thresholds(max_regression, min_speedup, min_accepted, min_concurrency)
    baseline, result = load_result(baseline_path), load_result(result_path)
    notes = check_comparable(baseline, result)
    cpus = [doc.get("machine", {}).get("cpu") for doc in (baseline, result)]
    if cpus[0] != cpus[1]:
        notes.append(f"the baseline ran on another CPU ({cpus[0]} vs {cpus[1]}): speedups held by their floors only")
    return compare(baseline, result, *thresholds), notes
