"""Keep a long merge's resident memory at what it holds, not what it once held.

A merge allocates and frees tensors of a few sizes over and over (each key's T inputs, SVD
outputs and workspaces) while the merged output grows. glibc's allocator raises its mmap
threshold after the first large free, so later large tensors come from the heap, and the
heap fragments: on a ViT-B/32 CART merge that cost about 250 MiB of RSS at T = 16 (see
``bench/memory.py``). Serving every allocation of 1 MiB or more by mmap gives each freed
tensor back to the OS at once.

It pays only where a process holds whole models while it merges (the pipeline's candidates,
CART factors and index). ``merge.merge_files`` streams its output and leaves glibc's
defaults: there the fresh pages of every temporary cost more than fragmentation saves
(task arithmetic on a 156M-parameter Llama: 16.2 s, 14.8 s of it system time, against
7.8 s; see docs/benchmarks.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h


@functools.cache
def release_large_frees(threshold_bytes: int = 1 << 20) -> bool:
    """Ask glibc to serve allocations of ``threshold_bytes`` or more with mmap (which also
    stops the threshold from drifting up). Process-wide, once; False where the C library is
    not glibc (nothing changes there)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        done = bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold_bytes))
    except (OSError, AttributeError):
        return False
    log.debug("mmap threshold set to %d bytes: %s", threshold_bytes, done)
    return done
