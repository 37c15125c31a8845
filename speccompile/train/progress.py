"""Progress lines of a training run: timestamped, to stdout, flushed (runs last hours)."""
from __future__ import annotations

import time


def log(*parts) -> None:
    print(time.strftime("%H:%M:%S"), *parts, flush=True)


def f3(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"
