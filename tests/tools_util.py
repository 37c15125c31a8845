"""The scripts in tools/ as modules, for their tests."""
import importlib
import os
import sys


def tool(name: str):
    """The module tools/NAME.py (tools import their neighbours, so the folder is on the path while it loads)."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)
