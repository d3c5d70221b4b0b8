"""A DetectionCheckpointer whose files are never half-written.

fvcore writes ``model_XXXX.pth`` and then ``last_checkpoint`` in place: a kill during either
write can leave ``last_checkpoint`` naming a truncated file, and ``--resume`` then fails. Here
both are written to a temporary file in the same folder and renamed, which is atomic on POSIX.
"""
from __future__ import annotations

import os

import torch
from detectron2.checkpoint import DetectionCheckpointer

from instalign_d2.utils.atomic_io import atomic_write


class AtomicCheckpointer(DetectionCheckpointer):
    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", save_file)
        atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        path = os.path.join(self.save_dir, "last_checkpoint")
        atomic_write(path, lambda f: f.write(last_filename_basename.encode()))
