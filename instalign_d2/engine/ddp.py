"""DistributedDataParallel that also works for CPU models under gloo.

Detectron2's ``create_ddp_model`` always passes ``device_ids=[local_rank]``, which DDP rejects
for a module whose parameters live on the CPU. ``launch(..., num_gpus_per_machine=2)`` on a
machine without GPU already starts two gloo processes; leaving ``device_ids`` out for CPU
modules is all that is missing for them to train together.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys

import torch.distributed as dist
from detectron2.utils import comm
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default as comm_hooks
from torch.nn.parallel import DistributedDataParallel


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model itself, whether or not DDP wraps it (DDP keeps it in ``.module``)."""
    return getattr(model, "module", model)


def create_ddp_model(model: nn.Module, *, fp16_compression: bool = False, **kwargs) -> nn.Module:
    """Wrap ``model`` in DDP when there are several processes (else return it unchanged)."""
    if comm.get_world_size() == 1:
        return model
    on_gpu = next(model.parameters()).is_cuda
    if on_gpu:
        kwargs.setdefault("device_ids", [comm.get_local_rank()])
    else:
        kwargs.pop("device_ids", None)
    ddp = DistributedDataParallel(model, **kwargs)
    if fp16_compression and on_gpu:
        ddp.register_comm_hook(state=None, hook=comm_hooks.fp16_compress_hook)
    return ddp


def finish_distributed() -> None:
    """Wait for every process, then tear the process group down.

    A gloo worker that simply returns while its peers still hold the connection can die with
    "terminate called without an active exception" (SIGABRT) as the interpreter exits; leaving
    together and destroying the group first avoids most of it, but not all: such an abort can
    still follow the destruction of the group. So a launched worker (a child process) then leaves
    at once, after flushing its logs, without the interpreter's teardown where gloo's threads
    abort; by then its results are in files and logs, and the parent only reads its exit code.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    if multiprocessing.parent_process() is not None:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
