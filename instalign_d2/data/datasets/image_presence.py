"""Which images of a split are on disk, found with one directory listing per folder.

A split names up to ~20k images (gRefCOCO train). One ``os.scandir`` of each folder and a set
lookup per image costs a few milliseconds where a ``stat`` per image costs a syscall each (and a
disk seek each on a cold network file system), so the check runs every time a split loads. A
split whose images are all missing stops here, naming the folders searched and the layout
expected; a split with a few missing is reported to the caller, which decides (see
``instalign_d2/data/checked.py``).
"""

from __future__ import annotations

import os
from typing import Collection, Dict, FrozenSet, List, Sequence

from instalign_d2.data.datasets.errors import DatasetError, one_line_layout

EXAMPLES_IN_MESSAGE = 3


class ImageFolders:
    """The folders a dataset's images are looked for in, each listed once on first use.

    Args:
        folders: the image roots, in search order (for the messages; paths in subfolders of
            them are listed too).
        layout: the expected folder tree, quoted when no image is found.
    """

    def __init__(self, folders: Sequence[str], layout: str):
        self.folders = tuple(folders)
        self.layout = layout
        self._names: Dict[str, FrozenSet[str]] = {}

    def names_in(self, folder: str) -> FrozenSet[str]:
        """Names of the entries of ``folder`` (empty when it does not exist or cannot be read)."""
        names = self._names.get(folder)
        if names is None:
            try:
                with os.scandir(folder) as entries:
                    names = frozenset(entry.name for entry in entries)
            except OSError:
                names = frozenset()
            self._names[folder] = names
        return names

    def exists(self, path: str) -> bool:
        folder, _, name = path.rpartition(os.sep)  # os.path.split costs 3x more, per image
        return name in self.names_in(folder)

    def missing(self, paths: Collection[str], dataset_name: str) -> List[str]:
        """The sorted paths of ``paths`` not on disk; a :class:`DatasetError` when none is."""
        missing = sorted(p for p in paths if not self.exists(p))
        if paths and len(missing) == len(paths):
            raise DatasetError(self._none_found_message(missing, dataset_name))
        return missing

    def _none_found_message(self, missing: List[str], dataset_name: str) -> str:
        searched = ", ".join(os.path.abspath(f) for f in self.folders)
        examples = ", ".join(os.path.relpath(p, self._root_of(p)) for p in missing[:EXAMPLES_IN_MESSAGE])
        contents = "; ".join(self._describe(f) for f in self.folders)
        return (
            f"{dataset_name}: none of the split's {len(missing)} image{'s' * (len(missing) != 1)} "
            f"is on disk (e.g. {examples}); "
            f"looked in {searched} ({contents}). Expected under $DETECTRON2_DATASETS (default "
            f"./datasets): {one_line_layout(self.layout)}"
        )

    def _root_of(self, path: str) -> str:
        for folder in self.folders:
            if path.startswith(os.path.join(folder, "")):
                return folder
        return os.path.dirname(path)

    def _describe(self, folder: str) -> str:
        """What a folder holds, to hint at the usual mistakes (nested folder, empty folder)."""
        if not os.path.isdir(folder):
            return f"{os.path.basename(folder)}/ does not exist"
        names = self.names_in(folder)
        subfolders = sorted(n for n in names if os.path.isdir(os.path.join(folder, n)))
        if not names:
            return f"{os.path.basename(folder)}/ is empty"
        text = f"{os.path.basename(folder)}/ holds {len(names)} other entries"
        if subfolders:
            text += f", among them the folders {', '.join(subfolders[:EXAMPLES_IN_MESSAGE])} (move the images up?)"
        return text
