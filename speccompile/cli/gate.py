"""`speccompile gate`: a bench result against a baseline, for CI."""
from __future__ import annotations

import sys

import click

from speccompile.cli.errors import errors_to_exit


@click.command()
@click.argument("result", type=click.Path())
@click.option("--baseline", required=True, type=click.Path(), help="A bench result to compare against.")
@click.option("--max-regression", default="0.05", show_default=True,
              help="Largest allowed drop of a gated figure, as a fraction of its baseline.")
@click.option("--min-speedup", default=None, help="Floor for every drafter's overall speedup.")
@click.option("--min-accepted", default=None, help="Floor for every drafter's mean accepted tokens.")
@click.option("--min-concurrency", default=None, help="Floor for 4 streams' tokens/s over one after another.")
@errors_to_exit
def gate(result, baseline, max_regression, min_speedup, min_accepted, min_concurrency):
    """Fail (exit 1) if RESULT regresses against BASELINE on machine-independent figures.

    Thresholds must be finite numbers >= 0; figures that are missing, not numbers, NaN or infinite (in either file)
    are refused with exit 2, never passed."""
    from speccompile.bench.gate import check_thresholds, format_rows, run_gate
    # Parsed here, not by click, so that a bad value gives the one `error:` line every other bad input gives.
    max_regression, *floors = check_thresholds(max_regression, min_speedup, min_accepted, min_concurrency)
    rows, notes = run_gate(result, baseline, max_regression, *floors)
    click.echo(format_rows(rows))
    for note in notes:
        click.echo(f"note: {note}")
    failed = [r.name for r in rows if r.failure]
    if failed:
        click.echo(f"gate FAILED: {', '.join(failed)}", err=True)
        sys.exit(1)
    click.echo(f"gate passed: {len(rows)} figures within {max_regression:.0%} of the baseline")
