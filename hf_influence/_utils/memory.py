"""Give freed memory back to the operating system during long passes over data.

A scoring pass allocates and frees tens of MiB per batch (per-example gradients, activations whose
size follows the batch's longest row). glibc's allocator keeps such freed blocks in its heaps and
the resident set then grows with the number of rows although no tensor outlives its batch. The
remedy here is ``malloc_trim(0)``, which returns the free pages of every heap; it is called only
when the resident set has grown past a headroom above its level at the start of the pass, so a
pass that does not grow never pays for it. Without glibc (macOS, Windows, musl) every helper is a
no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

DEFAULT_HEADROOM_BYTES = 256 * 2**20


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim`` or ``None`` where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_memory() -> bool:
    """Return the C allocator's free memory to the OS (glibc ``malloc_trim(0)``).

    Call it at coarse boundaries (the end of a shard, of a pass over the data), not per batch: it
    walks every heap. Returns `True` if the allocator released something, `False` otherwise or
    where the C library is not glibc.
    """
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


def resident_bytes() -> int | None:
    """Current resident set size of this process in bytes (Linux ``/proc/self/statm``), else `None`."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class ResidentGuard:
    """Keeps a pass's resident memory within ``headroom`` bytes of where it started.

    Call :meth:`check` once per batch: it reads the resident set (one small file read) and calls
    :func:`release_memory` only when the set exceeds the limit. After a release the limit is reset
    to ``headroom`` above the new level, so memory the pass really holds (growing outputs) never
    makes it release on every batch.

    Args:
        headroom (`int`, defaults to 256 MiB): bytes the resident set may grow before a release.
    """

    def __init__(self, headroom: int = DEFAULT_HEADROOM_BYTES):
        self.headroom = headroom
        self.enabled = _malloc_trim() is not None and resident_bytes() is not None
        self.limit = (resident_bytes() or 0) + headroom
        self.releases = 0

    def check(self) -> None:
        if not self.enabled or resident_bytes() <= self.limit:
            return
        release_memory()
        self.releases += 1
        self.limit = resident_bytes() + self.headroom
