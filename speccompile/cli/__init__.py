"""The `speccompile` command: build, generate, inspect, bench, gate, serve, train-head (a module each).

Every expected failure prints one `error:` line and exits 2 (`gate` exits 1 on a regression); a bug prints one
line too and exits 3 (cli/errors.py)."""
from __future__ import annotations

import click

from speccompile.cli.bench import bench
from speccompile.cli.build import build
from speccompile.cli.errors import DEBUG_ENV, OneLineUsageErrors
from speccompile.cli.gate import gate
from speccompile.cli.generate import generate
from speccompile.cli.inspect_bundle import inspect
from speccompile.cli.serve import serve
from speccompile.cli.train_head import train_head


@click.group(cls=OneLineUsageErrors)
@click.version_option(package_name="speccompile")
@click.option("--debug", is_flag=True, help=f"Print the traceback of a failure (also: {DEBUG_ENV}=1).")
def main(debug):
    """Compile a model and its drafters into static ONNX graphs; decode speculatively from the bundle."""


for command in (build, generate, inspect, bench, gate, serve, train_head):
    main.add_command(command)
