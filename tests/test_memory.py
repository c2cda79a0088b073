"""`release_memory` hands freed heap pages back to the OS (what keeps the long job's RSS at what it
holds, see bench/bench_memory.py)."""

from __future__ import annotations

import sys

import pytest

from recaug.core.memory import _malloc_trim, release_memory


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        import os

        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux") or _malloc_trim() is None, reason="glibc only")
def test_freed_heap_pages_between_live_blocks_go_back_to_the_os():
    # 200k blocks of 1 KB (above Python's small-object allocator: straight from malloc), every 32nd
    # kept alive, so the free space sits between live blocks where the heap cannot simply shrink
    blocks = [bytes(1024) + i.to_bytes(4, "little") for i in range(200_000)]
    kept = blocks[::32]
    del blocks
    before = _rss_mib()
    release_memory()
    after = _rss_mib()
    assert len(kept) == 6_250
    assert before - after > 100, (before, after)  # ~200 MB were freed


def test_release_memory_runs_anywhere():
    release_memory()  # no glibc: a no-op for the heap, Arrow's pool still releases
    release_memory()
