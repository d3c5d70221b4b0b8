"""Keep freed host memory in the process, so that a training step does not fault it in again.

glibc's ``malloc`` serves blocks above its mmap threshold (128 KiB at first) with fresh ``mmap``
pages and gives memory at the top of the heap back to the kernel once more than the trim threshold
is free there. A training step allocates and frees the same tensors of a few MB every time (the
merged masks of 48 expressions at 96 x 96 are 1.7 MB, the last ResNet stage's weight gradient 9 MB),
so each step the kernel hands out and zeroes those pages again: a page fault per 4 KiB, which costs
more inside a virtual machine. ``mallopt`` with a high mmap threshold, a trim threshold that is never
reached and some padding on every heap extension makes freed blocks stay in the heap for the next
step. PyTorch's CPU tensors come from ``malloc``; CUDA memory is not concerned.

Only on Linux with glibc (elsewhere nothing is changed), and only the current process: call it
before the model and the data are built.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

# mallopt's parameter numbers, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

# glibc refuses a larger mmap threshold on 64-bit (HEAP_MAX_SIZE / 2); blocks above it still map.
MMAP_THRESHOLD_BYTES = 32 << 20
TRIM_THRESHOLD_BYTES = 1 << 30
TOP_PAD_BYTES = 64 << 20

_logger = logging.getLogger(__name__)


def _glibc():
    """The C library if it is glibc (``mallopt`` has no equivalent in musl, macOS or Windows)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


def keep_freed_host_memory() -> bool:
    """Make glibc keep freed blocks for reuse; True when every setting was accepted."""
    libc = _glibc()
    if libc is None:
        _logger.info("Host memory: not glibc, the allocator's settings are left as they are.")
        return False
    accepted = [
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
        libc.mallopt(M_TOP_PAD, TOP_PAD_BYTES),
    ]
    if not all(accepted):
        _logger.warning(
            "Host memory: glibc refused a mallopt setting (%s); freed memory may go back to the kernel.",
            accepted,
        )
        return False
    _logger.info(
        "Host memory: freed blocks stay in the process for reuse (glibc mallopt: mmap threshold "
        "%d MiB, trim threshold %d MiB, top pad %d MiB; KEEP_FREED_HOST_MEMORY False turns it off).",
        MMAP_THRESHOLD_BYTES >> 20,
        TRIM_THRESHOLD_BYTES >> 20,
        TOP_PAD_BYTES >> 20,
    )
    return True
