"""The errors of the dataset loaders, and their messages as the one line a user reads.

``train_net.py`` prints such an error as ``instalign_d2: error: <message>`` and exits with
status 2, so each message is one line that names the file or folder, the problem and the fix.
"""

from __future__ import annotations

import re
from typing import List


class DatasetLayoutError(FileNotFoundError):
    """A dataset file or folder is not where the registered dataset expects it."""


class DatasetError(DatasetLayoutError):
    """A dataset file or folder that exists but cannot be used as it is (a file that does not
    parse or has the wrong shape, images missing, a split with nothing usable)."""


def error_line(exc: BaseException) -> str:
    """The message of ``exc`` as one line.

    An exception raised in a DataLoader worker is re-raised in the main process with the
    worker's traceback in its message; the original message is that traceback's last line.
    """
    text = str(exc).strip()
    if "\n" in text and "Traceback" in text:
        last = text.splitlines()[-1]
        text = re.sub(r"^[\w.]+: ", "", last)  # "package.module.DatasetError: message"
    return " ".join(text.split())


def one_line_layout(layout: str) -> str:
    """A folder tree, as the loaders' ``*_LAYOUT`` strings draw it, as one line of paths.

    ``"  grefcoco/\\n    instances.json"`` becomes ``"grefcoco/instances.json"``. Text after two
    or more spaces is a comment, kept in parentheses; a line that starts with "(" comments the
    line above it.
    """
    items: List[str] = []
    folders: List[tuple] = []  # (indent, "name/") of the folders above the current line
    for line in layout.splitlines():
        text = line.strip()
        if not text:
            continue
        if text.startswith("(") and items:
            items[-1] += f" {text}"
            continue
        indent = len(line) - len(line.lstrip())
        parts = re.split(r"\s{2,}", text, maxsplit=1)
        name, comment = parts[0], " ".join(parts[1].split()) if len(parts) > 1 else ""
        while folders and folders[-1][0] >= indent:
            folders.pop()
        path = "".join(folder for _, folder in folders) + name
        if comment and not (comment.startswith("(") and comment.endswith(")")):
            comment = f"({comment})"
        items.append(f"{path} {comment}".strip())
        if name.endswith("/"):
            folders.append((indent, name))
    # A bare folder followed by its own contents says nothing more.
    kept = [
        item
        for i, item in enumerate(items)
        if not (item.endswith("/") and i + 1 < len(items) and items[i + 1].startswith(item))
    ]
    return "; ".join(kept)
