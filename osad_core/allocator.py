"""glibc's allocator set up for a process that trains or scores.

By default glibc hands every allocation above a threshold (128 KiB, rising with use up to
32 MiB) to fresh ``mmap`` pages and gives them back to the kernel on ``free``. A scoring
batch allocates and frees feature maps of tens of MiB every batch, so each batch pays the
kernel again for zeroed pages (on the 2-core benchmark machine, 51 of a HeadCT Fusion run's
116 CPU seconds went to the kernel; ``docs/BENCHMARKS.md``, "glibc's allocator in job
processes"). Serving them from the heap and keeping
freed memory for reuse removes that cost at the price of a larger resident set while the
job runs (about 15 % at the measured peak). Only job and command-line processes call
this; the app's own long-running process keeps glibc's defaults.

``OSAD_MALLOC_TUNE=0`` keeps the defaults; so does any platform without glibc.
"""
from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt parameters, <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 256 << 20  # allocations up to this size come from the heap
TRIM_THRESHOLD = 1 << 30  # free heap kept for reuse before it is returned to the kernel

_done: bool | None = None


def tune() -> bool:
    """Set the thresholds once per process; True when they are in effect."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if os.environ.get("OSAD_MALLOC_TUNE", "1").strip() == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    _done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not _done:
        log.info("glibc refused the allocator thresholds; its defaults stay")
    return _done
