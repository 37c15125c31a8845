"""`speccompile bench --plot`: one PNG of a result document, its settings in the title.

Speedups are drawn as what the gate reads: per prompt, the method's tokens/s over autoregressive tokens/s on the
same prompt; each group shows those ratios (dots), their quartiles (box) and range (line), and their geometric mean,
the paired speedup (diamond). Up to three drafters are drawn side by side per category; more become a table of
colours (category x method) beside one spread per method over all prompts, so that many methods stay readable.
"""
from __future__ import annotations

import os

import numpy as np

from speccompile.format.atomic import write_atomically
from speccompile.bench.concurrency import round_shares
from speccompile.bench.settings import decoding as describe_decoding
from speccompile.bench.stats import geometric_mean, prompt_speedups
from speccompile.errors import SpeccompileError

MAX_SIDE_BY_SIDE = 3  # more drafters than this per category and grouped boxes stop being readable


def _matplotlib():
    try:
        import matplotlib
    except ImportError as e:
        raise SpeccompileError("--plot needs matplotlib: pip install 'speccompile[bench]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_title(result: dict) -> str:
    """The settings a reader needs to judge the figures: model, prompts, tokens, threads, date."""
    bundle, s = result["bundle"], result["settings"]
    target, source = bundle["target"], bundle["source"]
    model = os.path.basename(source["path"]) or source["path"]
    categories = len({p["category"] for p in result["prompts"]})
    threads = s["threads"] or f"all {result['machine']['cpu_count']}"
    tree = f", tree {s['tree']}" if s.get("tree") else ""
    decoding = describe_decoding(s)
    # builds of one source (its 4-bit blocks, float32, float16) differ only in these
    weights = (f", --weights {target['weights']}" if target.get("weights") else "") + \
        (f", --dtype {target['dtype']}" if target.get("dtype", "float32") != "float32" else "") + \
        (f", --kv-dtype {target['kv_dtype']}" if target.get("kv_dtype", "float32") not in
         ("float32", target.get("dtype", "float32")) else "")
    return (f"{model} ({target['model_type']}, {target['num_layers']} layers{weights})  |  "
            f"{os.path.basename(s['dataset'])}: {len(result['prompts'])} prompts in {categories} categories  |  "
            f"max_new_tokens {s['max_new_tokens']}, {decoding}{tree}, best of {s['repeats']}  |  threads {threads}  |  "
            f"{result['created'][:10]}")


def group_speedups(result: dict, methods: list[str]) -> dict[str, dict[str, list[float]]]:
    """{group: {method: per-prompt speedups over its baseline}}, groups being the categories then "overall"."""
    baseline = {m["name"]: m["baseline"] for m in result["methods"]}
    categories = list(dict.fromkeys(p["category"] for p in result["prompts"]))
    groups = {c: [p for p in result["prompts"] if p["category"] == c] for c in categories}
    groups["overall"] = result["prompts"]
    return {g: {m: prompt_speedups(prompts, m, baseline[m]) for m in methods} for g, prompts in groups.items()}


def draw_spread(ax, position: float, ratios: list[float], color, width: float, horizontal: bool = False) -> None:
    """Dots for the ratios, a box over their quartiles, a line over their range, a diamond at the geometric mean."""
    def at(along: float | list, value: float | list):  # (x, y) in the plot's orientation
        return (value, along) if horizontal else (along, value)
    q1, q3 = np.percentile(ratios, [25, 75])
    # a box's edges are sticky for autoscaling: a box at the extreme ratio (a group of one prompt) would pin the
    # axis there, without margin, and cut that ratio's dot and diamond in half
    ax.use_sticky_edges = False
    ax.plot(*at([position, position], [min(ratios), max(ratios)]), color=color, lw=1)
    box = ax.barh if horizontal else ax.bar
    box(position, q3 - q1, width * 0.7, q1, color=color, alpha=0.35, edgecolor=color)
    offsets = np.linspace(-width * 0.3, width * 0.3, len(ratios)) if len(ratios) > 1 else [0.0]
    ax.scatter(*at([position + o for o in offsets], ratios), s=7, color=color, alpha=0.8, zorder=3)
    ax.scatter(*at(position, geometric_mean(ratios)), marker="D", s=26, color=color, edgecolors="black",
               linewidths=0.6, zorder=4)


def _speedups_by_category(ax, spreads: dict, methods: list[str], colors: dict) -> None:
    width = 0.8 / max(len(methods), 1)
    for j, by_method in enumerate(spreads.values()):
        for i, name in enumerate(methods):
            draw_spread(ax, j + (i - (len(methods) - 1) / 2) * width, by_method[name], colors[name], width)
    for name in methods:  # legend entries, one per method
        ax.scatter([], [], marker="D", color=colors[name], edgecolors="black", linewidths=0.6, label=name)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xticks(range(len(spreads)), list(spreads), rotation=30, ha="right")
    ax.set(title="Per-prompt speedup over autoregressive\n(dots: prompts; box: quartiles; line: range; "
                 "diamond: geometric mean = paired speedup)", ylabel="tokens/s over autoregressive, same prompt")
    if methods:
        ax.legend(fontsize=8)


def _speedup_table(ax, result: dict, spreads: dict, methods: list[str]) -> None:
    """Methods x groups, coloured by paired speedup (red below 1, green above); each cell: the paired speedup, the
    range of its per-prompt speedups, the mean tokens committed per verify pass."""
    from matplotlib.colors import TwoSlopeNorm
    summary = {**result["summary"]["by_category"], "overall": result["summary"]["overall"]}
    speed = np.array([[geometric_mean(spreads[g][m]) for g in spreads] for m in methods])
    ax.imshow(speed, cmap="RdYlGn", norm=TwoSlopeNorm(1.0, min(0.5, speed.min()), max(2.0, speed.max())),
              aspect="auto")
    fontsize = 8 if len(methods) <= 6 and len(spreads) <= 10 else 6  # three lines per cell must fit
    for i, m in enumerate(methods):
        for j, g in enumerate(spreads):
            ratios, accepted = spreads[g][m], summary[g][m]["mean_accepted_tokens"]
            ax.text(j, i, f"{speed[i, j]:.2f}x\n{min(ratios):.2f}-{max(ratios):.2f}\n{accepted:.2f}/pass",
                    ha="center", va="center", fontsize=fontsize)
    ax.set_xticks(range(len(spreads)), list(spreads), rotation=30, ha="right")
    ax.set_yticks(range(len(methods)), methods, fontsize=8)
    ax.set_title("Paired speedup over autoregressive\n"
                 "(cells: paired speedup, per-prompt range, tokens per verify pass)")


def _overall_spread(ax, spreads: dict, methods: list[str], colors: dict) -> None:
    for i, name in enumerate(methods):
        draw_spread(ax, i, spreads["overall"][name], colors[name], 0.6, horizontal=True)
    ax.axvline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_yticks(range(len(methods)), methods, fontsize=8)
    ax.invert_yaxis()
    ax.set(title="Per-prompt speedup, all prompts\n(box: quartiles; line: range; diamond: paired speedup)",
           xlabel="tokens/s over autoregressive, same prompt")


def _committed_per_pass(ax, overall: dict, methods: list[str], colors: dict) -> None:
    width = 0.8 / max(len(methods), 1)
    for i, name in enumerate(methods):
        hist = overall[name]["committed_per_pass"] or {}
        passes = sum(hist.values()) or 1
        xs = [int(n) + (i - (len(methods) - 1) / 2) * width for n in hist]
        ax.bar(xs, [c / passes for c in hist.values()], width, label=name, color=colors[name])
    ax.set(title="Tokens committed per verify pass", xlabel="tokens (accepted drafts + 1)", ylabel="share of passes")
    if methods:
        ax.legend(fontsize=8)


def _tokens_per_second(ax, result: dict) -> None:
    names = [m["name"] for m in result["methods"]]
    colors = ["tab:blue" if m["engine"] == "speccompile" else "tab:gray" for m in result["methods"]]
    overall = result["summary"]["overall"]
    ax.barh(names, [overall[n]["median_tokens_per_second"] or 0 for n in names], color=colors)
    ax.invert_yaxis()
    ax.set(title="Median tokens/s\n(blue: speccompile, gray: transformers)", xlabel="tokens/s")


ROUND_COLOURS = {"full": "tab:blue", "fewer": "lightsteelblue", "prompt": "tab:orange", "rest": "lightgray"}


def _concurrency(ax, section: dict) -> None:
    """Aggregate tokens/s per number of concurrent streams, each bar labelled with its ratio over the same requests
    served one after another (the dashed line) and whether every request's tokens equalled its run alone; a bar
    whose run kept its rounds is split by where its time went (bench/concurrency.py round_shares)."""
    streams = list(section["streams"])
    runs = [section["streams"][n] for n in streams]
    shares = [round_shares(r, int(n)) for n, r in zip(streams, runs)]
    heights = [r["tokens_per_second"] for r in runs]
    bars = ax.bar(range(len(streams)), heights, color="tab:blue")
    if any(shares):
        bottom = np.zeros(len(runs))
        for part, label in (("full", "all slots decoding"), ("fewer", "fewer slots"), ("prompt", "a prompt's chunk"),
                            ("rest", "between rounds")):
            part_heights = [h * s[part] if s else 0.0 for h, s in zip(heights, shares)]
            ax.bar(range(len(streams)), part_heights, bottom=bottom, color=ROUND_COLOURS[part],
                   label=f"time: {label}")
            bottom += part_heights
    for bar, r in zip(bars, runs):
        label = f"{r['speedup_vs_sequential']:.2f}x" + ("" if r["identical"] else "\nnot identical")
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize=8)
    ax.axhline(section["sequential"]["tokens_per_second"], color="tab:gray", linestyle="--",
               label="one after another")
    ax.set_xticks(range(len(streams)), streams)
    ax.set(title=f"{section['requests']} requests x {section['max_new_tokens']} tokens, drafter "
                 f"{section['drafter'] or 'none'}\n(aggregate tokens/s; label: x one after another;\n"
                 f"each bar split by where its run's time went)",
           xlabel="concurrent streams", ylabel="tokens/s")
    ax.set_ylim(top=1.15 * max(heights + [section["sequential"]["tokens_per_second"]]))
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), fontsize=7, ncol=2)


def plot_formats() -> dict[str, str]:
    """The file formats matplotlib writes here: extension -> description."""
    plt = _matplotlib()
    fig = plt.figure()
    try:
        return fig.canvas.get_supported_filetypes()
    finally:
        plt.close(fig)


def plot(result: dict, path: str) -> None:
    """Three panels: how many tokens each pass commits (or, for many drafters, each drafter's spread over all
    prompts), the per-prompt speedups per category, the tokens/s of each method; a fourth with the concurrency
    mode's streams (--streams)."""
    plt = _matplotlib()
    speculative = [m["name"] for m in result["methods"] if m["drafter"] and m["engine"] == "speccompile"]
    colors = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(speculative)}
    spreads = group_speedups(result, speculative)
    many = len(speculative) > MAX_SIDE_BY_SIDE
    streams = "concurrency" in result
    ratios = ([1, 2.2, 1] if many else [1, 1.6, 1]) + ([1] if streams else [])
    fig, axes = plt.subplots(1, len(ratios), figsize=((22 if many else 18) + 6 * streams, 6.5 if many else 5.5),
                             gridspec_kw={"width_ratios": ratios})
    ax_left, ax_cat, ax_speed = axes[:3]
    if many:
        _overall_spread(ax_left, spreads, speculative, colors)
        _speedup_table(ax_cat, result, spreads, speculative)
    else:
        _committed_per_pass(ax_left, result["summary"]["overall"], speculative, colors)
        _speedups_by_category(ax_cat, spreads, speculative, colors)
    _tokens_per_second(ax_speed, result)
    if streams:
        _concurrency(axes[3], result["concurrency"])
    fig.suptitle(plot_title(result), fontsize=10)
    fig.tight_layout()
    ext = os.path.splitext(path)[1][1:].lower() or "png"  # exactly `path`: matplotlib would add ".png"
    write_atomically(path, lambda f: fig.savefig(f, dpi=110, format=ext))
    plt.close(fig)
