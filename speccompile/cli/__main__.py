"""`python -m speccompile.cli`."""
from speccompile.cli import main

main()
