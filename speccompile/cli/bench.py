"""`speccompile bench`: speculative against autoregressive decoding, per prompt category; concurrent streams;
multi-turn chats."""
from __future__ import annotations

import sys

import click

from speccompile.cli.bench_options import STREAM_REQUESTS, check_bench_options
from speccompile.cli.common import progress
from speccompile.cli.errors import errors_to_exit
from speccompile.errors import SpeccompileError


def _csv(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else ()


def _ints(option: str, value: str | None) -> list[int]:
    if not all(v.isdigit() for v in _csv(value)):
        raise SpeccompileError(f"{option} {value!r}: expected whole numbers, comma-separated")
    return [int(v) for v in _csv(value)]


@click.command()
@click.argument("bundle", type=click.Path())
@click.option("--dataset", type=click.Path(), default=None,
              help="Spec-Bench questions (.jsonl: question_id, category, turns); default: the shipped set.")
@click.option("--categories", default=None, help="Only these categories, comma-separated.")
@click.option("--limit", default=None, type=int, help="At most N prompts, picked round-robin over categories.")
@click.option("--max-new-tokens", default=128, show_default=True)
@click.option("--drafter", "drafters", multiple=True,
              help="Drafter to measure, NAME or NAME@TREE for that drafter through TREE, then optionally "
                   "~typical[:EPS[,ALPHA]] for lossy typical acceptance (repeatable, e.g. --drafter mtp@chain:3 "
                   "--drafter mtp@dynamic:4; default: every drafter of the bundle).")
@click.option("--tree", default=None,
              help="Verify this token tree: chain:K | static:FILE | dynamic:N | adaptive[:D] [+lookup:L].")
@click.option("--repeats", default=1, show_default=True, help="Runs per prompt and method; the fastest is kept.")
@click.option("--temperature", default=0.0, show_default=True,
              help="Sample at this temperature (seeded per prompt); NAME~typical methods accept typically (lossy).")
@click.option("--top-k", default=0, show_default=True, help="With --temperature: sample from the k likeliest tokens.")
@click.option("--threads", default=None, type=int, help="Intra-op threads (default: all cores).")
@click.option("--json", "json_out", type=click.Path(), default=None, help="Write the result document here.")
@click.option("--plot", "plot_out", type=click.Path(), default=None,
              help="Write a PNG of three panels here (a fourth with --streams).")
@click.option("--compare-transformers", is_flag=True,
              help="Also run the same target (and drafting) through transformers generate.")
@click.option("--multi-turn", type=int, default=None, metavar="TURNS",
              help="Instead: chats of TURNS turns with a long first message (--limit of them, default 3), each with "
                   "and without the context cache: TTFT and cache hits per turn.")
@click.option("--streams", default=None, help="Concurrency mode: serve --stream-requests prompts one after another, "
              "then with each of these numbers of concurrent streams (comma-separated, e.g. 1,2,4,8).")
@click.option("--stream-requests", default=STREAM_REQUESTS, show_default=True,
              help="Requests the concurrency mode serves.")
@click.option("--stream-repeats", default=None, type=int,
              help="Rounds of the concurrency mode; its ratio is their median (default: --repeats).")
@errors_to_exit
def bench(bundle, dataset, categories, limit, max_new_tokens, drafters, tree, repeats, temperature, top_k, threads,
          json_out, plot_out, compare_transformers, multi_turn, streams, stream_requests, stream_repeats):
    """Benchmark BUNDLE: speculative against autoregressive decoding, per prompt category."""
    from speccompile.bench.plot import plot
    from speccompile.bench.report import format_table, write_json
    check_bench_options(click.get_current_context().params)
    if multi_turn is not None:
        from speccompile.bench.multi_turn import MultiTurnSettings, format_multi_turn, run_multi_turn
        result = run_multi_turn(bundle, MultiTurnSettings(dataset, _csv(categories), limit, multi_turn, max_new_tokens,
                                                          drafters[0] if drafters else None, threads), progress)
        click.echo(format_multi_turn(result))
        if json_out:
            write_json(result, json_out)
            progress(f"wrote {json_out}")
        return
    from speccompile.bench.run import Benchmark
    from speccompile.bench.settings import BenchSettings
    settings = BenchSettings(dataset=dataset, categories=_csv(categories), limit=limit,
                             max_new_tokens=max_new_tokens, drafters=tuple(drafters), tree=tree, repeats=repeats,
                             threads=threads, compare_transformers=compare_transformers, temperature=temperature,
                             top_k=top_k, streams=tuple(_ints("--streams", streams)), stream_requests=stream_requests,
                             stream_repeats=stream_repeats)
    benchmark = Benchmark(bundle, settings, log=progress)
    with click.progressbar(length=benchmark.total_runs, label="decoding", file=sys.stderr, show_pos=True,
                           item_show_func=lambda label: label) as bar:
        result = benchmark.run(on_run=lambda label: bar.update(1, label))
    click.echo(format_table(result))
    if "concurrency" in result:
        from speccompile.bench.concurrency import format_concurrency
        click.echo(format_concurrency(result["concurrency"]))
    if json_out:
        write_json(result, json_out)
        progress(f"wrote {json_out}")
    if plot_out:
        plot(result, plot_out)
        progress(f"wrote {plot_out}")
