"""`speccompile inspect`: a bundle's manifest as readable lines."""
from __future__ import annotations

import click

from speccompile.cli.errors import errors_to_exit


@click.command()
@click.argument("bundle", type=click.Path())
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of every file.")
@errors_to_exit
def inspect(bundle, no_verify):
    """Print a readable summary of BUNDLE."""
    from speccompile.format.bundle import read_manifest
    from speccompile.format.summary import describe
    for line in describe(bundle, read_manifest(bundle, verify_hashes=not no_verify), verified=not no_verify):
        click.echo(line)
    from speccompile.runtime.cost_cache import cached_models  # adaptive drafting's measured costs, if any
    from speccompile.runtime.cost_model import machine_key
    here = machine_key(None)["machine"]  # the CPU, its device and onnxruntime: what a load here would use
    for model in sorted(cached_models(bundle), key=lambda m: m.key.get("machine") != here):
        for line in model.describe(here=model.key.get("machine") == here):
            click.echo(line)
