"""Files that are either complete or absent: written to a hidden sibling, then renamed.

A reader (``--resume``, an evaluation script, a person looking at the demo's output) never sees a
half-written checkpoint, result or picture, and a failed write leaves nothing behind. The temporary
file sits in the same folder, so ``os.replace`` stays on one filesystem and is atomic on POSIX; it
keeps the target's extension, so writers that infer the format from the name (PIL) still work.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import IO, Callable

TEMPORARY_PREFIX = "."  # temporary files are hidden: ".<name>.<pid>.<random>.tmp<ext>"


def atomic_write_path(path: str, write_to: Callable[[str], None]) -> str:
    """Call ``write_to(temporary_path)``, flush it to disk, and rename it to ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    stem, extension = os.path.splitext(os.path.basename(path))
    temporary = os.path.join(
        folder, f"{TEMPORARY_PREFIX}{stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{extension}"
    )
    try:
        write_to(temporary)
        with open(temporary, "rb") as f:
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path


def atomic_write(path: str, write: Callable[[IO[bytes]], None]) -> str:
    """Call ``write(binary_file)`` on a temporary file, then rename it to ``path``."""

    def write_to(temporary: str) -> None:
        with open(temporary, "xb") as f:
            write(f)

    return atomic_write_path(path, write_to)


def atomic_write_json(path: str, obj, indent=2) -> str:
    """``obj`` as JSON (UTF-8) at ``path``, atomically."""
    return atomic_write(path, lambda f: f.write(json.dumps(obj, indent=indent).encode("utf-8")))
