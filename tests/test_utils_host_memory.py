"""The host-memory setting: freed blocks are reused instead of being faulted in again each step."""

import json
import os
import platform
import subprocess
import sys

import pytest

from instalign_d2 import add_instalign_config
from instalign_d2.utils import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# In a fresh process (the setting is process-wide and cannot be undone): the page faults of a
# loop that allocates and frees tensors of the sizes a training step has (1.7 MB merged masks,
# a 9 MB weight gradient), counted after two rounds that warm the heap up.
FAULT_COUNTER = r"""
import json, resource, sys
import torch
from instalign_d2.utils.host_memory import keep_freed_host_memory
applied = keep_freed_host_memory() if sys.argv[1] == "keep" else None
def one_step():
    masks = [torch.ones(48, 96 * 96) for _ in range(6)]
    gradient = torch.ones(512, 512, 3, 3)
    return float(sum(m.sum() for m in masks) + gradient.sum())
values = [one_step() for _ in range(2)]
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
values += [one_step() for _ in range(10)]
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"applied": applied, "faults_per_step": faults / 10, "values": values}))
"""

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="mallopt is glibc's",
)


def _count_faults(mode):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    out = subprocess.run(
        [sys.executable, "-c", FAULT_COUNTER, mode],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_freed_blocks_are_reused_without_page_faults():
    default = _count_faults("default")
    kept = _count_faults("keep")
    assert kept["applied"] is True
    # 16 MB freed and allocated again per step: thousands of 4 KiB pages if the kernel gets them
    # back, none once the heap keeps them.
    assert kept["faults_per_step"] < 10, kept
    assert default["faults_per_step"] > 10 * max(kept["faults_per_step"], 1.0), (default, kept)
    # A speed setting only: the same numbers come out.
    assert kept["values"] == default["values"]


def test_without_glibc_nothing_is_changed(monkeypatch):
    monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("", ""))
    assert host_memory.keep_freed_host_memory() is False


def test_the_setting_is_on_by_default_and_train_net_applies_it(monkeypatch, tmp_path):
    from detectron2.config import get_cfg

    assert add_instalign_config(get_cfg()).KEEP_FREED_HOST_MEMORY is True
    sys.path.insert(0, REPO)
    import train_net

    calls = []
    monkeypatch.setattr(train_net, "keep_freed_host_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(train_net, "default_setup", lambda cfg, args: None)
    for value, expected in (("False", 0), ("True", 1)):
        calls.clear()
        args = train_net.default_argument_parser().parse_args(
            [
                "--config-file",
                os.path.join(REPO, "configs/synthetic/instalign_tiny.yaml"),
                "--eval-only",
            ]
            + ["KEEP_FREED_HOST_MEMORY", value, "OUTPUT_DIR", str(tmp_path)]
        )
        train_net.setup(args)
        assert len(calls) == expected, value
