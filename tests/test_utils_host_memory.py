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

# In a fresh process (the setting is process-wide and cannot be undone): a 16 MiB block, about
# the size of a step's largest temporaries, allocated and freed with glibc's malloc, and where
# glibc keeps its memory afterwards (mallinfo2: ``arena`` = bytes of the heap, ``hblkhd`` = bytes
# in separately mapped blocks). Deterministic, unlike page-fault counts, which the kernel's state
# moves.
HEAP_AFTER_FREE = r"""
import ctypes, json, sys
from instalign_d2.utils.host_memory import keep_freed_host_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
applied = keep_freed_host_memory() if sys.argv[1] == "keep" else None
before = libc.mallinfo2()
block = libc.malloc(16 << 20)
while_held = libc.mallinfo2()
libc.free(block)
after = libc.mallinfo2()
print(json.dumps({"applied": applied, "mapped_for_it": while_held.hblkhd - before.hblkhd,
                  "freed_into_heap": after.fordblks - before.fordblks}))
"""

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="mallopt is glibc's",
)


def _heap_after_free(mode):
    env = dict(os.environ, PYTHONPATH=REPO)
    out = subprocess.run(
        [sys.executable, "-c", HEAP_AFTER_FREE, mode],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_a_freed_block_stays_in_the_heap_for_the_next_step():
    default = _heap_after_free("default")
    kept = _heap_after_free("keep")
    block = 16 << 20
    # glibc's default: a block this large is mapped on its own and unmapped when freed, so the
    # next step faults every page of it in again.
    assert default["applied"] is None and default["mapped_for_it"] >= block
    assert default["freed_into_heap"] < block
    # Kept: it comes from the heap and its memory stays there, free for the next allocation.
    assert kept["applied"] is True and kept["mapped_for_it"] == 0
    assert kept["freed_into_heap"] >= block


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
