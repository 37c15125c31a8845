"""Files written whole or not at all: under a temporary name beside their place (".tmp-..."), renamed onto it once
complete, so a failure or an interrupt leaves the earlier file, never a truncated one. Shared by everything that
writes a file a later run reads: bench results and plots, the cost model, the context cache's disk blocks,
train-head's work files."""
from __future__ import annotations

import os
import tempfile
from typing import IO, Callable

TEMP_PREFIX = ".tmp-"  # a writer killed mid-file leaves one of these (the context cache removes its own)


def write_atomically(path: str, write: Callable[[IO[bytes]], None], private: bool = False) -> None:
    """write(f) into a temporary file beside `path`, then renamed onto it. private: readable by the owner alone
    (mkstemp's mode), else the mode open() would give the file."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=TEMP_PREFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        if not private:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
