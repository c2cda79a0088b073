"""Hand freed memory back to the operating system between the long job's steps.

The job frees what a step built (a chunk's prompts and answers, a slice's hashes and texts) as soon
as the step ends, but the allocators keep those pages: glibc's heap keeps free pages that sit
between live blocks, and Arrow's pool keeps freed segments for reuse. Measured on a million
entities, that kept RSS growing with the catalogue although the live data did not (the encode step
alone held ~900 bytes per entity it no longer used). `release_memory()` after each step makes the
process's footprint what it actually holds.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's malloc_trim, or None (musl, macOS: nothing to call)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_memory() -> None:
    """Return free heap pages and Arrow's unused pool memory to the OS. Cheap (milliseconds): it
    walks free lists, not live objects, so it is fine to call once per chunk."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
