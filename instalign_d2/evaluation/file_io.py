"""Atomic JSON files: a reader never sees a half-written result or dump."""

import json
import os
import uuid


def atomic_write_json(path: str, obj, indent=2) -> str:
    """Write ``obj`` as JSON to ``path`` via a temp file in the same folder and ``os.replace``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # same folder, so the rename stays on one filesystem (atomic on POSIX); a plain open keeps
    # the permissions the umask gives, unlike mkstemp's 0600
    tmp_path = os.path.join(
        folder, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    )
    try:
        with open(tmp_path, "x") as f:
            json.dump(obj, f, indent=indent)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    return path
