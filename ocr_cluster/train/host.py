"""glibc's malloc settings for a process that runs the model on the CPU (training ranks, `ocr-cluster eval`).

PyTorch's CPU tensors come straight from malloc. By default glibc serves each block above its mmap
threshold (128 KiB at start, raised to the largest mmapped block freed so far) with a fresh mmap, unmaps it
on free, and trims the heap's top once more than twice that threshold is free. A forward and backward
allocate and free the same multi-MiB activations in a different order every step, so the kernel hands
out, zeroes and takes back hundreds of MiB of pages per step: measured with HRNetV2p-W18-Small at
512×1024 on 2 cores, 540k page faults and a third of the CPU time of an inference (benchmarks/README.md,
"The host allocator"). Keeping blocks up to 32 MiB (glibc's ceiling for this setting) on the heap and up
to 1 GiB free at its top lets the next step reuse them; blocks above 32 MiB are still mapped and unmapped.

Users who tune malloc themselves (MALLOC_*_ variables or glibc.malloc tunables) keep their settings.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 1 << 30
USER_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def user_tuned(env=os.environ) -> bool:
    return any(name in env for name in USER_VARIABLES) or "glibc.malloc." in env.get("GLIBC_TUNABLES", "")


def keep_freed_memory() -> bool:
    """Set the thresholds in this process; False where there is no glibc or the user tuned malloc."""
    if user_tuned():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl)
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
