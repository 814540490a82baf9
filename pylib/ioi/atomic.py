"""Files written whole or not at all: into a temporary sibling, renamed into place once complete,
so that a crash or an error never leaves half a result, half a model or a wrong file behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(target: Path, directory: bool = False) -> Iterator[Path]:
    """A temporary sibling of `target` (a file, or a directory with `directory=True`) to write;
    renamed onto `target` when the block ends without an error, removed in every case."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=target.name + ".tmp"))
    else:
        handle, name = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".tmp")
        os.close(handle)
        staging = Path(name)
    try:
        yield staging
        os.replace(staging, target)
    finally:
        if staging.is_dir():
            shutil.rmtree(staging, ignore_errors=True)
        else:
            staging.unlink(missing_ok=True)
