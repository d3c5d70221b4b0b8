"""Several gloo processes on a CPU-only machine train like one process on the same global batch."""

import os
import socket
import tempfile

import pytest
import torch
from detectron2.engine import launch
from detectron2.utils import comm
from torch import nn

from instalign_d2.engine import create_ddp_model, finish_distributed

GLOBAL_BATCH = 8


def _tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.GroupNorm(1, 7), nn.ReLU(), nn.Linear(7, 1))


def _global_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(GLOBAL_BATCH, 5, generator=g), torch.randn(GLOBAL_BATCH, 1, generator=g)


def _train_steps(model, x, y, steps=3):
    """A few SGD steps; returns the loss averaged over all processes at each step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()  # DDP all-reduces (averages) the gradients here
        optimizer.step()
        averaged = loss.detach().clone()
        if comm.get_world_size() > 1:
            torch.distributed.all_reduce(averaged)
            averaged /= comm.get_world_size()
        losses.append(averaged.item())
    return losses


def _worker(out_dir):
    rank, world = comm.get_rank(), comm.get_world_size()
    x, y = _global_batch()
    shard = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    model = create_ddp_model(_tiny_model(), broadcast_buffers=False)
    assert isinstance(model, nn.parallel.DistributedDataParallel)
    assert next(model.parameters()).device.type == "cpu"
    losses = _train_steps(model, x[shard], y[shard])
    weights = [p.detach().clone() for p in model.module.parameters()]
    torch.save({"losses": losses, "weights": weights}, os.path.join(out_dir, f"rank{rank}.pt"))
    finish_distributed()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_create_ddp_model_returns_the_model_in_one_process():
    model = _tiny_model()
    assert create_ddp_model(model) is model


def test_two_gloo_processes_match_one_process_on_the_same_global_batch():
    x, y = _global_batch()
    single = _train_steps(_tiny_model(), x, y)
    single_model = _tiny_model()
    _train_steps(single_model, x, y)

    with tempfile.TemporaryDirectory() as out_dir:
        launch(_worker, 2, dist_url=f"tcp://127.0.0.1:{_free_port()}", args=(out_dir,))
        results = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(2)]

    for result in results:
        assert result["losses"] == pytest.approx(single, abs=1e-5)
        for got, want in zip(result["weights"], single_model.parameters()):
            assert torch.allclose(got, want.detach(), atol=1e-5)
    # the steps really trained (so equal weights are not just equal initialisations)
    assert single[-1] < single[0]
